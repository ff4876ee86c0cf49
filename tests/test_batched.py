"""Batched candidate evaluation (issue 5): the same accepted step as sequential backtracking."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from problems import make_closure
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD


def _mlp():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    return model, torch.randn(64, 8), torch.randn(64, 1)


def _run(cls, candidates, steps=8, seed=0, backend="torch", build=_mlp, **kw):
    torch.manual_seed(seed)
    model, x, y = build()
    opt = cls(model.parameters(), cadence="every", model=model, candidates=candidates,
              backend=backend, **kw)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    trace = []
    for _ in range(steps):
        opt.step(closure)
        trace.append((opt.stats["step_size"], opt.stats["trials"], opt.stats["non_descent"]))
    return trace, opt.param_groups[0]["forwards"], [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls,kw", [
    (ArmijoSGD, {"direction": "sgd", "init_step_size": 10.0}),   # several trials at first
    # momentum may point uphill (searched along it, as batched candidates are: the sequential
    # default searches η along g, momentum_search="gradient")
    (ArmijoSGD, {"direction": "momentum", "momentum": 0.99, "momentum_search": "direction"}),
    (ArmijoAdam, {"init_step_size": 1.0}),
    (ArmijoAdam, {"direction": "nadam", "weight_decay": 0.1}),
])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_batched_accepts_the_step_sequential_backtracking_accepts(cls, kw, k):
    seq, seq_forwards, seq_params = _run(cls, None, **kw)
    bat, bat_forwards, bat_params = _run(cls, k, **kw)
    assert [t[0] for t in bat] == [t[0] for t in seq]  # the same accepted η, bit for bit
    assert [t[2] for t in bat] == [t[2] for t in seq]  # the same fallbacks to precond
    # the same trials counted: the candidates judged, and the non-descent one (the sequential
    # search's spent trial; here a discarded round) as one
    assert [t[1] for t in bat] == [t[1] for t in seq]
    for p, q in zip(bat_params, seq_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if any(t[1] > 1 for t in seq):
        assert bat_forwards < seq_forwards  # fewer dependent forwards when trials > 1
    else:  # every search accepted its first trial: one batched forward stands for it
        assert bat_forwards == seq_forwards


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs triton (interpreted on CPU or a GPU)")
@pytest.mark.parametrize("cls,kw", [
    (ArmijoSGD, {"direction": "sgd", "init_step_size": 10.0}),
    (ArmijoAdam, {"direction": "nadam", "weight_decay": 0.1, "init_step_size": 1.0}),
])
def test_batched_on_triton_accepts_what_the_torch_reference_accepts(cls, kw):
    """The trial points come from the Triton kernel (kernels/candidates.py) on this backend."""
    ref, _, ref_params = _run(cls, 3, **kw)
    got, _, got_params = _run(cls, 3, backend="triton", **kw)
    assert [t[:2] for t in got] == [t[:2] for t in ref] and any(t[1] > 1 for t in ref)
    for p, q in zip(got_params, ref_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_batched_search_with_no_acceptable_step_takes_no_step():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(16, 4)
    opt = ArmijoSGD(model.parameters(), cadence="every", model=model, candidates=4, max_trials=3,
                    init_step_size=1e6, backend="torch")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.stats["exhausted"] and opt.stats["trials"] == 3
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("candidates", [None, 4], ids=["sequential", "batched"])
def test_a_skipped_search_reports_the_one_trial_it_spent(candidates):
    # the batched search reported the round's K step sizes, none of which it judged
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(16, 4)
    opt = ArmijoSGD(model.parameters(), cadence="every", model=model, candidates=candidates,
                    backend="torch")
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        if model.weight.grad is not None:  # (the training call; the trials have none)
            model.weight.grad[0, 0] = float("nan")
        return loss

    opt.step(closure)
    assert opt.stats["skipped"] and opt.stats["searched"] and opt.stats["trials"] == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_candidates_argument_is_checked():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="candidates needs model="):
        ArmijoAdam(model.parameters(), candidates=4)
    with pytest.raises(ValueError, match="invalid candidates"):
        ArmijoAdam(model.parameters(), candidates=1, model=model)
    with pytest.raises(ValueError, match="global search"):
        ArmijoAdam(model.parameters(), candidates=4, model=model, layerwise=True)


def test_batched_trial_points_keep_a_channels_last_layout():
    # the K trial points are read from the flat buffer in the parameter's own element order
    def conv():
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 1))
        model = model.to(memory_format=torch.channels_last)
        return model, torch.randn(16, 3, 6, 6), torch.randn(16, 1)

    seq, _, seq_params = _run(ArmijoAdam, None, steps=5, build=conv, init_step_size=1.0)
    bat, _, bat_params = _run(ArmijoAdam, 4, steps=5, build=conv, init_step_size=1.0)
    assert any(trials > 1 for _, trials, _ in seq)  # the candidates were needed
    assert [t[0] for t in bat] == [t[0] for t in seq]
    for p, q in zip(bat_params, seq_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_batchnorm_in_training_mode_is_refused_by_name_before_anything_moves():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 1))
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    opt = ArmijoAdam(model.parameters(), model=model, candidates=3, cadence="every")

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"candidates=.*\b1\b.*BatchNorm1d.*training mode"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))
    assert all(not s or all(not v.any() for v in s.values() if torch.is_tensor(v))
               for s in opt.state.values())  # no moments were folded
    model.eval()  # statistics frozen: batchable (dropout would be too)
    opt.step(closure)
    assert opt.stats["step_size"] > 0


@pytest.mark.parametrize("form", ["dict", "tuple"])
def test_a_closure_returning_a_structure_works_with_candidates(form):
    # the sequential search takes {"loss": ...} and (loss, logits); candidates raised
    # "must return a scalar tensor"
    def build():
        return _mlp()

    traces = []
    for candidates in (None, 3):
        torch.manual_seed(0)
        model, x, y = build()
        opt = ArmijoAdam(model.parameters(), cadence="every", model=model, backend="torch",
                         candidates=candidates, init_step_size=1.0)

        def closure():
            opt.zero_grad()
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            loss.backward()
            return {"loss": loss, "logits": out} if form == "dict" else (loss, out)

        for _ in range(4):
            opt.step(closure)
        traces.append(opt.param_groups[0]["step_size"])
    assert traces[0] == traces[1]


@pytest.mark.parametrize("form", ["closure", "loss_fn", "forward"])
def test_a_loss_read_as_a_number_is_refused_by_name_with_candidates_and_undone(form):
    # the sequential search takes a float (loss.item()); under vmap torch raised "please file a
    # bug report" at every step. Now an error that says what to return, and nothing moved
    torch.manual_seed(0)
    model, x, y = _mlp()
    opt = ArmijoAdam(model.parameters(), model=model, candidates=2, cadence="every")

    def loss_of():
        out = model(x)
        if form == "forward" and out.sum() > -1e9:  # an `if` on a tensor inside the forward
            out = out * 1.0
        loss = nn.functional.mse_loss(out, y)
        return loss if form == "forward" else loss.item()

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss.item() if form == "closure" else loss

    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"candidates= evaluates the loss .* under "
                       r"torch.func.vmap, where no tensor's value can be read: return the loss "
                       r"tensor itself \(not loss.item\(\).*candidates=None\)"):
        if form == "closure":
            opt.step(closure)
        else:
            loss = closure()
            opt.step(loss_fn=loss_of, loss=loss)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), theta))
    assert opt.param_groups[0]["step"] == 0
    assert all(v.abs().max() == 0 for p in model.parameters() for v in opt.state[p].values())
    # the same loop with the loss returned as a tensor steps
    opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
    assert opt.param_groups[0]["step"] == 1


def test_a_parameter_outside_the_model_is_refused_by_name_with_candidates():
    # a bare KeyError (the tensor's id) at the first search, after the first pass
    torch.manual_seed(0)
    model, x, y = _mlp()
    extra = nn.Parameter(torch.zeros(3))
    opt = ArmijoAdam([*model.parameters(), extra], model=model, candidates=2, cadence="every")

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y) + extra.pow(2).sum()
        loss.backward()
        return loss

    theta = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"model=, which does not hold 1 of the optimized "
                                         r"tensors \(shapes \[\(3,\)\]"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), theta))


class _Tied(nn.Module):
    """An embedding tied to the head, and one block used twice: each optimized tensor sits in
    more than one place of the forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.block = nn.Linear(8, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = h + torch.tanh(self.block(h))
        h = h + torch.tanh(self.block(h))  # (the same module twice)
        return self.head(h)


def _tied():
    idx = torch.randint(0, 11, (16, 5))
    return _Tied(), idx, idx.roll(1, dims=1)


def _weight_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(8, 16)), nn.Tanh(),
                          nn.Linear(16, 1))
    return model, torch.randn(64, 8), torch.randn(64, 1)


