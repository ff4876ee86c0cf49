"""DDP on CPU / gloo, 2 ranks, different data per rank (docs/design.md §5.6).

Every rank must take the same decisions (step sizes, trial counts) and hold the same parameters,
equal to one process training on the concatenated batch; a non-finite loss on one rank rejects the
trial everywhere; ranks whose losses differ by orders of magnitude still agree (no deadlock: the
number of collectives per step is the same on every rank); BatchNorm running statistics are left
as the training forward set them (the optimizer's ``model=`` argument).
"""

from __future__ import annotations

import math

import pytest
import torch
from _dist_util import run_ranks
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD

pytestmark = [pytest.mark.timeout(150)]

BATCH = 32


def make_model(bn=False):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 1)]
    return nn.Sequential(*layers)


def batch(step, scale=1.0):
    g = torch.Generator().manual_seed(200 + step)
    x = torch.randn(BATCH, 8, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) * scale
    return x, y


def half(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def run(model, opt, steps, rank=None, world=1, scale=1.0, poison=None):
    """Train ``steps`` steps. ``poison(step, trial)``: True makes that trial's loss NaN here."""
    log = []
    for step in range(steps):
        x, y = batch(step, scale)
        if rank is not None:
            x, y = half(x, rank, world), half(y, rank, world)
        count = [0]

        def loss_fn(x=x, y=y, step=step, count=count):
            count[0] += 1
            v = nn.functional.mse_loss(model(x), y)
            return v * math.nan if poison is not None and poison(step, count[0]) else v

        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step(loss_fn=loss_fn, loss=loss)
        s = opt.stats
        log.append((s["step_size"], s["trials"], s["loss_before"]))
    return log


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def _rank_match(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every", init_step_size=0.3)
    log = run(ddp, opt, 5, rank, world)

    # BatchNorm: the statistics after the step are the ones the training forward left
    bn_model = make_model(bn=True)
    bn_ddp = DDP(bn_model)
    bn_opt = ArmijoSGD(bn_model.parameters(), model=bn_model, cadence="every")
    x, y = batch(0)
    x, y = half(x, rank, world), half(y, rank, world)
    bn_opt.zero_grad()
    loss = nn.functional.mse_loss(bn_ddp(x), y)
    loss.backward()
    stats_after_forward = [b.clone() for b in bn_model[1].buffers()]
    bn_opt.step(loss_fn=lambda: nn.functional.mse_loss(bn_ddp(x), y), loss=loss)
    bn_kept = all(torch.equal(a, b) for a, b in zip(stats_after_forward, bn_model[1].buffers()))
    # SGD momentum: η searched along g, (1 - μ)·η tested and applied along the momentum
    mom = make_model()
    mom_log = run(DDP(mom), _momentum_opt(mom), 6, rank, world)
    return {"log": log, "params": params(model), "bn_kept": bn_kept,
            "bn_trials": bn_opt.stats["trials"], "mom_log": mom_log, "mom_params": params(mom)}


def _momentum_opt(model):
    return ArmijoSGD(model.parameters(), model=model, momentum=0.9, cadence=2)


def _rank_disagree(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # rank 1 returns NaN for the first trial of step 0 only (call 2: call 1 is the first
    # search's check of the loss function at θ0)
    model = make_model()
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every", init_step_size=0.01)
    nan_log = run(DDP(model), opt, 2, rank, world,
                  poison=lambda step, trial: rank == 1 and step == 0 and trial == 2)
    nan_params = params(model)
    # rank 1's targets are 1000x rank 0's: very different losses, one decision
    model2 = make_model()
    opt2 = ArmijoAdam(model2.parameters(), model=model2, cadence="every")
    far_log = run(DDP(model2), opt2, 3, rank, world, scale=1000.0 if rank == 1 else 1.0)
    return {"nan_log": nan_log, "nan_params": nan_params, "far_log": far_log,
            "far_params": params(model2)}


def test_ddp_ranks_agree_with_the_single_process_run():
    ref = make_model()
    ref_log = run(ref, ArmijoAdam(ref.parameters(), model=ref, cadence="every", init_step_size=0.3),
                  5)
    assert sum(t for _, t, _ in ref_log) > 5  # some search backtracked
    r0, r1 = run_ranks(_rank_match, world=2, timeout=120)
    assert r0["log"] == r1["log"]  # identical step sizes, trial counts and (reduced) losses
    for (eta, trials, f0), (eta_r, trials_r, f0_r) in zip(r0["log"], ref_log):
        assert trials == trials_r
        assert eta == pytest.approx(eta_r, rel=1e-6)
        assert f0 == pytest.approx(f0_r, rel=1e-5)
    for p, q, ref_p in zip(r0["params"], r1["params"], params(ref)):
        assert torch.equal(p, q)
        torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)
    assert r0["bn_kept"] and r1["bn_kept"] and r0["bn_trials"] >= 1
    mom = make_model()
    mom_log = run(mom, _momentum_opt(mom), 6)
    assert r0["mom_log"] == r1["mom_log"]
    for (eta, trials, f0), (eta_r, trials_r, f0_r) in zip(r0["mom_log"], mom_log):
        assert trials == trials_r
        assert eta == pytest.approx(eta_r, rel=1e-6)
        assert f0 == pytest.approx(f0_r, rel=1e-5)
    for p, ref_p in zip(r0["mom_params"], params(mom)):
        torch.testing.assert_close(p, ref_p, rtol=1e-5, atol=1e-6)


def test_ddp_nonfinite_on_one_rank_rejects_everywhere_and_far_losses_agree():
    r0, r1 = run_ranks(_rank_disagree, world=2, timeout=120)
    # the NaN on rank 1 rejected the first trial on both ranks: a second trial ran, at η·β
    assert r0["nan_log"] == r1["nan_log"]
    eta0, trials0, _ = r0["nan_log"][0]
    assert trials0 >= 2 and eta0 < 0.01 * 1.2
    for p, q in zip(r0["nan_params"], r1["nan_params"]):
        assert torch.equal(p, q)
    assert r0["far_log"] == r1["far_log"]
    for p, q in zip(r0["far_params"], r1["far_params"]):
        assert torch.equal(p, q)


def _rank_padding_batch(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    # token classification with ignore_index: at steps 3, 6 and 7 rank 1's micro-batch is all
    # padding, so its mean loss is NaN (0/0) while its gradient is 0 and DDP's mean is finite
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    ddp = DDP(model)
    opt = ArmijoAdam(model.parameters(), model=model)  # adaptive: most steps do not search
    log = []
    for step in range(10):
        g = torch.Generator().manual_seed(100 + 2 * step + rank)
        x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
        if rank == 1 and step in (3, 6, 7):
            y = torch.full_like(y, -100)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(x), y, ignore_index=-100)
            loss.backward()
            return loss

        opt.step(closure)
        s = opt.stats
        f0 = float(s["loss_before"])
        log.append((bool(s["searched"]), bool(s["skipped"]), float(s["applied_step"]),
                    f0 if math.isfinite(f0) else None))  # (NaN != NaN)
    return {"log": log, "params": params(model), "folded": opt.param_groups[0]["folded"]}


def test_ddp_a_rank_with_a_nan_loss_skips_everywhere_on_steps_without_a_search():
    # the skip guard of a step without a search took the rank's own loss: rank 1 skipped and
    # rank 0 stepped, and the replicas drifted apart with no error
    r0, r1 = run_ranks(_rank_padding_batch, world=2, timeout=120)
    assert r0["log"] == r1["log"], (r0["log"], r1["log"])
    plain_skips = [i for i, (searched, skipped, _, _) in enumerate(r0["log"])
                   if skipped and not searched]
    assert plain_skips  # the case under test happened
    assert r0["folded"] == r1["folded"]
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)


def _rank_loss_on_one_rank(rank, world):
    # the loop hands its loss to the optimizer on rank 0 only: a step without a search must not
    # run a collective on one rank alone (it paired with the next gradient all-reduce)
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = ArmijoAdam(model.parameters(), cadence=5)
    loss_fn = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    opt.set_closure(loss_fn)
    for _ in range(7):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        for p in model.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world
        if rank == 0:
            opt.provide_loss(loss)
        opt.step()
    return params(model)


def test_ddp_a_loss_provided_on_some_ranks_only_does_not_mismatch_collectives():
    r0, r1 = run_ranks(_rank_loss_on_one_rank, world=2, timeout=60)
    assert all(torch.equal(p, q) for p, q in zip(r0, r1))


def _rank_no_loss_on_any_rank(rank, world):
    # the trial function gives f0 on every rank: the first search has no handed-over loss to
    # check the trial function against (it compared the function with itself: a forward more)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = ArmijoAdam(model.parameters(), cadence="every")
    x, y = half(batch(0)[0], rank, world), half(batch(0)[1], rank, world)
    calls = [0]

    def loss_fn():
        calls[0] += 1
        return nn.functional.mse_loss(model(x), y)

    out = []
    for _ in range(2):
        calls[0] = 0
        opt.zero_grad()
        loss_fn().backward()
        calls[0] = 0
        opt.step(loss_fn=loss_fn)
        out.append((calls[0], opt.stats["trials"]))
    return out


def test_ddp_no_rank_handing_the_loss_over_makes_no_check_forward():
    for r in run_ranks(_rank_no_loss_on_any_rank, world=2, timeout=60):
        assert all(calls == 1 + trials for calls, trials in r), r  # f0, then the trials


def _rank_loss_on_one_rank_after_a_first_search_without(rank, world):
    # the first search has no loss on any rank, the later ones on rank 0 only: the check at θ0
    # was then made by rank 0 alone (its collectives met the other rank's search: gloo's
    # "collective mismatch"; a review's repro)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = ArmijoAdam(model.parameters(), cadence="every")
    x, y = half(batch(0)[0], rank, world), half(batch(0)[1], rank, world)
    loss_fn = lambda: nn.functional.mse_loss(model(x), y)  # noqa: E731
    for step in range(4):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step(loss_fn=loss_fn, loss=loss if step >= 1 and rank == 0 else None)
    return params(model)


def test_ddp_a_loss_handed_over_on_one_rank_from_a_later_search_on_keeps_the_ranks_paired():
    r0, r1 = run_ranks(_rank_loss_on_one_rank_after_a_first_search_without, world=2, timeout=60)
    assert all(torch.equal(p, q) for p, q in zip(r0, r1))


def _rank_zero(rank, world):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model()
    try:
        ZeroRedundancyOptimizer(model.parameters(), optimizer_class=ArmijoAdam)
    except TypeError as e:
        return str(e)
    return None


def test_zero_redundancy_optimizer_is_refused_by_name():
    # each rank's optimizer would search along its own shard only: a test on a point that is
    # never applied (and collectives of different sizes when the ranks hold different blocks)
    for message in run_ranks(_rank_zero, world=2, timeout=60):
        assert message is not None and "ZeroRedundancyOptimizer" in message
        assert "FSDP2" in message


def _rank_bucket_view(rank, world):
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    runs = {}
    for bucket_view in (False, True):
        model = make_model()
        opt = ArmijoAdam(model.parameters(), model=model, cadence="every", init_step_size=0.3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            log = run(DDP(model, gradient_as_bucket_view=bucket_view), opt, 4, rank, world)
        said = [str(w.message) for w in caught if "arrived as new tensors" in str(w.message)]
        runs[bucket_view] = {"log": log, "params": params(model), "said": said}
    return runs


def test_ddp_gradient_as_bucket_view_trains_the_same_and_says_what_it_costs():
    """DDP with gradient_as_bucket_view=True re-points every gradient to its bucket at every
    backward, so the step copies them into its flat buffer: the run is the same, and a warning
    (once) says what it costs and what to turn off."""
    r0, r1 = run_ranks(_rank_bucket_view, world=2, timeout=120)
    for r in (r0, r1):
        assert r[False]["log"] == r[True]["log"]
        assert all(torch.equal(p, q) for p, q in zip(r[False]["params"], r[True]["params"]))
        assert r[False]["said"] == []
        assert len(r[True]["said"]) == 1 and "gradient_as_bucket_view" in r[True]["said"][0]


def _rank_raising_loss_fn(rank, world, warm, bn=False, exc=ValueError):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model(bn=bn)  # bn: DDP broadcasts its buffers in the first trial forward
    ddp = DDP(model)
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
    x, y = batch(0)
    x, y = half(x, rank, world), half(y, rank, world)
    out = {}
    if warm:  # one ordinary step first, so the failing steps are not the first search (which
        # reads f0 on its own): the f0 flag then travels with the first trial's read
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        opt.step(loss_fn=lambda: nn.functional.mse_loss(ddp(x), y), loss=loss)
    for where, given in (("trial", True), ("f0", False)):
        calls = [0]

        def loss_fn():
            calls[0] += 1
            if rank == 1:
                raise exc("rank 1's loss function failed")
            return nn.functional.mse_loss(ddp(x), y)

        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        before = params(model)
        try:
            opt.step(loss_fn=loss_fn, loss=loss if given else None)
            out[where] = "no error"
        except BaseException as e:  # every rank raises: none waits in a collective alone
            out[where] = f"{type(e).__name__}: {e}"
        out[where + "_restored"] = all(torch.allclose(a, b, atol=1e-6)
                                       for a, b in zip(before, params(model)))
    # and the ranks go on training together: their collectives still pair up
    opt.zero_grad()
    loss = nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step(loss_fn=lambda: nn.functional.mse_loss(ddp(x), y), loss=loss)
    out["after"] = params(model)
    return out


@pytest.mark.parametrize("warm, bn, exc", [
    (False, False, ValueError), (True, False, ValueError),
    # DDP with buffers broadcast them in the first trial forward, a collective rank 1 skipped
    (True, True, ValueError),
    # Ctrl-C reaches a trial forward at once; that rank must still take part in the collective
    (True, False, KeyboardInterrupt),
], ids=["first-search", "later-search", "ddp-buffers", "keyboard-interrupt"])
def test_ddp_a_loss_function_raising_on_one_rank_raises_on_every_rank_and_undoes_the_step(
        warm, bn, exc):
    # before: rank 1 raised and rank 0 waited in the trial's all-reduce until the timeout
    r0, r1 = run_ranks(_rank_raising_loss_fn, world=2, timeout=60, args=(warm, bn, exc))
    for where in ("trial", "f0"):
        assert r1[where] == f"{exc.__name__}: rank 1's loss function failed"
        assert r0[where].startswith("RuntimeError:") and "another rank" in r0[where]
        assert r0[where + "_restored"] and r1[where + "_restored"]
    assert all(torch.equal(a, b) for a, b in zip(r0["after"], r1["after"]))


def _bn_buffers_under_ddp(rank, world, armijo):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    # BatchNorm on the input: its running statistics do not depend on the parameters, so they
    # must come out the same whichever optimizer trains
    model = nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 1))
    ddp = DDP(model)  # broadcast_buffers=True: rank 0's buffers at every training forward
    opt = (ArmijoAdam(model.parameters(), model=model, cadence="every") if armijo
           else torch.optim.SGD(model.parameters(), lr=0.01))
    for step in range(4):
        x, y = batch(step)
        x, y = half(x, rank, world), half(y, rank, world)
        opt.zero_grad()
        loss = nn.functional.mse_loss(ddp(x), y)
        loss.backward()
        if armijo:
            opt.step(loss_fn=lambda x=x, y=y: nn.functional.mse_loss(ddp(x), y), loss=loss)
        else:
            opt.step()
    return model[0].running_mean.clone()


