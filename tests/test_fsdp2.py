"""FSDP2 (``fully_shard``) on CPU / gloo, 2 ranks: DTensor parameters, resharding between trials,
the single-process reference, and a torch.distributed.checkpoint round trip.

Each rank trains on its half of every batch; FSDP2 averages the gradient over the ranks and the
optimizer averages the trial losses, so the run must match one process that trains on the whole
batch (the flat-buffer path) to float tolerance, step sizes and trial counts included.
"""

from __future__ import annotations

import json

import pytest
import torch
from _dist_util import run_ranks
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoOptimizer


def _why_no_fsdp2_on_cpu() -> str | None:
    """Why this torch cannot run FSDP2 over gloo on CPU (None: it can)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:  # torch < 2.6
        return "this torch has no public FSDP2 (torch.distributed.fsdp.fully_shard)"
    if not hasattr(torch.cpu.Stream, "record_event"):  # torch 2.6
        return "this torch's FSDP2 does not run on CPU (torch.cpu.Stream has no record_event)"
    return None


_NO_FSDP2 = _why_no_fsdp2_on_cpu()
pytestmark = [pytest.mark.timeout(150),
              pytest.mark.skipif(_NO_FSDP2 is not None, reason=str(_NO_FSDP2))]

STEPS = 5
BATCH = 32


class Net(nn.Module):
    """The root owns ``inp`` and ``out`` (FSDP2 keeps a root unsharded after a forward), the two
    blocks are FSDP modules of their own."""

    def __init__(self, d=16):
        super().__init__()
        self.inp = nn.Linear(8, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(d, 1)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def make_model():
    torch.manual_seed(0)
    return Net()


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 8, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(BATCH, 1, generator=g)
    return x, y


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_opt(model, **kw):
    kw.setdefault("cadence", "every")
    return ArmijoAdam(model.parameters(), model=model, weight_decay=0.01, **kw)


def train(model, opt, steps, rank=None, world=1, record=None, start=0):
    """``steps`` steps; rank r sees rows [r·B/W, (r+1)·B/W) of each batch (all rows if rank None)."""
    out = []
    for step in range(start, start + steps):
        x, y = batch(step)
        if rank is not None:
            n = BATCH // world
            x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]

        def loss_fn(x=x, y=y):
            v = nn.functional.mse_loss(model(x), y)
            if record is not None and torch.is_grad_enabled() is False:
                record.append(float(v))
            return v

        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss_fn=loss_fn, loss=loss)
        s = opt.stats
        out.append((s["step_size"], s["trials"], s["loss_before"], s["loss_after"]))
    return out


def full_params(model):
    return [p.full_tensor().detach().clone() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


# -- rank bodies (module level: the spawned processes import them) ---------------------------------
def _rank_reference_run(rank, world, in_place):
    from armijo_fused.storage.sharded import ShardedBuffer

    ShardedBuffer.default_in_place = in_place
    model = shard(make_model())
    params = list(model.parameters())
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in params)
    opt = make_opt(model, max_grad_norm=1.0, init_step_size=0.3)
    log = train(model, opt, STEPS, rank, world)
    state = opt.state[params[0]]
    from armijo_fused.integrations.distributed import reshard_all, uses_dtensors

    return {"log": log, "params": full_params(model), "uses_dtensors": uses_dtensors(opt),
            "resharded": reshard_all(model), "fsdp_modules": len(model.blocks) + 1,
            "in_place": [b.in_place for b in opt._buffers],
            "state_is_dtensor": all(isinstance(v, DTensor) for v in state.values()
                                    if isinstance(v, torch.Tensor))}


def _rank_in_place_buffer(rank, world):
    """The in-place buffer's flat views: ``param`` gathers the shards, ``set_param`` writes them,
    ``grad`` gathers this step's gradient shards."""
    from armijo_fused.storage.sharded import _local

    model = shard(make_model())
    opt = make_opt(model)
    train(model, opt, 1, rank, world)
    out = []
    for buf in opt._buffers:
        shards = [_local(p) for p in buf.params]
        before = [t.clone() for t in shards]
        flat = buf.param
        gathered = all(torch.equal(flat[o:o + t.numel()], t.reshape(-1))
                       for t, o in zip(shards, buf.offsets))
        grads = buf.grad
        grad_ok = all(torch.equal(grads[o:o + t.numel()], _local(p.grad).reshape(-1))
                      for t, o, p in zip(shards, buf.offsets, buf.params) if p.grad is not None)
        buf.set_param(torch.full_like(flat, 7.0))
        sevens = all(bool((t == 7.0).all()) for t in shards)
        buf.set_param(flat)
        restored = all(torch.equal(t, b) for t, b in zip(shards, before))
        out.append([buf.in_place, gathered, grad_ok, sevens, restored])
    # zero_grad lets this step's gradient shards go: the table held them through the forward
    # (weak references to the storages, not their addresses: a freed address may be reused)
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    grads = [StorageWeakRef(_local(p.grad).untyped_storage())
             for buf in opt._buffers for p in buf.params if p.grad is not None]
    opt.zero_grad()
    gc.collect()
    return [tuple(row + [bool(grads) and all(r.expired() for r in grads)]) for row in out]