class _LSTM(nn.Module):  # (an RNN holds its weights in a list of its own too: _flat_weights)
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def _lstm():
    return _LSTM(), torch.randn(16, 5, 4), torch.randn(16, 1)


def _run_loss(build, candidates, loss, steps=6):
    torch.manual_seed(0)
    model, x, y = build()
    opt = ArmijoAdam(model.parameters(), cadence="every", model=model, candidates=candidates,
                     init_step_size=1.0, backend="torch")

    def closure():
        opt.zero_grad()
        out = loss(model(x), y)
        out.backward()
        return out

    trace = []
    for _ in range(steps):
        opt.step(closure)
        trace.append((opt.stats["step_size"], opt.stats["trials"]))
    return trace, [p.detach().clone() for p in model.parameters()]


def _ce(logits, y):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (vmap's, on weight norm)
@pytest.mark.parametrize("build,loss", [(_tied, _ce), (_weight_norm, nn.functional.mse_loss)],
                         ids=["tied-and-shared", "weight-norm"])
def test_batched_candidates_reach_every_place_a_tensor_is_used(build, loss):
    # a tied head, a module called twice and a parametrization's original tensors: each
    # candidate's trial weights must stand in all of them, or its loss would mix the
    # candidate with θ0 (and the accepted step would differ from the sequential one)
    seq, seq_params = _run_loss(build, None, loss)
    bat, bat_params = _run_loss(build, 3, loss)
    assert any(t[1] > 1 for t in seq)  # (several trials: the candidates decide something)
    assert bat == seq
    for p, q in zip(bat_params, seq_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_batched_trial_that_raises_leaves_the_models_own_parameters_in_place():
    torch.manual_seed(0)
    model, x, y = _mlp()
    params = dict(model.named_parameters())
    theta = {n: p.detach().clone() for n, p in params.items()}
    opt = ArmijoAdam(model.parameters(), model=model, candidates=2, cadence="every")
    fail = [True]

    def closure():
        if fail[0] and not torch.is_grad_enabled():  # the batched trial forward
            raise RuntimeError("trial forward failed")
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="trial forward failed"):
        opt.step(closure)
    # the modules hold their own Parameters again (not the trial tensors), at θ0
    assert dict(model.named_parameters()) == params
    assert all(type(p) is nn.Parameter for p in model.parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), theta[n], rtol=1e-6, atol=1e-7)
    fail[0] = False
    opt.step(closure)  # and it trains on
    assert opt.param_groups[0]["step"] == 1