def test_ddp_trial_forwards_leave_the_buffer_broadcast_to_the_training_forwards():
    # a trial forward broadcast the buffers and cleared DDP's flag; the buffers were then
    # restored to this rank's own, and the next training forward broadcast nothing: rank 1's
    # running statistics drifted from what DDP gives without trials
    ours = run_ranks(_bn_buffers_under_ddp, world=2, timeout=60, args=(True,))
    plain = run_ranks(_bn_buffers_under_ddp, world=2, timeout=60, args=(False,))
    for a, b in zip(ours, plain):
        assert torch.equal(a, b)


def _rank_agree_nan(rank, world):
    from armijo_fused.integrations.distributed import ranks_agree

    return {"both_nan": ranks_agree(math.nan, 1.0),
            "one_nan": ranks_agree(1.0 if rank == 0 else math.nan),
            "equal": ranks_agree(0.5, -2.0),
            "differ": ranks_agree(float(rank))}


def test_ranks_agree_compares_nan_too():
    # MIN/MAX all-reduces skip NaN and NaN != NaN: NaN everywhere read as a disagreement, and
    # a NaN on one rank only as agreement
    for r in run_ranks(_rank_agree_nan, world=2, timeout=60):
        assert r == {"both_nan": True, "one_nan": False, "equal": True, "differ": False}