def _rank_failed_step(rank, world, exact):
    """A trial forward that raises mid-search: the shards and the state must be as before the
    step (bitwise with exact_revert, which restores through set_param; to rounding otherwise)."""
    from armijo_fused.storage.sharded import _local

    model = shard(make_model())
    opt = make_opt(model, exact_revert=exact)
    train(model, opt, 2, rank, world)
    for g in opt.param_groups:  # a first trial far too long: the search backtracks
        g["step_size"] = 3.0
    params = list(model.parameters())
    before = [_local(p).clone() for p in params]
    state_before = [{k: _local(v).clone() for k, v in opt.state[p].items()
                     if isinstance(v, torch.Tensor)} for p in params]
    x, y = batch(7)
    n = BATCH // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 2:  # the second trial fails, after θ has moved twice
            raise RuntimeError("trial failed")
        return nn.functional.mse_loss(model(x), y)

    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    raised = False
    try:
        opt.step(loss_fn=loss_fn, loss=loss)
    except RuntimeError:
        raised = True
    same = []
    for p, b, sb in zip(params, before, state_before):
        now = {k: _local(v) for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
        if exact:
            same.append(torch.equal(_local(p), b) and all(torch.equal(now[k], v)
                                                           for k, v in sb.items()))
        else:
            same.append(torch.allclose(_local(p), b, rtol=1e-5, atol=1e-6) and all(
                torch.allclose(now[k], v, rtol=1e-4, atol=1e-7) for k, v in sb.items()))
    return {"raised": raised, "same": same, "in_place": [b.in_place for b in opt._buffers]}


def _rank_bf16_shards(rank, world):
    """bf16 shards: an fp32 master and fp32 state (as DTensors, for DCP), the shards hold the
    master rounded, and weights written into the shards between steps are taken over."""
    from torch.distributed.tensor import DTensor

    from armijo_fused.storage.sharded import _local

    model = shard(make_model().to(torch.bfloat16))
    opt = make_opt(model, init_step_size=0.3)
    n = BATCH // world

    def run(steps, start):
        losses = []
        for _ in range(start, start + steps):
            x, y = batch(0)  # one batch: the loss must go down
            x, y = x[rank * n:(rank + 1) * n].bfloat16(), y[rank * n:(rank + 1) * n].bfloat16()

            def loss_fn(x=x, y=y):
                return nn.functional.mse_loss(model(x).float(), y.float())

            opt.zero_grad()
            loss = loss_fn()
            loss.backward()
            opt.step(loss_fn=loss_fn, loss=loss)
            losses.append(float(opt.stats["loss_before"]))
        return losses

    losses = run(8, 0)
    params = list(model.parameters())
    masters = [opt.state[p]["master"] for p in params]
    out = {
        "master_dtensor_fp32": all(isinstance(m, DTensor) and m.dtype == torch.float32
                                   for m in masters),
        "state_fp32": all(v.dtype == torch.float32 for p in params
                          for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)),
        "shards_are_rounded_masters": all(torch.equal(_local(p), _local(m).bfloat16())
                                          for p, m in zip(params, masters)),
        "master_finer_than_bf16": any(not torch.equal(_local(m), _local(m).bfloat16().float())
                                      for m in masters),
        "first_loss": losses[0], "last_loss": losses[-1],
        "copies": [not b.in_place for b in opt._buffers],
    }
    for p in params:  # weights written into the shards (a user, a model-only checkpoint load)
        _local(p).fill_(0.5)
    opt.param_groups[0].update(step_size=1e-7, step_size_avg=1e-7)
    run(1, 8)
    out["written_taken"] = all(
        torch.allclose(_local(m), torch.full_like(_local(m), 0.5), atol=1e-3) for m in masters)
    return out


