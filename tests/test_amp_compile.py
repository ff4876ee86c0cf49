"""GradScaler (``scaler.step(opt, loss_fn=...)``), autocast, and torch.compile'd models, on CPU."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from problems import make_closure
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD

pytestmark = [pytest.mark.timeout(300)]


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 1))


def batch(step):
    g = torch.Generator().manual_seed(step)
    x = torch.randn(64, 8, generator=g)
    return x, torch.cos(x[:, :1] * 2) + x[:, 1:2]


def snapshot(opt, model):
    return ([p.detach().clone() for p in model.parameters()],
            {k: (v.clone() if isinstance(v, torch.Tensor) else v)
             for st in opt.state.values() for k, v in st.items()},
            [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups])


def plain_and_scaled():
    """Two identical models and optimizers, the second to step through a GradScaler (2^10)."""
    plain, scaled = make_model(), make_model()
    opt_p = ArmijoAdam(plain.parameters(), model=plain, cadence="every", backend="torch")
    opt_s = ArmijoAdam(scaled.parameters(), model=scaled, cadence="every", backend="torch")
    return plain, opt_p, scaled, opt_s, torch.amp.GradScaler("cpu", init_scale=2.0**10)


def test_gradscaler_step_with_loss_fn_matches_the_unscaled_run():
    plain, opt_p, scaled, opt_s, scaler = plain_and_scaled()
    for step in range(4):
        x, y = batch(step)
        opt_p.zero_grad()
        loss = nn.functional.mse_loss(plain(x), y)
        loss.backward()
        opt_p.step(loss_fn=lambda x=x, y=y: nn.functional.mse_loss(plain(x), y), loss=loss)

        opt_s.zero_grad()
        loss = nn.functional.mse_loss(scaled(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt_s, loss_fn=lambda x=x, y=y: nn.functional.mse_loss(scaled(x), y),
                    loss=loss)
        scaler.update()
        assert opt_s.stats["step_size"] == opt_p.stats["step_size"]
    # scaling by a power of two is exact, so the unscaled gradients are the plain ones
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["loss=", "provide_loss", "closure"])
def test_a_loss_handed_over_scaled_is_refused_and_the_step_undone(form):
    # scaler.scale(loss) as the step's f0 is compared with unscaled trial losses: every first
    # trial passed (f0 1024x too high) and eta grew by the growth factor at every search
    _, _, model, opt, scaler = plain_and_scaled()
    x, y = batch(0)
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    scaled = scaler.scale(loss)
    scaled.backward()
    before = snapshot(opt, model)

    def loss_fn():
        return nn.functional.mse_loss(model(x), y)

    def closure():
        opt.zero_grad()
        out = scaler.scale(loss_fn())
        out.backward()
        return out

    with pytest.raises(ValueError, match=r"looks like scaler\.scale\(loss\)"):
        if form == "loss=":
            scaler.step(opt, loss_fn=loss_fn, loss=scaled)
        elif form == "provide_loss":
            opt.set_closure(loss_fn)
            opt.provide_loss(scaled)
            scaler.step(opt)
        else:  # (a closure that serves the trials too returns them scaled alike)
            scaler.step(opt, closure, loss_fn=loss_fn)
    # undone, to the rounding of taking the step back out (no exact_revert)
    after = snapshot(opt, model)
    for a, b in zip(before[0], after[0]):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert not before[1]  # (the first step: the state is built, its moments still 0)
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(after[1][key], torch.zeros_like(after[1][key]),
                                   rtol=0, atol=1e-12)
    counted = ("forwards", "backwards")  # (the work done is counted, as after any failure)
    assert [{k: v for k, v in g.items() if k not in counted} for g in before[2]] == \
        [{k: v for k, v in g.items() if k not in counted} for g in after[2]]
    assert opt.param_groups[0]["step"] == 0


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("scale", [16.0, 2.0**16])
def test_the_scaled_loss_check_compares_with_the_loss_at_theta0_not_with_a_trial(scaled, scale):
    # ArmijoSGD's first trial (eta 1.2) cuts this quadratic's loss by the scale: the check
    # compared f0 with that trial's loss, refused the correct, unscaled loss, and missed the
    # scaled one wherever the first trial raised the loss (the true loss then grew 4 -> 1e12)
    ratio = scale
    lam = (1.0 - ratio ** -0.5) / 1.2  # the first trial lands at f0 / ratio
    w = nn.Parameter(torch.zeros(4))

    def loss_fn():
        return 0.5 * lam * ((w - 1.0) ** 2).sum()

    opt = ArmijoSGD([w], cadence="every", backend="torch")
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    loss = loss_fn()
    handed = scaler.scale(loss)
    handed.backward()
    if scaled:
        with pytest.raises(ValueError, match=r"looks like scaler\.scale\(loss\)"):
            scaler.step(opt, loss_fn=loss_fn, loss=handed)
        assert torch.equal(w.detach(), torch.zeros(4)) and opt.param_groups[0]["step"] == 0
    else:
        scaler.step(opt, loss_fn=loss_fn, loss=loss)
        assert opt.stats["loss_before"] / opt.stats["loss_trial"] == pytest.approx(ratio,
                                                                                   rel=1e-3)
        assert opt.param_groups[0]["step"] == 1


@pytest.mark.parametrize("unscaled_first", [False, True], ids=["step", "unscale_-then-step"])
def test_gradscaler_step_with_a_positional_closure_matches_the_unscaled_run(unscaled_first):
    # scaler.step(opt, closure): GradScaler refuses only a keyword closure and unscales the
    # gradients that exist before step(); the closure then recomputed them scaled (x 2^10), so
    # every search saw a gradient 1024x too long. accelerate's optimizer wrapper calls it so.
    plain, opt_p, scaled, opt_s, scaler = plain_and_scaled()
    for step in range(4):
        x, y = batch(step)

        def closure_p(x=x, y=y):
            opt_p.zero_grad()
            loss = nn.functional.mse_loss(plain(x), y)
            loss.backward()
            return loss

        def closure_s(x=x, y=y):
            opt_s.zero_grad()
            loss = nn.functional.mse_loss(scaled(x), y)
            scaler.scale(loss).backward()
            return loss

        opt_p.step(closure_p)
        closure_s()  # the scaler's inf check needs the scaled gradients before step()
        if unscaled_first:
            scaler.unscale_(opt_s)  # (to clip them, say)
        scaler.step(opt_s, closure_s)
        scaler.update()
        assert opt_s.stats["step_size"] == opt_p.stats["step_size"]
        torch.testing.assert_close(opt_s.stats["grad_norm"], opt_p.stats["grad_norm"])
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(p.grad.abs().max() < 10 for p in scaled.parameters())  # left unscaled


@pytest.mark.parametrize("how", ["loss only", "grads assigned to .data"])
def test_gradscaler_step_with_a_closure_that_only_returns_the_loss_unscales_once(how):
    # gradients computed before the step, then scaler.step(opt, closure) with a closure that
    # calls no backward (legal for torch.optim, which just calls it): GradScaler had unscaled
    # them, and the step divided them by the scale a second time (1024x too small). A closure
    # that writes them through p.grad.data = ... (no version bump) is still unscaled once
    plain, opt_p, scaled, opt_s, scaler = plain_and_scaled()
    for step in range(4):
        x, y = batch(step)
        opt_p.zero_grad()
        nn.functional.mse_loss(plain(x), y).backward()
        opt_p.step(lambda x=x, y=y: nn.functional.mse_loss(plain(x), y))
        opt_s.zero_grad()
        scaler.scale(nn.functional.mse_loss(scaled(x), y)).backward()

        def closure(x=x, y=y):
            loss = nn.functional.mse_loss(scaled(x), y)
            if how == "grads assigned to .data" and torch.is_grad_enabled():  # (not in trials)
                params = list(scaled.parameters())
                for p, g in zip(params, torch.autograd.grad(scaler.scale(loss), params)):
                    p.grad.data = g
            return loss

        scaler.step(opt_s, closure)
        scaler.update()
        torch.testing.assert_close(opt_s.stats["grad_norm"], opt_p.stats["grad_norm"])
        assert opt_s.stats["step_size"] == opt_p.stats["step_size"]
    for p, q in zip(plain.parameters(), scaled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_gradscaler_overflow_skips_the_step_and_leaves_state_untouched():
    model = make_model()
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    calls = []

    def step(x, y, poison=False):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if poison:
            with torch.no_grad():
                next(model.parameters()).grad[0, 0] = float("inf")  # what an fp16 overflow gives

        def loss_fn():
            calls.append(1)
            return nn.functional.mse_loss(model(x), y)

        scaler.step(opt, loss_fn=loss_fn, loss=loss)
        scaler.update()

    step(*batch(0))
    before = snapshot(opt, model)
    scale_before, n_calls = scaler.get_scale(), len(calls)
    step(*batch(1), poison=True)
    after = snapshot(opt, model)
    assert scaler.get_scale() < scale_before  # the scaler saw the overflow
    assert len(calls) == n_calls  # no trial forward ran
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    assert before[1].keys() == after[1].keys()
    for k in before[1]:
        assert torch.equal(before[1][k], after[1][k]) if isinstance(before[1][k], torch.Tensor) \
            else before[1][k] == after[1][k]
    assert before[2] == after[2]  # step counter, step size, cadence untouched
    step(*batch(2))  # and training goes on
    assert opt.param_groups[0]["step"] == 2


def test_bf16_autocast_trials_run_under_the_same_autocast():
    # (the loss function enters autocast itself, so a dtype check alone could not fail: the
    # trials must have run through it, and the losses the search judged must be its bf16 ones)
    from armijo_fused import in_trial

    model = make_model()
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
    seen = []  # (in a trial?, output dtype) of every forward
    trials = 0
    for step in range(3):
        x, y = batch(step)

        def loss_fn(x=x, y=y):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            seen.append((in_trial(), out.dtype))
            return nn.functional.mse_loss(out.float(), y)

        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss_fn=loss_fn, loss=loss)
        s = opt.stats
        assert s["searched"] and s["trials"] >= 1 and s["step_size"] > 0
        trials += s["trials"]
        assert s["loss_after"] <= s["loss_before"] - opt.c * s["step_size"] * s["gd"] + 1e-6
        with torch.no_grad():
            at_new = float(loss_fn(x, y))  # (a forward of the test's own, not a trial)
            in_fp32 = float(nn.functional.mse_loss(model(x), y))
        # the accepted trial's loss is the bf16-autocast loss at the new point, bit for bit,
        # not the fp32 one
        assert s["loss_after"] == at_new != in_fp32
    # every trial ran through the loss function, and the first search's check of it at θ0
    # (not counted in forwards; under the same autocast it gave the training loss: no warning)
    assert sum(trial for trial, _ in seen) == trials + 1
    assert {dtype for _, dtype in seen} == {torch.bfloat16}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_trains_like_the_eager_one(backend):
    eager = make_model()
    compiled_base = copy.deepcopy(eager)
    compiled = torch.compile(compiled_base, backend=backend)
    opt_e = ArmijoAdam(eager.parameters(), model=eager, cadence="every")
    opt_c = ArmijoAdam(compiled_base.parameters(), model=compiled_base, cadence="every")
    for step in range(4):
        x, y = batch(step)
        for model, opt in ((eager, opt_e), (compiled, opt_c)):
            def closure(model=model, opt=opt, x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)  # trials run the compiled forward under no_grad
        assert opt_c.stats["trials"] == opt_e.stats["trials"]
        assert opt_c.stats["step_size"] == pytest.approx(opt_e.stats["step_size"], rel=1e-6)
    for p, q in zip(eager.parameters(), compiled_base.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    # the flat store re-pointed the parameters after compilation; the graph still reads them
    with torch.no_grad():
        x, _ = batch(99)
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-5)


def test_a_compiled_training_step_runs_the_optimizer_step_eagerly():
    # torch.compile of a function that calls opt.step: the step is not traced (it reads losses
    # on the host); traced, it specialised on every step size and recompiled at each step
    import torch._dynamo

    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = make_model()
        opt = ArmijoAdam(model.parameters(), model=model, cadence="every")

        def train_step(x, y, model=model, opt=opt):
            def closure():
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            return opt.step(closure)

        fn = torch.compile(train_step, backend="eager") if compiled else train_step
        with torch._dynamo.config.patch(error_on_recompile=compiled), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(6):
                fn(*batch(step))
        runs.append([p.detach().clone() for p in model.parameters()])
        # ... and says so, once: the closure's forward and backward ran eagerly too (an audit's
        # compiled step with dropout and loss= compared inductor's masks with eager trials')
        said = [w for w in caught if "torch.compile'd function" in str(w.message)]
        assert len(said) == int(compiled), [str(w.message) for w in caught]
        assert not said or said[0].filename == __file__
    assert all(torch.equal(p, q) for p, q in zip(*runs))


def test_a_compiled_model_stepped_from_eager_code_is_not_taken_for_a_compiled_step():
    import torch._dynamo

    torch._dynamo.reset()
    model = make_model()
    compiled = torch.compile(model, backend="eager")
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            x, y = batch(step)
            opt.step(make_closure(opt, lambda: nn.functional.mse_loss(compiled(x), y)))
    assert not [w for w in caught if "torch.compile'd function" in str(w.message)]


def test_gradscaler_through_an_optimizer_wrapper_sharing_our_groups():
    class Wrapper(torch.optim.Optimizer):  # Lookahead-style: shares the inner's groups
        def __init__(self, inner):
            self.inner = inner
            self.param_groups, self.state, self.defaults = (inner.param_groups, inner.state,
                                                            inner.defaults)
            self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}

        def step(self, closure=None):
            return self.inner.step(closure)

    norms = {}
    for wrap in (False, True):
        model = make_model()
        opt = ArmijoAdam(model.parameters(), model=model, cadence="every", backend="torch")
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        x, y = batch(0)

        def closure(model=model, opt=opt, scaler=scaler, x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            scaler.scale(loss).backward()
            return loss

        closure()
        scaler.step(Wrapper(opt) if wrap else opt, closure)
        norms[wrap] = opt.stats["grad_norm"]
    assert norms[True] == pytest.approx(norms[False], rel=1e-6)


def test_looking_for_the_gradscaler_keeps_no_deleted_tensor_alive():
    # reading the callers' f_locals on Python <= 3.12 would leave a snapshot on each frame that
    # keeps a tensor the loop deletes after the step alive (on 3.13 and later it cannot fail)
    import gc
    import weakref

    model = make_model()
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every", backend="torch")
    x, y = batch(0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    def loop():
        big = torch.empty(1000)
        ref = weakref.ref(big)
        opt.step(closure)
        del big
        gc.collect()
        return ref() is None

    assert loop()


def test_a_sparse_gradient_under_a_gradscaler_closure_gets_the_named_error():
    # reading a sparse gradient's storage for the unscale-once check raised torch's "Cannot
    # access data pointer of Tensor that doesn't have storage" before the step's own refusal
    emb = nn.Embedding(10, 3, sparse=True)
    opt = ArmijoAdam(emb.parameters(), model=emb, backend="torch")
    idx = torch.tensor([1, 2, 3])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)

    def closure():
        opt.zero_grad()
        loss = emb(idx).pow(2).sum()
        loss.backward()
        return loss

    opt.zero_grad()
    scaler.scale(emb(idx).pow(2).sum()).backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="do not support sparse gradients"):
        scaler.step(opt, closure)
    assert torch.equal(emb.weight.detach(), before)


def test_a_compiled_step_behind_a_disabled_helper_is_said_and_nothing_under_compile_disable():
    # the compiled function may reach step() through a helper of its own under
    # torch.compiler.disable (the first wrapper above the step then shows no compiled caller);
    # with dynamo's config.disable (TORCH_COMPILE_DISABLE=1) nothing is compiled: no warning
    import torch._dynamo

    def said(config_disable):
        torch._dynamo.reset()
        model = make_model()
        opt = ArmijoAdam(model.parameters(), cadence="every")

        @torch.compiler.disable
        def do_step(x, y):
            opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))

        def train_step(x, y):
            do_step(x, y)
            return x.sum()

        fn = torch.compile(train_step, backend="eager")
        with torch._dynamo.config.patch(disable=config_disable), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(2):
                fn(*batch(step))
        return [w for w in caught if "torch.compile'd function" in str(w.message)]

    assert len(said(False)) == 1
    assert said(True) == []


def test_the_overflows_of_a_closure_a_grad_scaler_hands_over_are_not_warned_of():
    # scaler.step(opt, closure) (accelerate's fp16 wrapper): the closure's scaled gradient
    # overflows at a large scale, routinely at fp16's start; the step skips, as GradScaler would
    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = ArmijoAdam(model.parameters(), cadence="every")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean() * 1e3
        scaler.scale(loss).backward()
        return loss

    scaler.scale(torch.ones(()))  # (the scaler's scale tensor exists before its step)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scaler.step(opt, closure)
        scaler.update()
    assert opt.stats["skipped"]
    assert not [w for w in caught if "was skipped" in str(w.message)]