class _WithExtra(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk, self.head, self.extra = nn.Linear(6, 8), nn.Linear(8, 1), nn.Linear(6, 1)

    def forward(self, X, use_extra):
        out = self.head(torch.tanh(self.trunk(X)))
        return out + (self.extra(X) if use_extra else 0.0 * self.extra(X).detach())


def _rank_blind_block_with_rank_local_gradient(rank, world):
    # exact mode: the block "extra" waits after a blind test; its parameters are ignored by DDP,
    # so its gradient is rank-local (rank 1 feeds it on even steps, rank 0 never). Whether a
    # step without a scheduled search turns into one must be decided alike on every rank.
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    warnings.simplefilter("ignore")
    net = _WithExtra()
    DDP._set_params_and_buffers_to_ignore_for_model(net, ["extra.weight", "extra.bias"])
    ddp = DDP(net, find_unused_parameters=True)
    opt = ArmijoAdam([{"params": list(m.parameters())} for m in (net.trunk, net.head, net.extra)],
                     model=ddp, layerwise=True, block_search="exact")
    searched = []
    for k in range(1, 9):
        X = torch.randn(16, 6, generator=torch.Generator().manual_seed(k))[rank * 8:rank * 8 + 8]
        use = rank == 1 and k % 2 == 0

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(ddp(X, use), X.sum(1, keepdim=True))
            loss.backward()
            return loss

        opt.step(closure)
        searched.append(bool(opt.stats["searched"]))
    return searched


@pytest.mark.timeout(120)
def test_ranks_agree_when_a_waiting_blocks_gradient_is_rank_local():
    # The probe read each rank's own gradient: rank 1 searched where rank 0 did not, and gloo
    # aborted ("collective mismatch"; NCCL would hang)
    r0, r1 = run_ranks(_rank_blind_block_with_rank_local_gradient, world=2, timeout=100)
    assert r0 == r1


def _rank_local_inf_gradient(rank, world):
    # a learnable loss weight kept outside the DDP module: its gradient is rank-local. An inf in
    # it on rank 1 at a step without a search skipped the step there only, and the replicas of
    # the DDP-averaged weights parted (1.9e-3 after six steps)
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    temp = nn.Parameter(torch.ones(()))
    opt = ArmijoAdam(list(model.parameters()) + [temp], model=model)  # adaptive cadence
    log = []
    for step in range(6):
        x, y = batch(step)
        x, y = half(x, rank, world), half(y, rank, world)

        def loss_fn(x=x, y=y):
            return temp * nn.functional.mse_loss(ddp(x), y) + (temp - 1) ** 2

        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        if step == 3 and rank == 1:
            temp.grad.fill_(math.inf)
        opt.step(loss_fn=loss_fn, loss=loss)
        log.append((bool(opt.stats["searched"]), bool(opt.stats["skipped"])))
    return {"log": log, "folded": opt.param_groups[0]["folded"], "params": params(model)}


def test_ddp_a_non_finite_rank_local_gradient_skips_everywhere_on_steps_without_a_search():
    r0, r1 = run_ranks(_rank_local_inf_gradient, world=2, timeout=120)
    assert r0["log"] == r1["log"] and r0["log"][3] == (False, True)  # the case under test
    assert r0["folded"] == r1["folded"] == 5
    for p, q in zip(r0["params"], r1["params"]):
        assert torch.equal(p, q)


def _rank_uneven_inputs_under_join(rank, world):
    # DDP's join() shadows DDP's own collectives on a rank whose data ran out, not the
    # optimizer's (the line search's losses): with throw_on_early_termination=True every rank
    # stops at the first exhausted one, as docs/integrations.md recommends, instead of a
    # collective mismatch (gloo) or a hang (NCCL)
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = ArmijoAdam(model.parameters(), model=model)
    steps = 0
    try:
        with ddp.join(throw_on_early_termination=True):
            for step in range(2 if rank == 0 else 3):
                x, y = batch(step)
                x, y = half(x, rank, world), half(y, rank, world)
                opt.zero_grad()
                loss = nn.functional.mse_loss(ddp(x), y)
                loss.backward()
                opt.step(loss_fn=lambda x=x, y=y: nn.functional.mse_loss(ddp(x), y), loss=loss)
                steps += 1
    except RuntimeError as e:
        return steps, str(e)
    return steps, None


def test_ddp_uneven_inputs_stop_every_rank_under_join_with_early_termination():
    (s0, e0), (s1, e1) = run_ranks(_rank_uneven_inputs_under_join, world=2, timeout=120)
    assert s0 == s1 == 2
    assert "exhausted" in (e0 or "") and "exhausted" in (e1 or "")


def _rank_different_guard_settings(rank, world):
    # the plain step's all-reduce carried the Σ g² entry only on ranks that read it: a rank
    # with check_finite=False sent two entries against three, and the ranks hung
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = ArmijoAdam(model.parameters(), model=model, cadence=3, check_finite=rank == 0)
    log = run(ddp, opt, 4, rank, world)
    return [trials for _, trials, _ in log]


def test_ddp_ranks_with_different_guard_settings_do_not_hang():
    r0, r1 = run_ranks(_rank_different_guard_settings, world=2, timeout=90)
    assert r0 == r1 and 0 in r0  # steps without a search happened


def _rank_generator_noise(rank, world, own):
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    opt = ArmijoAdam(model.parameters(), model=model, cadence="every")
    gen = torch.Generator().manual_seed(10 + rank)
    x, y = batch(0)
    x, y = half(x, rank, world), half(y, rank, world)

    def loss_fn():  # noise on the inputs: from a generator of the loop's own, or torch's
        noise = torch.randn(x.shape, generator=gen if own else None)
        return nn.functional.mse_loss(ddp(x + noise), y * 10)

    named = []
    for _ in range(3):
        opt.capture_rng()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(loss_fn=loss_fn, loss=loss)
        named += [str(w.message) for w in caught if "at θ0 gives" in str(w.message)]
    return {"named": named, "params": params(model), "forwards": opt.stats["forwards"]}


@pytest.mark.parametrize("own", [True, False], ids=["own-generator", "global-rng"])
def test_ddp_the_check_at_theta0_compares_the_ranks_means_and_warns_on_every_rank(own):
    # the first search's check of the trial function at θ0 ran in single-process runs only; a
    # DDP run whose noise came from a generator of its own collapsed its η without a word
    r0, r1 = run_ranks(_rank_generator_noise, world=2, timeout=60, args=(own,))
    assert len(r0["named"]) == len(r1["named"]) == (1 if own else 0), (r0["named"], r1["named"])
    if own:  # (the means over the ranks: the same numbers in both ranks' warnings)
        assert r0["named"] == r1["named"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["forwards"] == r1["forwards"]