def _trial_losses(rank, world, reshard):
    if not reshard:  # the negative control: what happens without resharding between trials
        ArmijoOptimizer._reshard_fsdp = lambda self: None
    model = shard(make_model())
    # a first trial far too long: the search must backtrack, so several trials run per step
    opt = make_opt(model, init_step_size=3.0)
    trials = []
    train(model, opt, 2, rank, world, record=trials)
    return trials


def _rank_candidates_refused(rank, world):
    """Batched candidates swap plain trial tensors into the model, which FSDP2 shards cannot
    take: the constructor says so, and a step (candidates set afterwards) says so before
    anything moves, every time (it used to run and never move θ; then the refusal came after
    the new store was in place, and every later step raised a bare AttributeError)."""
    from armijo_fused.storage.sharded import _local

    model = shard(make_model())
    messages = []
    try:
        make_opt(model, candidates=3)
    except ValueError as e:
        messages.append(str(e))
    opt = make_opt(model)
    opt.candidates = 3
    before = [_local(p).clone() for p in model.parameters()]
    for _ in range(2):
        try:
            train(model, opt, 1, rank, world)
        except ValueError as e:
            messages.append(str(e))
    same = all(torch.equal(a, _local(p)) for a, p in zip(before, model.parameters()))
    opt.candidates = None  # and the optimizer still trains
    rows = train(model, opt, 2, rank, world)
    return {"messages": messages, "same": same, "step": opt.param_groups[0]["step"],
            "trained": len(rows) == 2 and all(eta > 0 for eta, *_ in rows)}


def _rank_trials(rank, world):
    return {"with": _trial_losses(rank, world, True), "without": _trial_losses(rank, world, False)}