def _channels_last_conv():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 1)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    return model, x, torch.randn(4, 1)


@pytest.mark.parametrize("make", [_lstm, _channels_last_conv], ids=["lstm", "channels_last"])
def test_a_forward_vmap_cannot_batch_is_named_and_the_step_undone(make):
    # an LSTM has no batching rule, a channels-last conv asks vmap "NYI: querying
    # is_contiguous inside of vmap": torch's own errors say nothing of candidates=
    torch.manual_seed(0)
    model, x, y = make()
    theta = [p.detach().clone() for p in model.parameters()]
    opt = ArmijoAdam(model.parameters(), model=model, candidates=2, cadence="every")
    with pytest.raises(RuntimeError, match=r"cannot batch an operation of this forward: use "
                                           r"the sequential search \(candidates=None\)"):
        opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
    assert opt.param_groups[0]["step"] == 0
    for p, q in zip(model.parameters(), theta):
        torch.testing.assert_close(p.detach(), q, rtol=1e-6, atol=1e-7)
    opt.candidates = None  # and the sequential search trains it
    opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
    assert opt.param_groups[0]["step"] == 1


def _bf16_mlp():
    model, x, y = _mlp()
    return model.to(torch.bfloat16), x.to(torch.bfloat16), y.to(torch.bfloat16)


