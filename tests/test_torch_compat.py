"""Drop-in construction: code written for torch.optim.AdamW / SGD runs with the class swapped.

nanoGPT, torchtitan and config-driven trainers build optimizers with torch's positional order and
keywords (``fused=True``, ``foreach``, ``nesterov``); SGD code chooses momentum by its value.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD

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


def _train(make_opt, steps=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1))
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
    return all(torch.equal(p, q) for p, q in zip(a[1], b[1]))


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
    (ArmijoAdam, dict(maximize=True), "maximize"),
    (ArmijoAdam, dict(capturable=True), "capturable"),
    (ArmijoSGD, dict(differentiable=True), "differentiable"),
    (ArmijoAdam, dict(fused="yes"), "fused must be None or a bool"),
    (ArmijoSGD, dict(momentum=0.9, dampening=0.1), "dampening"),
    (ArmijoSGD, dict(nesterov=True), "nesterov=True needs momentum"),
    (ArmijoSGD, dict(momentum=0.9, nesterov=True, direction="momentum"), "contradicts"),
    (ArmijoSGD, dict(momentum=0.9, direction="sgd"), "takes no momentum"),
    (ArmijoSGD, dict(direction="adam"), "invalid direction for ArmijoSGD"),
    (ArmijoSGD, dict(momentum="0.9"), "invalid momentum"),
])
def test_torch_options_that_are_not_implemented_are_refused_by_name(cls, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        cls(nn.Linear(3, 1).parameters(), **kw)


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