def _rank_dcp(rank, world, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = shard(make_model())
    opt = make_opt(model)
    train(model, opt, 3, rank, world)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.save(sd, checkpoint_id=path)
    torch.distributed.barrier()
    log_a = train(model, opt, 2, rank, world, start=3)
    params_a = full_params(model)

    model2 = shard(make_model())
    opt2 = make_opt(model2)
    before = full_params(model2)
    assert not opt2.state
    # DCP's state-init path: step() with zero grads, lr = 0 and no closure builds the state
    sd2 = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
    init_ok = len(opt2.state) == len(list(model2.parameters())) and all(
        torch.equal(a, b) for a, b in zip(before, full_params(model2)))
    dcp.load(sd2, checkpoint_id=path)
    set_model_state_dict(model2, sd2["model"])
    set_optimizer_state_dict(model2, opt2, sd2["optim"])
    log_b = train(model2, opt2, 2, rank, world, start=3)
    return {"init_ok": init_ok, "log_a": log_a, "log_b": log_b, "a": params_a,
            "b": full_params(model2)}


def _rank_state_dict_copies(rank, world, in_place):
    """``copy.deepcopy(opt.state_dict())`` and ``torch.save`` of it on each rank, each loaded
    into a fresh model and optimizer, continue as the run itself does."""
    import copy
    import io

    from armijo_fused.storage.sharded import ShardedBuffer

    ShardedBuffer.default_in_place = in_place
    model = shard(make_model())
    opt = make_opt(model)
    train(model, opt, 3, rank, world)
    model_sd = copy.deepcopy(model.state_dict())
    copied = copy.deepcopy(opt.state_dict())
    f = io.BytesIO()
    torch.save(opt.state_dict(), f)
    f.seek(0)
    saved = torch.load(f, weights_only=False)
    log_a = train(model, opt, 2, rank, world, start=3)
    out = {"a": full_params(model)}
    for name, sd in (("deepcopy", copied), ("torch.save", saved)):
        model2 = shard(make_model())
        with torch.no_grad():
            for p in model2.parameters():
                p.add_(1.0)  # the load must bring the weights back
        model2.load_state_dict(model_sd)
        opt2 = make_opt(model2)
        opt2.load_state_dict(sd)
        out[name] = (train(model2, opt2, 2, rank, world, start=3) == log_a, full_params(model2))
    return out


def _rank_corrupt_shard_refused(rank, world):
    """A checkpoint whose NaN sits in rank 1's shard only: every rank refuses it (each rank
    checked its own shard, so rank 0 loaded it, stepped back to the saved count, and the ranks
    trained on from different states)."""
    import copy

    model = shard(make_model())
    opt = make_opt(model)
    train(model, opt, 2, rank, world)
    saved = copy.deepcopy(opt.state_dict())  # (a held state_dict is live: copied)
    train(model, opt, 2, rank, world, start=2)
    if rank == 1:
        first = next(iter(saved["state"]))
        local = saved["state"][first]["exp_avg"].to_local()
        local.view(-1)[0] = float("nan")
    before = full_params(model)
    messages = []
    try:
        opt.load_state_dict(saved)
    except ValueError as e:
        messages.append(str(e))
    same = all(torch.equal(a, b) for a, b in zip(before, full_params(model)))
    step = opt.param_groups[0]["step"]
    rows = train(model, opt, 1, rank, world, start=4)  # (the ranks still step together)
    return {"messages": messages, "same": same, "step": step, "trained": len(rows) == 1}


def _telemetry_run(rank=None, world=1, check_finite=True):
    """(searched, grad_norm, gd) per step, steps without a search among them (cadence 2)."""
    model = make_model() if rank is None else shard(make_model())
    opt = make_opt(model, cadence=2, check_finite=check_finite)
    rows = []
    for step in range(4):
        train(model, opt, 1, rank, world, start=step)
        s = opt.stats
        rows.append((bool(s["searched"]), float(s["grad_norm"]), float(s["gd"])))
    return rows


def _rank_telemetry(rank, world):
    return {flag: _telemetry_run(rank, world, flag) for flag in (True, False)}


def _rank_gradscaler_closure(rank, world):
    """scaler.step(opt, closure) whose closure's backward adds into the gradients (no
    zero_grad in it): FSDP2 adds through the DTensor's local shard, which moves neither the
    DTensor's version nor its storage, so the step took them as not written and left them
    scaled (1024x)."""
    out = {}
    for sharded in (False, True):
        model = shard(make_model()) if sharded else make_model()
        opt = make_opt(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        x, y = batch(0)
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()

        def closure(model=model, x=x, y=y, scaler=scaler):
            loss = nn.functional.mse_loss(model(x), y)
            if torch.is_grad_enabled():  # (the trials only evaluate)
                scaler.scale(loss).backward()
            return loss

        scaler.step(opt, closure)
        out[sharded] = float(opt.stats["grad_norm"])
    return out


def _momentum_opt(model, cadence="every"):
    from armijo_fused import ArmijoSGD

    return ArmijoSGD(model.parameters(), model=model, momentum=0.9, cadence=cadence)


def _rank_momentum_step_length(rank, world):
    model = shard(make_model())
    opt = _momentum_opt(model)
    log = train(model, opt, 4, rank, world)
    out = {"log": log, "step_length": opt.param_groups[0]["step_length"]}
    model = shard(make_model())
    opt = _momentum_opt(model, cadence=3)  # steps without a search, whose length is capped
    out["capped_log"] = train(model, opt, 10, rank, world)
    out["last_dd"] = json.loads(opt.state_dict()["param_groups"][0]["last_dd"])
    return out


def _rank_loss_on_one_rank(rank, world):
    """Rank 0 hands its loss over, rank 1 does not: refused on both ranks (they hung: rank 1's
    forward all-gathers while rank 0 waits in the loss's all-reduce), nothing moved; with the
    loss on every rank the run then goes on."""
    from armijo_fused.storage.sharded import _local

    model = shard(make_model())
    opt = make_opt(model)
    x, y = batch(0)
    n = BATCH // world
    x, y = x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]
    loss_fn = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    before = [_local(p).clone() for p in model.parameters()]
    opt.zero_grad()
    loss = loss_fn()
    loss.backward()
    try:
        opt.step(loss_fn=loss_fn, loss=loss if rank == 0 else None)
        message = None
    except ValueError as e:
        message = str(e)
    same = all(torch.equal(_local(p), b) for p, b in zip(model.parameters(), before))
    opt.step(loss_fn=loss_fn, loss=loss)
    return {"message": message, "same": same, "searches": opt.param_groups[0]["searches"],
            "moved": not all(torch.equal(_local(p), b)
                             for p, b in zip(model.parameters(), before))}


# -- tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "copies"])
def test_fsdp2_matches_the_single_process_run(in_place):
    """In place, the passes read and write the shards through a tile table; with copies they run
    on flat copies of them. Both must give the single-process run."""
    ref_model = make_model()
    ref_opt = make_opt(ref_model, max_grad_norm=1.0, init_step_size=0.3)
    ref_log = train(ref_model, ref_opt, STEPS)
    ref_params = full_params(ref_model)
    assert sum(t for _, t, _, _ in ref_log) > STEPS  # the search did backtrack somewhere

    results = run_ranks(_rank_reference_run, world=2, timeout=120, args=(in_place,))
    for r in results:
        assert r["state_is_dtensor"] and r["uses_dtensors"]
        assert r["resharded"] == r["fsdp_modules"]  # (the blocks and the root)
        assert r["in_place"] and all(m == in_place for m in r["in_place"])
        for (eta, trials, f0, f1), (eta_r, trials_r, f0_r, f1_r) in zip(r["log"], ref_log):
            assert trials == trials_r
            assert eta == pytest.approx(eta_r, rel=1e-6)
            assert f0 == pytest.approx(f0_r, rel=1e-5)
            assert f1 == pytest.approx(f1_r, rel=1e-5, nan_ok=True)
        for p, q in zip(r["params"], ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(p, q)


def test_in_place_buffer_reads_and_writes_the_shards():
    for r in run_ranks(_rank_in_place_buffer, world=2, timeout=120):
        assert r and all(row == (True,) * 6 for row in r), r


@pytest.mark.parametrize("exact", [True, False], ids=["exact_revert", "inverse"])
def test_a_failed_step_leaves_the_shards_and_state_as_they_were(exact):
    for r in run_ranks(_rank_failed_step, world=2, timeout=120, args=(exact,)):
        assert r["raised"] and all(r["in_place"]) and r["same"] and all(r["same"]), r


def test_bf16_shards_get_fp32_master_weights():
    for r in run_ranks(_rank_bf16_shards, world=2, timeout=120):
        copies = r.pop("copies")
        assert copies and all(copies)  # half shards take the copies path, with a master
        flags = {k: v for k, v in r.items() if isinstance(v, bool)}
        assert all(flags.values()), flags
        assert r["last_loss"] < r["first_loss"]


def test_batched_candidates_are_refused_before_anything_moves():
    for r in run_ranks(_rank_candidates_refused, world=2, timeout=120):
        assert len(r["messages"]) == 3, r
        assert all("candidates= does not support FSDP2" in m for m in r["messages"]), r
        assert r["same"] and r["step"] == 2 and r["trained"], r


def test_trial_forwards_see_the_moved_weights():
    ref_model = make_model()
    ref_trials = []
    # (the first record of each: the first search's check of the loss function at θ0)
    train(ref_model, make_opt(ref_model, init_step_size=3.0), 2, record=ref_trials)
    assert len(ref_trials) >= 4  # backtracking happened

    results = run_ranks(_rank_trials, world=2, timeout=120)
    # the trial loss each rank sees on its half; their mean is the reference's trial loss
    with_r = [r["with"] for r in results]
    assert len(with_r[0]) == len(with_r[1]) == len(ref_trials)
    for a, b, ref in zip(*with_r, ref_trials):
        assert (a + b) / 2 == pytest.approx(ref, rel=1e-5)
    # the negative control: without resharding the root (FSDP2 leaves it unsharded after a
    # forward with no backward) keeps the weights of trial 1, and the trial losses go wrong
    without = [r["without"] for r in results]
    wrong = [abs((a + b) / 2 - ref) > 1e-3 * abs(ref) for a, b, ref in zip(*without, ref_trials)]
    assert any(wrong)


def test_dcp_round_trip_with_the_state_init_path(tmp_path):
    results = run_ranks(_rank_dcp, world=2, timeout=120, args=(str(tmp_path / "ckpt"),))
    for r in results:
        assert r["init_ok"]
        assert r["log_a"] == r["log_b"]
        for p, q in zip(r["a"], r["b"]):
            assert torch.equal(p, q)


@pytest.mark.parametrize("in_place", [True, False], ids=["in_place", "copies"])
def test_the_state_dict_can_be_deep_copied_and_saved_with_torch_save(in_place):
    # The state DTensors were views at an offset into the flat state buffer; torch (>= 2.10)
    # gives such a DTensor's storage-less wrapper that offset, and deepcopy and torch.save
    # then raised "invalid python storage" on every rank.
    for r in run_ranks(_rank_state_dict_copies, world=2, timeout=120, args=(in_place,)):
        for name in ("deepcopy", "torch.save"):
            same_log, params = r[name]
            assert same_log, name
            for p, q in zip(params, r["a"]):
                assert torch.equal(p, q), name


def test_a_checkpoint_corrupt_in_one_ranks_shard_is_refused_on_every_rank():
    r0, r1 = run_ranks(_rank_corrupt_shard_refused, world=2, timeout=120)
    assert len(r1["messages"]) == 1 and "non-finite values" in r1["messages"][0]
    assert len(r0["messages"]) == 1 and "another rank" in r0["messages"][0]
    for r in (r0, r1):
        assert r["same"] and r["step"] == 4 and r["trained"]


def test_steps_without_a_search_report_the_models_gradient_norm_on_every_rank():
    # with check_finite=False, ‖g‖ and ⟨g, d⟩ of a step without a search came from each rank's
    # own shards (1.49 and 0.92 where one process gives 1.24)
    results = run_ranks(_rank_telemetry, world=2, timeout=120)
    for flag in (True, False):
        single = _telemetry_run(check_finite=flag)
        assert [searched for searched, _, _ in single] == [True, False, True, False]
        for r in results:
            for (s1, n1, gd1), (s2, n2, gd2) in zip(single, r[flag]):
                assert s1 == s2
                assert n2 == pytest.approx(n1, rel=1e-5) and gd2 == pytest.approx(gd1, rel=1e-5)


def test_a_gradscaler_closure_that_adds_into_sharded_gradients_is_unscaled():
    for r in run_ranks(_rank_gradscaler_closure, world=2, timeout=120):
        # (each rank: the whole batch, so the sharded run's gradient is the unsharded one's)
        assert r[True] == pytest.approx(r[False], rel=1e-4)


def test_sgd_momentum_records_the_step_length_of_the_whole_model_on_every_rank():
    # η searched along g, α tested along d: the length recorded for the cap on later steps was
    # each rank's own shard's (ranks disagreed, and so did their checkpoints)
    ref = make_model()
    ref_opt = _momentum_opt(ref)
    ref_log = train(ref, ref_opt, 4)
    r0, r1 = run_ranks(_rank_momentum_step_length, world=2, timeout=120)
    assert r0["step_length"] == r1["step_length"]
    assert r0["step_length"] == pytest.approx(ref_opt.param_groups[0]["step_length"], rel=1e-5)
    for (eta, trials, _, _), (eta_r, trials_r, _, _) in zip(r0["log"], ref_log):
        assert trials == trials_r and eta == pytest.approx(eta_r, rel=1e-6)


def test_steps_without_a_search_are_capped_under_fsdp2_as_in_a_single_process():
    # the cap compares ‖d‖ with the last search's step length: it was skipped under FSDP2,
    # whose ranks each hold their shards' ‖d‖² only (steps 7 and 8 moved 4x and 3x further)
    ref = make_model()
    ref_opt = _momentum_opt(ref, cadence=3)
    ref_log, capped = [], []
    for k in range(10):
        ref_log += train(ref, ref_opt, 1, start=k)
        s = ref_opt.stats
        capped.append(not s["searched"] and s["step_size"] < 0.99 * 0.1 * (
            ref_opt.param_groups[0]["step_size"]))
    assert any(capped)  # (else this test shows nothing)
    r0, r1 = run_ranks(_rank_momentum_step_length, world=2, timeout=120)
    assert r0["last_dd"] == r1["last_dd"]  # the model's ‖d_b‖², saved alike on every rank
    ref_dd = json.loads(ref_opt.state_dict()["param_groups"][0]["last_dd"])
    assert r0["last_dd"][0] == pytest.approx(ref_dd[0], rel=1e-5)
    for (eta, trials, _, _), (eta_r, trials_r, _, _) in zip(r0["capped_log"], ref_log):
        assert trials == trials_r and eta == pytest.approx(eta_r, rel=1e-5)


def _rank_freeze(rank, world):
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef

    from armijo_fused.storage.sharded import _local

    model = shard(make_model())
    opt = make_opt(model)
    train(model, opt, 2, rank, world)
    frozen = list(model.blocks[0].parameters())
    kept = [_local(p).clone() for p in frozen]
    old = [StorageWeakRef(s.untyped_storage()) for b in opt._buffers for s in b.states]
    for p in frozen:
        p.requires_grad_(False)
    train(model, opt, 2, rank, world, start=2)  # the rebuild let the frozen block go
    # ... and its state, which sat on slices of the old buffers' storage, got storage of its
    # own: nothing holds the old buffers now (weak references: a freed address may be reused)
    left = [v for p in frozen for v in opt.state[p].values() if isinstance(v, torch.Tensor)]
    gc.collect()
    return {"kept": all(torch.equal(_local(p), k) for p, k in zip(frozen, kept)),
            "moved": opt.stats["step_size"] > 0,
            "state_released": bool(left) and all(r.expired() for r in old)}


def test_freezing_a_block_under_fsdp2_keeps_training():
    # The release of tensors that leave the store read untyped_storage() of DTensors, which
    # raises: the step after a freeze failed on every rank.
    for r in run_ranks(_rank_freeze, world=2, timeout=120):
        assert r["kept"] and r["moved"] and r["state_released"], r


def test_a_loss_handed_over_on_some_ranks_only_is_refused_on_every_rank():
    for r in run_ranks(_rank_loss_on_one_rank, world=2, timeout=120):
        assert r["message"] and "50% of the ranks only" in r["message"], r
        assert r["same"] and r["moved"] and r["searches"] == 1, r