def _mse_float(out, y):  # (the loss in float32: a bf16 loss would hide most decreases)
    return nn.functional.mse_loss(out.float(), y.float())


def test_batched_candidates_of_a_bf16_model_are_its_masters_trial_points_rounded():
    # each candidate's weights are the fp32 master's trial point rounded to bf16, as the
    # sequential search writes into the model: the same losses, the same accepted steps
    seq, seq_params = _run_loss(_bf16_mlp, None, _mse_float)
    bat, bat_params = _run_loss(_bf16_mlp, 3, _mse_float)
    assert any(t[1] > 1 for t in seq)
    assert bat == seq
    for p, q in zip(bat_params, seq_params):
        assert p.dtype == torch.bfloat16 and torch.equal(p, q)


def _dropout_mlp_loss(w1, b1, w2, x):
    h = nn.functional.dropout(torch.tanh(x @ w1.T + b1), 0.3)
    return (h @ w2.T).square().mean()


def test_the_lean_vmap_computes_what_torch_func_vmap_computes():
    """linesearch/batched.py skips vmap's argument handling: the same values, the same dropout
    masks for every candidate (randomness="same"), an output that does not depend on the
    candidates broadcast to K, and the vmap level closed again after a raise."""
    from torch._C._functorch import maybe_get_level

    from armijo_fused.linesearch.batched import _lean_vmap_works, _vmap_over_first_dim

    assert _lean_vmap_works()  # (else the comparison below is torch.func.vmap's with itself)
    torch.manual_seed(0)
    k = 5
    ws = [torch.randn(k, 7, 3), torch.randn(k, 7), torch.randn(k, 2, 7)]
    x = torch.randn(11, 3)

    def loss(w1, b1, w2):
        return _dropout_mlp_loss(w1, b1, w2, x)

    torch.manual_seed(1)
    got = _vmap_over_first_dim(loss)(*ws)
    torch.manual_seed(1)
    want = torch.func.vmap(loss, randomness="same")(*ws)
    assert got.shape == (k,) and torch.equal(got, want)
    # the same masks for all K: candidates with equal weights give equal losses
    same = [w[:1].expand_as(w).clone() for w in ws]
    torch.manual_seed(2)
    out = _vmap_over_first_dim(loss)(*same)
    assert torch.equal(out, out[:1].expand(k)) and not torch.equal(got, got[:1].expand(k))

    constant = _vmap_over_first_dim(lambda *w: torch.tensor(3.0))(*ws)
    assert torch.equal(constant, torch.full((k,), 3.0))

    def raising(*w):
        raise KeyError("in the forward")

    with pytest.raises(KeyError):
        _vmap_over_first_dim(raising)(*ws)
    # no vmap level left open: a plain tensor made now is not batched
    assert maybe_get_level(torch.ones(2) * 2) == -1
    torch.manual_seed(2)
    assert torch.equal(_vmap_over_first_dim(loss)(*same), out)


