"""Drop-in construction: code written for torch.optim.AdamW / SGD runs with the class swapped.

nanoGPT, torchtitan and config-driven trainers build optimizers with torch's positional order and
keywords (``fused=True``, ``foreach``, ``nesterov``); SGD code chooses momentum by its value.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings

import pytest
import torch
from problems import make_closure
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD, in_trial

PAIRS = [(ArmijoAdam, torch.optim.AdamW), (ArmijoSGD, torch.optim.SGD)]


def _positional(cls) -> list[str]:
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [n for n, p in inspect.signature(cls).parameters.items() if p.kind in kinds]


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["AdamW", "SGD"])
def test_positional_order_is_torchs(ours, theirs):
    assert _positional(ours) == _positional(theirs)


@pytest.mark.parametrize("ours, theirs", PAIRS, ids=["AdamW", "SGD"])
def test_every_torch_keyword_at_its_default_is_accepted(ours, theirs):
    # a config written for torch's class (every argument spelled out) builds ours unchanged
    kw = {n: p.default for n, p in inspect.signature(theirs).parameters.items()
          if n != "params" and p.default is not inspect.Parameter.empty}
    opt = ours(nn.Linear(3, 1).parameters(), **kw)
    assert opt.param_groups[0]["weight_decay"] == kw["weight_decay"]


def _start():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))


def _train(make_opt, steps=6):
    model = _start()
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = make_opt(model)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return opt, [p.detach().clone() for p in model.parameters()]


def _same(a, b):
    """Both runs ended at the same weights, and those are not the start (two runs that took no
    step would agree too)."""
    start = [p.detach() for p in _start().parameters()]
    moved = any(not torch.equal(p, s) for p, s in zip(a[1], start))
    return moved and all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


def test_nanogpt_construction_trains_as_the_plain_one():
    def nanogpt(model):  # nanoGPT's configure_optimizers, with the class swapped
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return ArmijoAdam(groups, lr=6e-4, betas=(0.9, 0.95), fused=True)

    def plain(model):
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
        return ArmijoAdam(groups, betas=(0.9, 0.95))

    a, b = _train(nanogpt), _train(plain)
    assert a[0].param_groups[0]["betas"] == (0.9, 0.95)
    assert _same(a, b)  # lr's value and fused change nothing without a scheduler


def test_positional_betas_and_eps_land_where_torchs_do():
    opt = ArmijoAdam(nn.Linear(3, 1).parameters(), 1e-3, (0.8, 0.99), 1e-6, 0.05)
    g = opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.8, 0.99), 1e-6, 0.05)


@pytest.mark.parametrize("torch_style, named", [
    (dict(), dict(direction="sgd")),
    (dict(momentum=0.9), dict(direction="momentum")),
    (dict(momentum=0.5), dict(direction="momentum", momentum=0.5)),
    (dict(momentum=0.9, nesterov=True), dict(direction="nesterov")),
    (dict(momentum=0.0), dict(direction="sgd")),
])
def test_sgd_spelled_as_torch_is_the_named_direction(torch_style, named):
    a = _train(lambda m: ArmijoSGD(m.parameters(), lr=0.1, **torch_style))
    b = _train(lambda m: ArmijoSGD(m.parameters(), lr=0.1, **named))
    assert a[0].rule.name == b[0].rule.name == named["direction"]
    assert _same(a, b)


def test_sgd_momentum_is_not_dropped_silently():
    # before, ArmijoSGD(params, momentum=0.9) ran plain SGD (direction defaulted to "sgd")
    opt, _ = _train(lambda m: ArmijoSGD(m.parameters(), momentum=0.9), steps=1)
    assert opt.rule.name == "momentum" and opt.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize("cls, kw, match", [
    (ArmijoAdam, dict(amsgrad=True), "amsgrad"),
    (ArmijoAdam, dict(weight_decay=0.1, decoupled_weight_decay=False), "L2 regularisation"),
    (ArmijoAdam, dict(maximize=True), "maximize"),
    (ArmijoAdam, dict(capturable=True), "capturable"),
    (ArmijoSGD, dict(differentiable=True), "differentiable"),
    (ArmijoAdam, dict(fused="yes"), "fused must be None or a bool"),
    (ArmijoSGD, dict(momentum=0.9, dampening=0.1), "dampening"),
    (ArmijoSGD, dict(nesterov=True), "nesterov=True needs momentum"),
    (ArmijoSGD, dict(momentum=0.9, nesterov=True, direction="momentum"), "contradicts"),
    (ArmijoSGD, dict(momentum=0.9, direction="sgd"), "takes no momentum"),
    # (it built plain SGD, the direction asked for not taken)
    (ArmijoSGD, dict(direction="nesterov", momentum=0.0), "direction='nesterov' needs momentum"),
    (ArmijoSGD, dict(direction="adam"), "invalid direction for ArmijoSGD"),
    (ArmijoSGD, dict(momentum="0.9"), "invalid momentum"),
])
def test_torch_options_that_are_not_implemented_are_refused_by_name(cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(nn.Linear(3, 1).parameters(), **kw)


@pytest.mark.parametrize("cls, ctor, group, match", [
    (ArmijoSGD, {}, dict(momentum=0.9, nesterov=True), "nesterov=True .*momentum=0.9"),
    (ArmijoSGD, dict(momentum=0.9), dict(nesterov=True), "nesterov=True"),
    (ArmijoSGD, dict(momentum=0.9, nesterov=True), dict(nesterov=False), "nesterov=False"),
    (ArmijoSGD, dict(momentum=0.9), dict(dampening=0.5), "dampening=0.5"),
    (ArmijoAdam, {}, dict(maximize=True), "maximize=True"),
    (ArmijoAdam, {}, dict(amsgrad=True), "amsgrad=True"),
    (ArmijoAdam, dict(direction="rmsprop"), dict(centered=True), "centered=True"),
])
def test_torch_options_in_a_param_group_are_refused_by_name(cls, ctor, group, match):
    # torch reads these per group; they were silently ignored (plain SGD ran, maximize minimised)
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    with pytest.raises(ValueError, match=match):
        cls([{"params": model.parameters(), **group}], **ctor)
    opt = cls(model[0].parameters(), **ctor)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": model[1].parameters(), **group})
    assert len(opt.param_groups) == 1
    # written into a live group: refused at the next step, before anything moves
    x = torch.randn(4, 3)
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    theta = [p.detach().clone() for p in model.parameters()]
    opt.param_groups[0].update(group)
    with pytest.raises(ValueError, match=match):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    assert opt.param_groups[0]["step"] == 1


def test_decoupled_weight_decay_is_taken_where_it_changes_nothing():
    # torch.optim.Adam / NAdam's keyword (a TypeError before): the decay is always decoupled
    model = nn.Linear(3, 1)
    ArmijoAdam(model.parameters(), decoupled_weight_decay=False)  # no decay: nothing to couple
    opt = ArmijoAdam(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):  # a group's decay too
        ArmijoAdam([{"params": model.parameters(), "weight_decay": 0.01}],
                   decoupled_weight_decay=False)
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):  # torch's group key
        ArmijoAdam([{"params": model.parameters(), "weight_decay": 0.01,
                     "decoupled_weight_decay": False}])
    other = nn.Linear(3, 1)
    opt = ArmijoAdam(model.parameters(), decoupled_weight_decay=False)
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):  # a group added later
        opt.add_param_group({"params": other.parameters(), "weight_decay": 0.1})
    x = torch.randn(4, 3)
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    opt.param_groups[0]["weight_decay"] = 0.1  # a decay scheduled later: refused at the step
    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="decoupled_weight_decay=False"):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))


@pytest.mark.parametrize("make, coupled", [
    (lambda p: torch.optim.Adam(p, weight_decay=0.1), True),
    (lambda p: torch.optim.NAdam(p, weight_decay=0.1), True),
    (lambda p: torch.optim.RMSprop(p, weight_decay=0.1), True),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1), True),
    (lambda p: torch.optim.AdamW(p, weight_decay=0.1), False),
    (lambda p: torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True), False),
    (lambda p: torch.optim.SGD(p, lr=0.1, weight_decay=0.1), False),  # the same step as ours
    (lambda p: torch.optim.Adam(p), False),
])
def test_a_checkpoint_with_l2_weight_decay_is_taken_with_a_warning(make, coupled):
    # its decay was added to the gradient: the run goes on with decoupled decay at the same λ
    try:
        model, theirs, loss_fn, f0 = _torch_run(make)
    except TypeError as e:
        if "decoupled_weight_decay" not in str(e):
            raise
        pytest.skip("this torch's Adam takes no decoupled_weight_decay")
    rule = {"RMSprop": dict(direction="rmsprop"), "NAdam": dict(direction="nadam")}
    name = type(theirs).__name__
    if name in ("Adam", "NAdam") and "decoupled_weight_decay" not in theirs.param_groups[0]:
        coupled = False  # older torch wrote no flag: such an Adam reads as an AdamW's
    if name == "SGD":
        opt = ArmijoSGD(model.parameters(), momentum=theirs.param_groups[0]["momentum"] or None)
    else:
        opt = ArmijoAdam(model.parameters(), **rule.get(name, {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(copy.deepcopy(theirs.state_dict()))
    said = [w for w in caught if "L2 weight decay" in str(w.message)]
    assert len(said) == int(coupled)
    if said:
        assert said[0].filename == __file__  # points at the load in the caller's code
    assert opt.param_groups[0]["weight_decay"] == theirs.param_groups[0]["weight_decay"]


def test_torch_options_at_their_no_op_values_in_a_group_are_accepted():
    x = torch.randn(4, 3)
    for make in (lambda m: ArmijoAdam([{"params": m.parameters(), "maximize": False,
                                        "amsgrad": False, "foreach": None, "fused": True,
                                        "capturable": False}]),
                 lambda m: ArmijoSGD([{"params": m.parameters(), "momentum": 0.5,
                                       "nesterov": True, "dampening": 0}],
                                     momentum=0.9, nesterov=True)):
        model = nn.Linear(3, 1)
        opt = make(model)
        for _ in range(2):  # the per-step validation accepts them too
            opt.step(make_closure(opt, lambda model=model: model(x).pow(2).mean()))
        assert opt.param_groups[0]["step"] == 2 and opt.stats["step_size"] > 0


def test_named_parameters_name_the_blocks_without_a_model():
    from armijo_fused.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=16, context=8, d_model=16, n_layers=2,
                                            n_heads=2))
    by_model = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    by_names = ArmijoAdam(model.named_parameters(), layerwise=True)
    assert by_names.param_groups[0]["param_names"]
    x = torch.randint(0, 16, (4, 8))
    for opt in (by_model, by_names):
        opt.step(loss_fn=lambda: model(x).float().mean(), loss=torch.zeros(()))
    assert by_names.param_groups[0]["block_names"] == by_model.param_groups[0]["block_names"]
    assert len(by_names.param_groups[0]["block_names"]) > 2


# == torch.optim checkpoints: a run started with AdamW / SGD continues with the line search ======
def _torch_run(make, steps=3, sched=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    opt = make(model.parameters())
    lr_sched = None
    if sched == "one-cycle":  # starts at max_lr / 25 and records max_lr in the group
        lr_sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=10,
                                                       cycle_momentum=False)
    elif sched:
        lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if lr_sched is not None:
            lr_sched.step()
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()  # the gradient of the next step, for both optimizers
    return model, opt, (lambda: nn.functional.mse_loss(model(x), y)), loss.detach()


@pytest.mark.parametrize("sched", [False, True, "one-cycle"],
                         ids=["no-schedule", "schedule", "one-cycle"])
def test_an_adamw_checkpoint_continues_with_its_moments_count_and_learning_rate(sched):
    model, adamw, loss_fn, f0 = _torch_run(
        lambda p: torch.optim.AdamW(p, lr=3e-3, weight_decay=0.1), sched=sched)
    theta = [p.detach().clone() for p in model.parameters()]
    ours = ArmijoAdam(model.parameters(), backend="torch", cadence="every")
    ours.load_state_dict(copy.deepcopy(adamw.state_dict()))
    g = ours.param_groups[0]
    assert g["folded"] == 3 and g["step_size"] == 3e-3 and g["weight_decay"] == 0.1
    # the schedule's place is kept; η = lr_0, the peak for OneCycleLR, so η · lr_t / lr_0 = lr_t
    assert g["lr"] == adamw.param_groups[0]["lr"]
    if sched == "one-cycle":
        assert 1e-3 < g["lr"] < 3e-3 and g["max_lr"] == 3e-3
    else:
        assert g["lr"] == (1.5e-3 if sched else 3e-3)
    for p in model.parameters():
        assert torch.equal(ours.state[p]["exp_avg"], adamw.state[p]["exp_avg"])
    # AdamW's own next step, for reference (then undone)
    adamw.step()
    reference = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, t in zip(model.parameters(), theta):
            p.copy_(t)
    # a trial accepted at once: θ moves by growth·η·lr_t/lr_0 along AdamW's direction
    ours.step(loss_fn=lambda: f0 - 1e6, loss=f0)
    assert ours.stats["trials"] == 1
    ratio = 1.2  # the first trial is growth · η, and lr_t / lr_0 is what AdamW applied over η
    for p, t, r in zip(model.parameters(), theta, reference):
        torch.testing.assert_close(t - p.detach(), ratio * (t - r), rtol=1e-4, atol=1e-8)


def test_a_checkpoint_saved_at_lr_0_keeps_the_optimizers_step_size_and_lr_0():
    # a hand-written warmup saved at lr 0: η = lr_0 = 0 never grew (the model never trained),
    # and lr_0 = 0 read lr_t / lr_0 as 1 at any lr (the rest of the warmup applied the full η)
    model, adamw, loss_fn, f0 = _torch_run(lambda p: torch.optim.AdamW(p, lr=1e-3))
    sd = copy.deepcopy(adamw.state_dict())
    sd["param_groups"][0]["lr"] = 0.0
    ours = ArmijoAdam(model.parameters(), backend="torch", cadence="every", lr=1e-3)
    ours.load_state_dict(sd)
    g = ours.param_groups[0]
    assert g["step_size"] == 1e-3 and g["lr_ref"] == 1e-3  # init_step_size and the live lr_0
    g["lr"] = 1e-5  # the warmup's next lr, 1 % of its peak
    ours.step(loss_fn=loss_fn, loss=f0)
    assert ours.stats["lr_factor"] == pytest.approx(1e-2) and ours.stats["step_size"] > 0
    assert float(loss_fn()) < float(f0)


def test_a_checkpoint_saved_mid_warmup_by_hand_takes_its_lr_as_lr_0_and_says_how_to_change_it():
    # nanoGPT's get_lr writes the lr by hand: a checkpoint saved at 3 of 10 warmup steps holds
    # lr 1.8e-4 and no schedule's record, so it is lr_0 (η starts there, and the first step
    # moves growth times AdamW's); the rest of the warmup is capped at 1, with a warning that
    # says what to set. (Taking the lr given to this optimizer instead scaled a constant-lr run
    # down for good: a review)
    model, adamw, loss_fn, f0 = _torch_run(lambda p: torch.optim.AdamW(p, lr=1.8e-4))
    ours = ArmijoAdam(model.parameters(), backend="torch", cadence="every", lr=6e-4)
    ours.load_state_dict(copy.deepcopy(adamw.state_dict()))
    g = ours.param_groups[0]
    assert g["lr_ref"] == 1.8e-4 and g["step_size"] == 1.8e-4
    g["lr"] = 3e-4  # the warmup's next value
    with pytest.warns(UserWarning, match="set each group's 'lr_ref' to the schedule's peak"):
        ours.step(loss_fn=loss_fn, loss=f0)
    assert ours.stats["lr_factor"] == 1.0


def test_a_global_checkpoint_whose_first_group_is_frozen_takes_the_trained_groups_lr():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    sgd = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.0},
                           {"params": model[1].parameters()}], lr=0.05)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    sgd.step()
    ours = ArmijoSGD([{"params": model[0].parameters(), "lr": 0.0},
                      {"params": model[1].parameters()}], lr=0.05, backend="torch")
    ours.load_state_dict(sgd.state_dict())
    assert [g["step_size"] for g in ours.param_groups] == [0.05, 0.05]  # not init_step_size
    assert ours.param_groups[0]["lr"] == 0.0  # the frozen group stays frozen


@pytest.mark.parametrize("make, ours, match", [
    (lambda p: torch.optim.SGD(p, lr=0.1), lambda p: ArmijoAdam(p), r"torch\.optim\.SGD's"),
    (lambda p: torch.optim.AdamW(p, lr=0.1), lambda p: ArmijoSGD(p),
     r"torch\.optim\.AdamW/Adam/NAdam's"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
     lambda p: ArmijoSGD(p, momentum=0.9), r"SGD\(nesterov=True\)'s"),
    # RAdam keeps Adam's moments (it loaded silently); its direction is rectified
    (lambda p: torch.optim.RAdam(p, lr=0.1), lambda p: ArmijoAdam(p), r"torch\.optim\.RAdam's"),
], ids=["sgd-into-adam", "fresh-adamw-into-sgd", "nesterov-into-heavy-ball", "radam-into-adam"])
def test_a_checkpoint_of_another_direction_without_state_to_say_so_is_warned_about(make, ours,
                                                                                   match):
    # nothing in the state refuses these (plain SGD keeps none, a fresh AdamW none yet, and a
    # Nesterov buffer is a heavy-ball one): the lr is another direction's step size
    model = nn.Linear(4, 1)
    src = make(model.parameters())
    if "nesterov" in match or "RAdam" in match:
        model(torch.randn(3, 4)).sum().backward()
        src.step()
    opt = ours(model.parameters())
    with pytest.warns(UserWarning, match=match + ", a direction other than"):
        opt.load_state_dict(src.state_dict())
    with warnings.catch_warnings():  # the same family: nothing to say
        warnings.simplefilter("error")
        ArmijoAdam(model.parameters()).load_state_dict(
            torch.optim.AdamW(model.parameters()).state_dict())


def test_a_step_size_taken_from_a_torch_checkpoint_is_the_start_growth_is_measured_from():
    # plain SGD's lr 0.1 into ArmijoAdam: η shrank to 0.06 and the optimizer said it had grown
    # to "60x its start" (init_step_size 1e-3) with no schedule attached
    model, sgd, loss_fn, _ = _torch_run(lambda p: torch.optim.SGD(p, lr=0.1))
    opt = ArmijoAdam(model.parameters(), backend="torch", cadence="every")
    with pytest.warns(UserWarning, match="a direction other than"):
        opt.load_state_dict(sgd.state_dict())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(4):
            opt.step(make_closure(opt, loss_fn))
    assert opt.param_groups[0]["step_size_avg"] >= 20 * 1e-3  # (the old measure would warn)
    assert not [w for w in seen if "no schedule attached" in str(w.message)]


@pytest.mark.parametrize("key, value", [("max_grad_norm", 1.0), ("init_step_size", 0.1),
                                        ("cadence", "every"), ("direction", "nadam")])
def test_options_of_the_whole_optimizer_in_a_param_group_are_refused_by_name(key, value):
    # torch ignores keys it does not read; these look per-group and did nothing
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match=f"a param group sets {key}=.*an option of the whole "
                                         "optimizer"):
        ArmijoAdam([{"params": model.parameters(), key: value}])
    opt = ArmijoAdam([{"params": [model.weight], "name": "weight"}])  # (a key of the user's)
    with pytest.raises(ValueError, match=f"a param group sets {key}="):
        opt.add_param_group({"params": [model.bias], key: value})
    assert len(opt.param_groups) == 1
    # written into a live group: it ran on, the option doing nothing; now refused at the next
    # step, before anything moves, and the step after the key is taken out runs
    loss_fn = lambda: model(torch.ones(2, 4)).square().mean()  # noqa: E731
    opt.step(make_closure(opt, loss_fn))
    opt.param_groups[0][key] = value
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=f"a param group sets {key}="):
        opt.step(make_closure(opt, loss_fn))
    assert torch.equal(model.weight, before)
    del opt.param_groups[0][key]
    opt.step(make_closure(opt, loss_fn))
    assert not torch.equal(model.weight, before)
    # written in place of a key taken out (the group's length unchanged): refused as well
    del opt.param_groups[0]["name"]
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"a param group sets {key}="):
        opt.step(make_closure(opt, loss_fn))


def test_a_hyperparameter_list_changed_in_place_is_checked_again():
    # the groups' change signature held the list itself: betas[0] = 1.5 compared equal to the
    # list it was, and the step took it
    model = nn.Linear(4, 1)
    opt = ArmijoAdam([{"params": model.parameters(), "betas": [0.9, 0.999]}])
    loss_fn = lambda: model(torch.ones(2, 4)).square().mean()  # noqa: E731
    opt.step(make_closure(opt, loss_fn))
    opt.param_groups[0]["betas"][0] = 1.5
    before = model.weight.detach().clone()
    with pytest.raises(ValueError, match=r"invalid betas\[0\]"):
        opt.step(make_closure(opt, loss_fn))
    assert torch.equal(model.weight, before)


def test_an_unknown_blocks_by_is_refused():
    model = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="invalid blocks_by in a param group: 'groups'"):
        ArmijoAdam([{"params": model.parameters(), "blocks_by": "groups"}], layerwise=True)


def test_an_sgd_momentum_checkpoint_continues_its_buffer():
    model, sgd, loss_fn, f0 = _torch_run(lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    ours = ArmijoSGD(model.parameters(), momentum=0.9, backend="torch")
    ours.load_state_dict(copy.deepcopy(sgd.state_dict()))
    for p in model.parameters():
        assert torch.equal(ours.state[p]["momentum_buffer"], sgd.state[p]["momentum_buffer"])
    # η along g: the steps apply (1 - μ)·η along the buffer, torch's lr
    assert ours.param_groups[0]["step_size"] == pytest.approx(0.05 / (1 - 0.9))
    ours.step(loss_fn=loss_fn, loss=f0)
    assert ours.stats["searched"] and float(loss_fn().detach()) < float(f0)


@pytest.mark.parametrize("make, ours, match", [
    (lambda p: torch.optim.AdamW(p, amsgrad=True), lambda p: ArmijoAdam(p), "amsgrad=True"),
    (lambda p: torch.optim.RMSprop(p, centered=True), lambda p: ArmijoAdam(p, direction="rmsprop"),
     "centered=True"),
    (lambda p: torch.optim.AdamW(p), lambda p: ArmijoSGD(p, momentum=0.9),
     r"holds \['exp_avg', 'exp_avg_sq', 'step'\]; ArmijoSGD\(direction='momentum'\) continues "
     r"from \['momentum_buffer'\]"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: ArmijoSGD(p),
     "uses momentum=0.9; ArmijoSGD\\(direction='sgd'\\) keeps no momentum buffer"),
    # plain SGD keeps no state: it took the AdamW checkpoint and dropped the moments silently
    (lambda p: torch.optim.AdamW(p), lambda p: ArmijoSGD(p),
     r"holds \['exp_avg', 'exp_avg_sq', 'step'\]; ArmijoSGD\(direction='sgd'\) continues from \[\]"),
])
def test_a_checkpoint_the_rules_cannot_continue_is_refused_and_changes_nothing(make, ours, match):
    model, theirs, loss_fn, f0 = _torch_run(make)
    opt = ours(model.parameters())
    opt.step(loss_fn=loss_fn, loss=f0)  # some state of its own to lose
    before = copy.deepcopy(opt.state_dict())
    # the refusal, not a warning that the load goes on (it came first: where warnings are
    # errors, it was all the caller saw)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=match):
        warnings.simplefilter("error")
        opt.load_state_dict(theirs.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["state"].keys() == before["state"].keys()
    for k, per in before["state"].items():
        assert all(torch.equal(v, after["state"][k][n]) for n, v in per.items())


@pytest.mark.parametrize("layerwise", [False, True], ids=["global", "layerwise"])
def test_a_checkpoint_with_a_learning_rate_per_group(layerwise):
    def two_groups(params):
        ps = list(params)
        return torch.optim.AdamW([{"params": ps[:2], "lr": 1e-3}, {"params": ps[2:], "lr": 1e-4}])

    model, adamw, loss_fn, f0 = _torch_run(two_groups)
    groups = [{"params": list(model.parameters())[:2]}, {"params": list(model.parameters())[2:]}]
    ours = ArmijoAdam(groups, backend="torch", layerwise=layerwise)
    ours.load_state_dict(copy.deepcopy(adamw.state_dict()))
    etas = [e for g in ours.param_groups for e in (
        g["step_size"] if isinstance(g["step_size"], list) else [g["step_size"]])]
    # one global step size is one number for every group; layer-wise, each block keeps its own
    assert etas == ([1e-3, 1e-4] if layerwise else [1e-3, 1e-3])
    ours.step(loss_fn=loss_fn, loss=f0)
    assert ours.stats["searched"] and float(loss_fn().detach()) < float(f0)


@pytest.mark.parametrize("make", [
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20),
    lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1),
])
def test_plain_sgd_meets_momentum_cycling_schedulers_as_torch_sgd_does(make):
    # torch's SGD has momentum 0 in its groups, so OneCycleLR / CyclicLR (cycle_momentum=True
    # by default) accept it; ArmijoSGD without momentum had no key and the scheduler raised
    # "optimizer must support momentum". Now the scheduler is built, and the momentum it
    # writes, which the plain direction cannot take, is refused by name at the step.
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    opt = ArmijoSGD(model.parameters(), lr=0.1)
    make(opt)
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    opt = ArmijoSGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20,
                                                cycle_momentum=False)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
        sched.step()
    assert opt.param_groups[0]["momentum"] == 0.0


def test_a_first_step_or_a_load_under_inference_mode_leaves_a_trainable_model():
    # The store built inside torch.inference_mode() was made of inference tensors: zero_grad
    # and every later backward through the model raised, as after a load in that mode.
    torch.manual_seed(0)
    model, x = nn.Linear(4, 1), torch.randn(8, 4)
    f = lambda: model(x).pow(2).mean()  # noqa: E731
    opt = ArmijoAdam(model.parameters(), cadence="every")
    model(x).pow(2).mean().backward()
    with torch.inference_mode():
        opt.step(loss_fn=f, loss=f())
    assert not any(p.is_inference() or p.grad.is_inference() for p in model.parameters())
    opt.step(make_closure(opt, f))  # zero_grad, backward: no error
    model2 = nn.Linear(4, 1)
    fresh = ArmijoAdam(model2.parameters(), cadence="every")
    with torch.inference_mode():
        fresh.load_state_dict(opt.state_dict())
    assert not any(p.is_inference() for p in model2.parameters())
    fresh.step(make_closure(fresh, lambda: model2(x).pow(2).mean()))


@pytest.mark.parametrize("value", ["float", "tensor"])
def test_step_returns_what_the_closure_returned(value):
    # torch's optimizers return the closure's own value; step returned a detached 0-dim tensor
    # (float64 for a float closure).
    model, x = nn.Linear(4, 1), torch.randn(8, 4)
    opt = ArmijoAdam(model.parameters(), cadence="every")
    returned = []

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        returned.append(loss.item() if value == "float" else loss)
        return returned[-1]

    out = opt.step(closure)
    assert out is returned[0]


def test_parameters_that_share_a_storage_are_warned_about():
    # Weights tied through .data (two Parameters, one storage) get a slot each in the flat
    # store and train apart, silently, where torch's optimizers keep them tied.
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight.data = emb.weight.data
    opt = ArmijoAdam([emb.weight, head.weight], cadence="every")
    x = torch.arange(5)
    with pytest.warns(UserWarning, match="share their memory .* train apart .* one Parameter"):
        opt.step(make_closure(opt, lambda: head(emb(x)).pow(2).mean()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the store's own shared buffer is not a tie
        opt.step(make_closure(opt, lambda: head(emb(x)).pow(2).mean()))
    # flat=False, which the warning advised, is no remedy (each tensor's own direction, the
    # backends disagreeing): said too; a frozen alias is not stepped there, so not a concern
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)  # (the store split those)
    head.weight.data = emb.weight.data
    in_place = ArmijoAdam([emb.weight, head.weight], cadence="every", flat=False)
    with pytest.warns(UserWarning, match="share their memory .* flat=False each is stepped"):
        in_place.step(make_closure(in_place, lambda: head(emb(x)).pow(2).mean()))
    emb.weight.requires_grad_(False)
    frozen_alias = ArmijoAdam([emb.weight, head.weight], cadence="every", flat=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frozen_alias.step(make_closure(frozen_alias, lambda: head(emb(x)).pow(2).mean()))
    # the alias outside the optimizer (filtered out by requires_grad) but in model=: the flat
    # store moved the other one out from under it, silently (a multi-model user's audit)
    model = nn.ModuleDict(dict(emb=nn.Embedding(5, 3), head=nn.Linear(3, 5, bias=False)))
    model.head.weight.data = model.emb.weight.data
    model.head.weight.requires_grad_(False)
    opt = ArmijoAdam(filter(lambda p: p.requires_grad, model.parameters()), model=model)
    with pytest.warns(UserWarning, match="share their memory .*head.weight"):
        opt.step(make_closure(opt, lambda: model.head(model.emb(x)).pow(2).mean()))
    # frozen tensors tied only to each other stay tied: nothing to say (a review)
    model = nn.ModuleDict(dict(emb=nn.Embedding(5, 3), head=nn.Linear(3, 5, bias=False),
                               out=nn.Linear(5, 1)))
    model.head.weight.data = model.emb.weight.data
    model.emb.requires_grad_(False)
    model.head.requires_grad_(False)
    opt = ArmijoAdam(model.out.parameters(), model=model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(make_closure(opt, lambda: model.out(model.head(model.emb(x))).pow(2).mean()))


def test_a_plain_sgd_checkpoint_is_refused_by_a_momentum_rule():
    # Plain ArmijoSGD's groups carry momentum=0 for the schedulers; loaded into
    # ArmijoSGD(momentum=0.9, nesterov=True) its checkpoint set μ to 0 without a word.
    model, x = nn.Linear(4, 1), torch.randn(8, 4)
    plain = ArmijoSGD(model.parameters())
    plain.step(make_closure(plain, lambda: model(x).pow(2).mean()))
    nesterov = ArmijoSGD(model.parameters(), momentum=0.9, nesterov=True)
    nesterov.step(make_closure(nesterov, lambda: model(x).pow(2).mean()))
    before = copy.deepcopy(nesterov.state_dict())
    with pytest.raises(ValueError, match="without momentum"):
        nesterov.load_state_dict(plain.state_dict())
    assert nesterov.param_groups[0]["momentum"] == 0.9
    assert nesterov.state_dict()["param_groups"] == before["param_groups"]


@pytest.mark.parametrize("cls, saved, loaded", [
    (ArmijoAdam, dict(direction="nadam"), dict()),
    (ArmijoSGD, dict(momentum=0.9, nesterov=True), dict(momentum=0.9)),
])
def test_a_checkpoint_of_a_sibling_direction_loads_with_a_warning(cls, saved, loaded):
    # adam and nadam (momentum and nesterov) keep the same state and hyperparameters: a resume
    # that forgot direction="nadam" went on with adam without a word. It still loads (the
    # moments are the same quantities), and says so; the same direction, a copy and a
    # checkpoint from before the record stay silent
    model, x = nn.Linear(4, 1), torch.randn(8, 4)
    first = cls(model.parameters(), **saved)
    first.step(make_closure(first, lambda: model(x).pow(2).mean()))
    sd = first.state_dict()
    assert sd["direction"] == first.rule.name
    other = cls(model.parameters(), **loaded)
    with pytest.warns(UserWarning, match=f"saved by an optimizer with direction "
                                         f"'{first.rule.name}'.*goes on with direction "
                                         f"'{other.rule.name}'") as caught:
        other.load_state_dict(sd)
    assert caught[0].filename == __file__
    assert torch.equal(other.state[model.weight]["exp_avg" if cls is ArmijoAdam
                                               else "momentum_buffer"],
                       first.state[model.weight]["exp_avg" if cls is ArmijoAdam
                                                 else "momentum_buffer"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(model.parameters(), **saved).load_state_dict(sd)
        copy.deepcopy(first)
        older = {k: v for k, v in sd.items() if k != "direction"}
        cls(model.parameters(), **loaded).load_state_dict(older)


def test_shared_memory_is_judged_on_dense_tensors_and_frozen_aliases_count():
    # Column slices of one matrix (disjoint elements, overlapping spans) were warned about as
    # tied; a frozen embedding tied through .data to a trained head was not.
    qkv = torch.randn(6, 12)
    parts = [nn.Parameter(qkv[:, i * 4:(i + 1) * 4]) for i in range(3)]
    opt = ArmijoAdam(parts, cadence="every")
    x = torch.randn(5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(make_closure(opt, lambda: sum((x @ p).pow(2).mean() for p in parts)))
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight.data = emb.weight.data
    emb.weight.requires_grad_(False)
    opt = ArmijoAdam([emb.weight, head.weight], cadence="every")
    with pytest.warns(UserWarning, match="share their memory"):
        opt.step(make_closure(opt, lambda: head(emb(torch.arange(5))).pow(2).mean()))


@pytest.mark.parametrize("source", ["armijo_before_any_step", "torch_sgd"])
def test_checkpoints_without_momentum_are_refused_by_a_momentum_rule_also_without_state(source):
    model = nn.Linear(4, 1)
    sd = (ArmijoSGD(model.parameters()) if source.startswith("armijo")
          else torch.optim.SGD(model.parameters(), lr=0.1)).state_dict()
    opt = ArmijoSGD(model.parameters(), momentum=0.9)
    with pytest.raises(ValueError, match="without momentum"):
        opt.load_state_dict(sd)


def test_a_momentum_config_with_one_group_at_momentum_0_reloads_its_own_checkpoint():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    groups = lambda: [{"params": model[0].parameters(), "momentum": 0.0},  # noqa: E731
                      {"params": model[1].parameters()}]
    sd = ArmijoSGD(groups(), momentum=0.9).state_dict()  # before any step: no state
    opt = ArmijoSGD(groups(), momentum=0.9)
    opt.load_state_dict(sd)
    assert [g["momentum"] for g in opt.param_groups] == [0.0, 0.9]


def test_a_torch_checkpoint_whose_tensors_were_stepped_unevenly_warns():
    # AdamW skips a tensor whose gradient is None (an unused head): its step lags; here the
    # group shares one bias-correction count, the largest, which was taken without a word
    model = nn.ModuleDict({"a": nn.Linear(3, 3), "b": nn.Linear(3, 1)})
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for k in range(4):
        adamw.zero_grad(set_to_none=True)
        out = model["a"](torch.randn(2, 3))
        if k < 2:
            out = model["b"](out)
        out.sum().backward()
        adamw.step()
    opt = ArmijoAdam(model.parameters(), backend="torch")
    with pytest.warns(UserWarning, match=r"stepped different numbers of times \(group 0: 2 to 4\)"):
        opt.load_state_dict(adamw.state_dict())
    assert opt.param_groups[0]["folded"] == 4
    even = ArmijoAdam(model.parameters(), backend="torch")
    for p in model.parameters():  # (all at 4 steps: no warning)
        adamw.state[p]["step"] = torch.tensor(4.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        even.load_state_dict(adamw.state_dict())


def test_zero_grad_is_named_in_a_profiler_trace_as_torchs():
    # once the flat store existed, zero_grad no longer recorded torch's event (API audit)
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    x = torch.randn(8, 3)
    opt = ArmijoAdam(model.parameters(), backend="torch")
    closure = make_closure(opt, lambda: model(x).pow(2).mean())
    opt.step(closure)  # builds the store
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
        opt.step(closure)
    names = [e.name for e in prof.events()]
    assert names.count("Optimizer.zero_grad#ArmijoAdam.zero_grad") >= 2  # ours, the closure's
    assert names.count("Optimizer.step#ArmijoAdam.step") == 1


@pytest.mark.parametrize("cls", [ArmijoAdam, ArmijoSGD])
def test_repr_is_torchs_listing_without_the_checkpoint_only_entries(cls):
    m = nn.Linear(3, 2)
    opt = cls([{"params": [m.weight]}, {"params": [m.bias], "weight_decay": 0.1}])
    x = torch.randn(8, 3)
    opt.step(make_closure(opt, lambda: m(x).square().mean()))  # live: those entries stay None
    torchs = torch.optim.Optimizer.__repr__(opt).splitlines()
    hidden = [line for line in torchs
              if line.split(":")[0].strip() in ("last_dd", "last_dd_trainable", "forward_writes")]
    assert hidden, "the live first group holds the checkpoint-only entries"
    assert repr(opt).splitlines() == [line for line in torchs if line not in hidden]
    assert "weight_decay: 0.1" in repr(opt) and "Parameter Group 1" in repr(opt)


def test_a_step_from_a_gradient_hook_is_refused_by_name():
    # the "optimizer in backward" pattern (one optimizer per tensor, stepped as its gradient is
    # accumulated) ran a search per tensor inside backward, each testing a gradient taken
    # before the later tensors moved, in silence
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 4)
    loss_fn = lambda: model(x).square().mean()  # noqa: E731
    opts = {p: ArmijoAdam([p]) for p in model.parameters()}
    hooks = [p.register_post_accumulate_grad_hook(lambda p: opts[p].step(loss_fn=loss_fn))
             for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="step\\(\\) called during a backward pass"):
        loss_fn().backward()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    for h in hooks:
        h.remove()
    opt = next(iter(opts.values()))  # (after backward, the same optimizer steps)
    opt.step(loss_fn=loss_fn)
    assert opt.param_groups[0]["step"] == 1


def test_a_state_dict_post_hook_returning_a_dict_replaces_it():
    model = nn.Linear(4, 1)
    opt = ArmijoAdam(model.parameters())
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    assert opt.state_dict()["extra"] == 1


def test_steps_from_a_worker_thread():
    import threading

    model = nn.Linear(4, 1)
    opt = ArmijoAdam(model.parameters(), cadence="every")
    closure = make_closure(opt, lambda: model(torch.ones(2, 4)).square().mean())
    errors = []

    def worker():
        try:
            for _ in range(3):
                opt.step(closure)
        except Exception as e:  # (a thread's exception would not reach the test)
            errors.append(e)

    t = threading.Thread(target=worker)
    t.start()
    t.join(timeout=60)
    assert not errors and opt.param_groups[0]["step"] == 3


@pytest.mark.timeout(120)
def test_two_threads_training_two_models_keep_their_backward():
    """Two threads, each training its own model with its own optimizer (an audit's case): a
    backward and a zero_grad the second thread runs while the first one's trial forward runs
    are its own training's, not suppressed; its own step, searching while the first one's
    trial waits, works; and torch's functions are the originals afterwards (each thread putting
    back what it found at its trial's start left the no-ops installed for good)."""
    import threading

    originals = (torch.Tensor.backward, torch.autograd.backward, nn.Module.zero_grad,
                 torch.optim.Optimizer.zero_grad, torch.set_rng_state)
    a_in_trial, b_done = threading.Event(), threading.Event()
    errors, seen = [], {}

    def thread_a():
        try:
            model = nn.Linear(6, 1)
            opt = ArmijoAdam(model.parameters(), cadence="every")
            x = torch.randn(16, 6)

            def closure():
                if torch.is_grad_enabled():  # the training call
                    opt.zero_grad()
                    loss = model(x).square().mean()
                    loss.backward()
                    return loss
                if not a_in_trial.is_set():  # the first trial: b trains and steps meanwhile
                    a_in_trial.set()
                    b_done.wait(30)
                return model(x).square().mean()

            for _ in range(2):
                opt.step(closure)
            seen["a"] = opt.stats["step_size"]
        except Exception as e:  # (a thread's exception would not reach the test)
            errors.append(e)

    def thread_b():
        try:
            model = nn.Linear(6, 1)
            opt = ArmijoAdam(model.parameters(), cadence="every")
            x = torch.randn(16, 6)
            a_in_trial.wait(30)
            seen["overlap"] = in_trial()  # (a's trial runs now: what follows overlaps it)
            model.weight.grad = torch.ones_like(model.weight)
            opt.zero_grad(set_to_none=False)  # (no store yet: torch's zero_grad, in place)
            seen["zeroed"] = bool((model.weight.grad == 0).all())
            loss = model(x).square().mean()
            loss.backward()
            seen["b grad"] = model.weight.grad.clone()
            seen["b expected"] = torch.autograd.grad(model(x).square().mean(), model.weight)[0]
            for _ in range(2):
                opt.step(make_closure(opt, lambda: model(x).square().mean()))
            seen["b"] = opt.stats["step_size"]
        except Exception as e:
            errors.append(e)
        finally:
            b_done.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert seen["overlap"]
    assert seen["zeroed"] and torch.allclose(seen["b grad"], seen["b expected"])
    assert seen["a"] > 0 and seen["b"] > 0
    assert (torch.Tensor.backward, torch.autograd.backward, nn.Module.zero_grad,
            torch.optim.Optimizer.zero_grad, torch.set_rng_state) == originals


def test_one_optimizer_stepped_from_two_threads_at_once_is_told_so():
    import threading

    model = nn.Linear(4, 1)
    opt = ArmijoAdam(model.parameters(), cadence="every")
    x = torch.randn(8, 4)
    inside, errors = threading.Event(), []

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        if not inside.is_set():
            inside.set()
            worker = threading.Thread(target=second)
            worker.start()
            worker.join(timeout=30)
        return loss

    def second():
        try:
            opt.step(closure)
        except RuntimeError as e:
            errors.append(str(e))

    opt.step(closure)
    assert len(errors) == 1 and "from another thread while this optimizer's step runs" in errors[0]
    assert opt.param_groups[0]["step"] == 1


@pytest.mark.timeout(120)
def test_one_optimizer_stepped_by_two_threads_together_runs_one_step_at_a_time():
    # (an audit's race: the guard read _in_step and a later line set it, so both threads could
    # pass it; 5 of 30 runs stepped together and lost a step). Switching threads as often as
    # the interpreter allows, each pair of calls gives one step and one refusal, or two steps
    import sys
    import threading

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            model = nn.Linear(4, 1)
            x = torch.randn(8, 4)
            opt = ArmijoAdam(model.parameters(), cadence="every")
            closure = make_closure(opt, lambda model=model, x=x: model(x).square().mean())
            inside, most = [0], [0]
            real = opt._step

            def counted(*args, real=real, inside=inside, most=most, **kwargs):
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                try:
                    return real(*args, **kwargs)
                finally:
                    inside[0] -= 1

            opt._step = counted
            barrier, said = threading.Barrier(2), []

            def go(opt=opt, closure=closure, barrier=barrier, said=said):
                barrier.wait()
                try:
                    opt.step(closure)
                    said.append("stepped")
                except RuntimeError as e:
                    said.append("refused" if "another thread" in str(e) else str(e))

            threads = [threading.Thread(target=go) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert most[0] == 1
            assert sorted(said) in (["refused", "stepped"], ["stepped", "stepped"]), said
            assert opt.param_groups[0]["step"] == said.count("stepped")
    finally:
        sys.setswitchinterval(interval)


def test_the_stats_of_a_step_without_a_search_do_not_keep_the_optimizer_alive():
    # its lazy values held the step's passes, which hold the optimizer: the two held each
    # other (del opt freed nothing until the cycle collector ran) and a stats object kept for
    # logging held θ, g, m and v for good
    import gc
    import weakref

    model = nn.Linear(64, 64)
    x = torch.randn(8, 64)
    opt = ArmijoAdam(model.parameters(), cadence=1000)
    for _ in range(3):
        opt.step(make_closure(opt, lambda: model(x).square().mean()))
    assert not opt.stats["searched"]
    kept = opt.stats
    gone = weakref.ref(opt), weakref.ref(opt.state[model.weight]["exp_avg_sq"])
    enabled = gc.isenabled()
    gc.disable()
    try:
        del opt
        assert all(ref() is None for ref in gone)
    finally:
        if enabled:
            gc.enable()
    assert kept["step_size"] > 0 and not kept["skipped"] and kept["grad_norm"] > 0
    assert math.isfinite(kept["gd"]) and kept["applied_step"] > 0


def test_load_state_dict_again_and_again_keeps_no_record_of_the_replaced_groups():
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = ArmijoAdam(model.parameters())
    opt.step(make_closure(opt, lambda: model(x).square().mean()))
    saved = opt.state_dict()
    for _ in range(30):
        opt.load_state_dict(saved)
        opt.step(make_closure(opt, lambda: model(x).square().mean()))
    assert len(opt.__dict__.get("_lr_seen", {})) <= len(opt.param_groups)