def test_without_the_lean_vmap_torch_func_vmap_gives_the_same_search(monkeypatch):
    """Where torch has moved vmap's pieces, the batched search falls back on torch.func.vmap."""
    from armijo_fused.linesearch import batched

    kw = {"init_step_size": 1.0}
    lean, lean_forwards, lean_params = _run(ArmijoAdam, 3, **kw)
    assert batched._LEAN_VMAP is True  # (this torch's pieces work)
    lean_nesting = batched.vmap_increment_nesting
    monkeypatch.setattr(batched, "vmap_increment_nesting", None)
    monkeypatch.setattr(batched, "_LEAN_VMAP", None)
    plain, plain_forwards, plain_params = _run(ArmijoAdam, 3, **kw)
    assert plain == lean and plain_forwards == lean_forwards and any(t[1] > 1 for t in lean)
    for p, q in zip(plain_params, lean_params):
        assert torch.equal(p, q)
    assert batched._LEAN_VMAP is False

    # a torch whose private pieces are there but take other arguments: tried once, then the
    # public vmap (rather than a TypeError in the middle of a search)
    def moved(tensor, level):
        raise TypeError("_add_batch_dim() takes 2 positional arguments")

    monkeypatch.setattr(batched, "vmap_increment_nesting", lean_nesting)
    monkeypatch.setattr(batched, "_add_batch_dim", moved)
    monkeypatch.setattr(batched, "_LEAN_VMAP", None)
    again, _, again_params = _run(ArmijoAdam, 3, **kw)
    assert again == lean and batched._LEAN_VMAP is False
    for p, q in zip(again_params, lean_params):
        assert torch.equal(p, q)


class _CachingMLP(nn.Module):
    """Keeps a non-persistent cache of its hidden activations (computed from the weights)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(8, 16), nn.Linear(16, 1)
        self.register_buffer("cache", torch.zeros(16), persistent=False)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        self.cache = h.detach().mean(0)
        return self.l2(h)


def test_a_cache_the_forward_builds_from_the_weights_does_not_escape_the_batched_trial():
    # the batched trial left a tensor of a vmap level that no longer existed in the buffer:
    # reading it after the step raised "Either your tensor may have escaped from inside a
    # function being vmapped" (found by a review). The entry gets its tensor back instead (the
    # training forward's); the steps are the sequential search's
    from torch._C._functorch import is_batchedtensor

    def build():
        return _CachingMLP(), torch.randn(64, 8), torch.randn(64, 1)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the sequential trials' changed cache is named)
        seq, _, seq_params = _run(ArmijoAdam, None, steps=5, build=build, init_step_size=1.0)
        bat, _, bat_params = _run(ArmijoAdam, 3, steps=5, build=build, init_step_size=1.0)
    assert [t[:2] for t in bat] == [t[:2] for t in seq] and any(t[1] > 1 for t in seq)
    for p, q in zip(bat_params, seq_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    model, x, y = build()
    opt = ArmijoAdam(model.parameters(), cadence="every", model=model, candidates=3)
    opt.step(make_closure(opt, lambda: nn.functional.mse_loss(model(x), y)))
    trained = torch.tanh(model.l1(x)).detach().mean(0)  # (θ moved: the cache is θ0's)
    assert not is_batchedtensor(model.cache) and model.cache.shape == (16,)
    assert torch.isfinite(model.cache).all() and not torch.equal(model.cache, trained)


def test_a_users_own_error_that_mentions_vmap_reaches_the_user_as_it_is():
    torch.manual_seed(0)
    model, x, y = _mlp()
    opt = ArmijoAdam(model.parameters(), model=model, candidates=2, cadence="every")

    def loss():
        if torch._C._functorch.is_batchedtensor(model[0]._parameters["weight"]):  # (batched)
            raise RuntimeError("my pipeline: cannot remap the vmap-ed feature table")
        return nn.functional.mse_loss(model(x), y)

    with pytest.raises(RuntimeError, match="^my pipeline: cannot remap"):
        opt.step(make_closure(opt, loss))
