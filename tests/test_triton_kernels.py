"""Parity of the Triton passes with the torch reference (backends/torch_backend.py).

On a machine without CUDA the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set by
conftest); on a CUDA machine the same checks run on CUDA tensors with compiled Triton in
``TestCompiledTriton`` (marked ``gpu``), and the interpreter tests are skipped.
Tolerances are fp32 rounding: the kernels keep the torch twin's operation order, but a GPU may
fuse multiply-adds, so the compiled checks allow a few ulps more.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_cases import make_case, rounding_edge_values
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD
from armijo_fused.backends import torch_backend as ref
from armijo_fused.directions import RULES

tri = pytest.importorskip("armijo_fused.backends.triton_backend")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from armijo_fused.kernels.rules import (  # noqa: E402
    DIRECTION_READS_GRAD,
    STATE_COUNT,
    store_theta,
    update_state,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpreted = pytest.mark.skipif(not INTERPRET, reason="runs under TRITON_INTERPRET=1 (no CUDA)")
pytestmark = pytest.mark.timeout(120)

RULE_NAMES = list(RULES)
# (block sizes, tile): one element; several blocks, none a multiple of the tile; an empty block
# between two others; a size that is an exact multiple.
SHAPES = [((1,), 1024), ((3000, 17, 1), 1024), ((777, 0, 2049), 1024), ((4096,), 1024)]
MULTI = ((777, 0, 2049), 1024)
TOL = {"cpu": dict(rtol=1e-6, atol=1e-7), "cuda": dict(rtol=1e-5, atol=1e-6)}
SUM_TOL = {"cpu": dict(rtol=1e-5, atol=1e-6), "cuda": dict(rtol=1e-5, atol=1e-6)}
#: [unscale, clip]: both factors away from 1, so the passes must apply each where it belongs
GSCALE = (0.5, 0.25)


def _args(case):
    return case.param, case.grad, case.states, case.scalars, case.weight_decay


def first(backend, rule, case, eta=None, precond=False):
    eta = case.eta if eta is None else eta
    p, g, st, sc, wd = _args(case)
    return backend.first_pass(rule, p, g, st, sc, wd, eta, case.gscale, case.layout,
                              precond=precond)


def move(backend, rule, case, eta_old, eta_new, po=False, pn=False, sums=False):
    p, g, st, sc, wd = _args(case)
    return backend.move(rule, p, g, st, sc, wd, eta_old, eta_new, case.gscale, case.layout,
                        po, pn, sums)


def assert_same_case(a, b, tol):
    torch.testing.assert_close(b.param, a.param, **tol)
    for sa, sb in zip(a.states, b.states):
        torch.testing.assert_close(sb, sa, **tol)


def after_first_pass(rule_name, shape, device, seed=0):
    """A case whose θ sits at the first trial point (θ0 - eta d), as in a real search."""
    case = make_case(rule_name, *shape, seed=seed, device=device)
    case.gscale = torch.tensor(GSCALE, device=device)
    first(ref, RULES[rule_name], case)
    return case


def new_etas(eta):
    """Halve every block's step size but block 1's (an unchanged block when there are several)."""
    new = eta * 0.5
    if new.numel() > 1:
        new[1] = eta[1]
    return new


# -- the checks, shared by the interpreter tests and the compiled-GPU class ---------------------
def check_first_pass(rule_name, shape, device, precond=False):
    rule = RULES[rule_name]
    a = make_case(rule_name, *shape, seed=1, device=device)
    a.gscale = torch.tensor(GSCALE, device=device)
    b = a.clone()
    sa, sb = first(ref, rule, a, precond=precond), first(tri, rule, b, precond=precond)
    assert sb.shape == (a.layout.nblocks, 3) and sb.dtype == torch.float32
    assert_same_case(a, b, TOL[device])
    torch.testing.assert_close(sb, sa, **SUM_TOL[device])


def check_move(rule_name, po, pn, compute_sums, device):
    rule = RULES[rule_name]
    a = after_first_pass(rule_name, MULTI, device)
    b = a.clone()
    eta_new = new_etas(a.eta)
    kept = slice(a.layout.block_offsets[1], a.layout.block_offsets[2])
    theta_kept = b.param[kept].clone()
    ra = move(ref, rule, a, a.eta, eta_new, po, pn, compute_sums)
    rb = move(tri, rule, b, b.eta, eta_new, po, pn, compute_sums)
    assert_same_case(a, b, TOL[device])
    if po == pn:  # the unchanged block is not written at all
        assert torch.equal(b.param[kept], theta_kept)
    if compute_sums:
        torch.testing.assert_close(rb, ra, **SUM_TOL[device])
    else:
        assert rb is None and ra is None


def check_unchanged_blocks_untouched(rule_name, compute_sums, device):
    rule = RULES[rule_name]
    a = after_first_pass(rule_name, MULTI, device)
    b = a.clone()
    before = b.param.clone()
    ra = move(ref, rule, a, a.eta, a.eta.clone(), sums=compute_sums)
    rb = move(tri, rule, b, b.eta, b.eta.clone(), sums=compute_sums)
    assert torch.equal(b.param, before)  # bitwise, not merely close
    if compute_sums:  # the sums are still those of the current direction
        torch.testing.assert_close(rb, ra, **SUM_TOL[device])


def check_revert(rule_name, device):
    rule = RULES[rule_name]
    start = make_case(rule_name, *MULTI, seed=2, device=device)
    a, b = start.clone(), start.clone()
    first(ref, rule, a)
    first(tri, rule, b)
    assert not torch.equal(b.param, start.param)  # the first pass did move θ
    zero = torch.zeros_like(a.eta)
    move(ref, rule, a, a.eta, zero)
    move(tri, rule, b, b.eta, zero)
    assert_same_case(a, b, TOL[device])
    # back at θ0 up to the rounding of the round trip
    torch.testing.assert_close(b.param, start.param, rtol=1e-5, atol=1e-6)


def check_grad_sq_norm(shape, device):
    case = make_case("adam", *shape, seed=3, device=device)
    got = tri.grad_sq_norm(case.grad, case.layout)
    want = ref.grad_sq_norm(case.grad, case.layout)
    assert got.shape == (case.layout.nblocks,) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **SUM_TOL[device])


def check_nonfinite_gscale_writes_nothing(rule_name, bad, device):
    rule = RULES[rule_name]
    case = after_first_pass(rule_name, MULTI, device)
    case.gscale = torch.tensor(bad, dtype=torch.float32, device=device)
    before = case.clone()
    sums = first(tri, rule, case)
    assert torch.equal(sums, torch.zeros_like(sums))
    msums = move(tri, rule, case, case.eta, new_etas(case.eta), False, True, True)
    assert torch.equal(msums, torch.zeros_like(msums))
    assert torch.equal(case.param, before.param)
    for s, s0 in zip(case.states, before.states):
        assert torch.equal(s, s0)


def check_deterministic(rule_name, device):
    rule = RULES[rule_name]
    start = make_case(rule_name, (20000, 3000), 2048, seed=4, device=device)
    runs = []
    for _ in range(2):
        c = start.clone()
        s1 = first(tri, rule, c)
        s2 = move(tri, rule, c, c.eta, c.eta * 0.5, sums=True)
        runs.append((c.param, *c.states, s1, s2, tri.grad_sq_norm(c.grad, c.layout)))
    for x, y in zip(*runs):
        assert torch.equal(x, y)


def check_half_grads(rule_name, dtype, device):
    rule = RULES[rule_name]
    a = after_first_pass(rule_name, MULTI, device)
    a.grad = a.grad.to(dtype)
    b = a.clone()
    torch.testing.assert_close(first(tri, rule, b), first(ref, rule, a), **SUM_TOL[device])
    ra = move(ref, rule, a, a.eta, new_etas(a.eta), False, True, True)
    rb = move(tri, rule, b, b.eta, new_etas(b.eta), False, True, True)
    assert_same_case(a, b, TOL[device])
    torch.testing.assert_close(rb, ra, **SUM_TOL[device])
    torch.testing.assert_close(tri.grad_sq_norm(b.grad, b.layout),
                               ref.grad_sq_norm(a.grad, a.layout), **SUM_TOL[device])


def check_model_copy(rule_name, dtype, device):
    """bf16/fp16 model with fp32 master weights: every θ the kernels write lands in the model's
    copy rounded once (bitwise torch's cast of the master); a block the retry leaves alone keeps
    its copy untouched."""
    rule = RULES[rule_name]
    a = make_case(rule_name, *MULTI, seed=5, device=device)
    a.gscale = torch.tensor(GSCALE, device=device)
    a.grad = a.grad.to(dtype)
    b = a.clone()
    model_a, model_b = a.param.to(dtype), a.param.to(dtype)
    p, g, st, sc, wd = _args(a)
    sa = ref.first_pass(rule, p, g, st, sc, wd, a.eta, a.gscale, a.layout, model_a)
    p, g, st, sc, wd = _args(b)
    sb = tri.first_pass(rule, p, g, st, sc, wd, b.eta, b.gscale, b.layout, model_b)
    torch.testing.assert_close(sb, sa, **SUM_TOL[device])
    assert_same_case(a, b, TOL[device])
    assert torch.equal(model_b, b.param.to(dtype))

    eta_new = new_etas(b.eta)  # block 1 keeps its step size
    kept = slice(b.layout.block_offsets[1], b.layout.block_offsets[2])
    model_b[kept] = 0  # a marker the retry must not overwrite
    for c, m in ((a, model_a), (b, model_b)):
        p, g, st, sc, wd = _args(c)
        (ref if c is a else tri).move(rule, p, g, st, sc, wd, c.eta, eta_new, c.gscale,
                                      c.layout, False, False, False, m)
    assert_same_case(a, b, TOL[device])
    moved = torch.ones(b.layout.numel, dtype=torch.bool, device=device)
    moved[kept] = False
    assert torch.equal(model_b[moved], b.param.to(dtype)[moved])
    assert not model_b[kept].any()


def check_written_weights_replace_the_master(dtype, device):
    """Model elements that are not the master rounded (weights the user wrote) are the first
    pass's starting point; the others keep the fp32 master."""
    rule = RULES["adam"]
    a = make_case("adam", *MULTI, seed=6, device=device)
    a.gscale = torch.tensor(GSCALE, device=device)
    start = a.param.clone()
    model = a.param.to(dtype)
    written = torch.zeros(a.layout.numel, dtype=torch.bool, device=device)
    written[::7] = True
    model[written] = 0.5
    zero = torch.zeros_like(a.eta)  # no step: θ after the pass is where it started
    p, g, st, sc, _ = _args(a)
    tri.first_pass(rule, p, g.to(dtype), st, sc, 0.0, zero, a.gscale, a.layout, model)
    assert torch.equal(a.param[written], torch.full_like(a.param[written], 0.5))
    assert torch.equal(a.param[~written], start[~written])


def check_trial_points(rule_name, precond, device):
    """The K trial points of batched candidates: one pass, the torch twin's values, θ and the
    state untouched."""
    rule = RULES[rule_name]
    a = make_case(rule_name, *MULTI, seed=8, device=device)
    a.gscale = torch.tensor(GSCALE, device=device)
    first(ref, rule, a, eta=torch.zeros_like(a.eta))  # the search's first pass: state only
    before = a.clone()
    etas = [0.3, 0.15, 0.075]
    p, g, st, sc, wd = _args(a)
    got = tri.trial_points(rule, p, g, st, sc, wd, etas, a.gscale, a.layout, precond)
    want = ref.trial_points(rule, p, g, st, sc, wd, etas, a.gscale, a.layout, precond)
    assert got.shape == (3, a.layout.numel) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL[device])
    assert_same_case(before, a, dict(rtol=0, atol=0))
    assert not torch.equal(got[0], got[1])


def tiny_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 1))


def run_optimizer(cls, backend, device, steps=5, **kw):
    model = tiny_model(0).to(device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 12, generator=g).to(device)
    y = torch.randn(64, 1, generator=g).to(device)
    opt = cls(model.parameters(), backend=backend, cadence="every", **kw)
    etas = []
    for _ in range(steps):
        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(X), y)
            loss.backward()
            return loss

        opt.step(closure)
        etas.append(opt.stats["step_size"])
    return etas, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def check_optimizer(cls, direction, device, **kw):
    n = sum(p.numel() for p in tiny_model(0).parameters())
    assert n <= 2048
    etas_ref, theta_ref = run_optimizer(cls, "torch", device, direction=direction, **kw)
    etas_tri, theta_tri = run_optimizer(cls, "triton", device, direction=direction, **kw)
    assert etas_tri == etas_ref
    assert any(e > 0 for e in etas_ref)  # steps were taken, so the comparison means something
    torch.testing.assert_close(theta_tri, theta_ref, rtol=1e-5, atol=1e-5)


# -- interpreter (CPU) tests -------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-tile{s[1]}")
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_first_pass_matches_torch(rule_name, shape):
    check_first_pass(rule_name, shape, "cpu")


@interpreted
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_first_pass_on_the_fallback_line_matches_torch(rule_name):
    check_first_pass(rule_name, MULTI, "cpu", precond=True)


@interpreted
@pytest.mark.parametrize("compute_sums", [False, True], ids=["nosums", "sums"])
@pytest.mark.parametrize("po,pn", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_move_matches_torch(rule_name, po, pn, compute_sums):
    check_move(rule_name, po, pn, compute_sums, "cpu")


@interpreted
@pytest.mark.parametrize("compute_sums", [False, True], ids=["nosums", "sums"])
@pytest.mark.parametrize("rule_name", ["sgd", "adam"])
def test_move_leaves_unchanged_blocks_bitwise(rule_name, compute_sums):
    check_unchanged_blocks_untouched(rule_name, compute_sums, "cpu")


@interpreted
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_move_to_zero_reverts_to_theta0(rule_name):
    check_revert(rule_name, "cpu")


def _eta_whose_divisor_rounds_apart(wd: float) -> float:
    """A fp32 step size e for which 1 - e·wd formed in fp32 (two roundings) is not 1 - e·wd
    formed in fp64 and rounded once (the torch twin's Python-float divisor, the C++ kernel)."""
    e = torch.rand(100000, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.01
    in_fp64 = (1.0 - e.double() * wd).float()
    in_fp32 = 1.0 - e * torch.tensor(wd, dtype=torch.float32)
    return float(e[(in_fp64 != in_fp32).nonzero()[0, 0]])


@interpreted
@pytest.mark.parametrize("rule_name", ["sgd", "momentum", "nesterov"])
def test_move_divides_by_the_twins_rounding_of_one_minus_eta_wd(rule_name):
    """θ0 = (θ + e·u) / (1 - e·wd): the divisor is the twin's (fp64, rounded once), so for the
    rules whose other operations the twin rounds alike, the retry is bitwise the twin's."""
    rule, wd = RULES[rule_name], 0.01
    case = make_case(rule_name, (4096,), 4096, seed=0, weight_decay=wd)
    case.eta = torch.tensor([_eta_whose_divisor_rounds_apart(wd)])
    first(ref, rule, case)
    a, b = case.clone(), case.clone()
    for eta_new in (torch.zeros(1), case.eta * 0.5):
        move(ref, rule, a, a.eta, eta_new)
        move(tri, rule, b, b.eta, eta_new)
        assert torch.equal(b.param, a.param)
        a.eta, b.eta = eta_new.clone(), eta_new.clone()


@interpreted
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-tile{s[1]}")
def test_grad_sq_norm_matches_torch(shape):
    check_grad_sq_norm(shape, "cpu")


@interpreted
@pytest.mark.parametrize("bad", [(math.nan, 1.0), (1.0, math.inf), (-math.inf, 1.0)])
@pytest.mark.parametrize("rule_name", ["momentum", "nadam"])
def test_nonfinite_gscale_writes_nothing(rule_name, bad):
    check_nonfinite_gscale_writes_nothing(rule_name, bad, "cpu")


@interpreted
@pytest.mark.parametrize("rule_name", ["nesterov", "adam"])
def test_two_runs_are_bitwise_equal(rule_name):
    check_deterministic(rule_name, "cpu")


@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_direction_reads_grad_table_matches_the_torch_rules(rule_name):
    """The kernels skip the gradient load in ``move`` by this table: it must say the truth."""
    rule = RULES[rule_name]
    case = make_case(rule_name, (300,), 256)
    u1 = rule.direction(case.grad, case.states, case.scalars)
    u2 = rule.direction(case.grad * 2.0 + 1.0, case.states, case.scalars)
    assert DIRECTION_READS_GRAD[rule.rule_id] == (not torch.equal(u1, u2))


@interpreted
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_move_without_sums_reads_grad_only_when_the_direction_does(rule_name):
    # a NaN gradient poisons θ exactly when the pass loads it
    rule = RULES[rule_name]
    a = after_first_pass(rule_name, MULTI, "cpu")
    b = a.clone()
    b.grad.fill_(math.nan)
    move(ref, rule, a, a.eta, a.eta * 0.5)
    move(tri, rule, b, b.eta, b.eta * 0.5)
    if DIRECTION_READS_GRAD[rule.rule_id]:
        assert torch.isnan(b.param).any()
    else:
        torch.testing.assert_close(b.param, a.param, **TOL["cpu"])


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule_name", ["nesterov", "nadam"])
def test_half_precision_gradients_are_widened_like_torch(rule_name, dtype):
    check_half_grads(rule_name, dtype, "cpu")


def check_half_subnormal_grads(dtype, device):
    """Half gradients that are subnormal in their own format, read exactly: θ0 = 0, SGD, η = 1
    gives θ = −g bitwise (the interpreter's bf16 cast read 1.0e-39 as 4.4e-39)."""
    rule = RULES["sgd"]
    case = make_case("sgd", (384,), 128, seed=0, device=device)  # (no padding)
    n = case.layout.numel
    mantissa = 0x7F if dtype == torch.bfloat16 else 0x3FF  # exponent 0: subnormal
    bits = torch.arange(n, dtype=torch.int32) % mantissa + 1
    grad = (bits + 0x8000 * (torch.arange(n) % 2)).to(torch.int16)  # (odd ones negative)
    case.grad = grad.view(dtype).to(device)
    case.param = torch.zeros(n, device=device)
    case.weight_decay, case.eta = 0.0, torch.ones_like(case.eta)
    case.gscale = torch.tensor([1.0, 1.0], device=device)
    sums = first(tri, rule, case)
    want = -case.grad.float()
    assert (want != 0).all() and want.abs().max() < torch.finfo(dtype).tiny
    assert torch.equal(case.param, want)
    torch.testing.assert_close(sums[:, 1], want.double().pow(2).sum().float().reshape(1),
                               rtol=1e-5, atol=0)
    sq = tri.grad_sq_norm(case.grad, case.layout)
    torch.testing.assert_close(sq, want.double().pow(2).sum().float().reshape(1), rtol=1e-5, atol=0)


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradients_subnormal_in_their_format_are_read_exactly(dtype):
    check_half_subnormal_grads(dtype, "cpu")


@interpreted
def test_buffers_that_share_memory_are_refused_as_in_cpp():
    # the C++ passes refused them; the Triton ones wrote an order-dependent θ (a race on a GPU)
    rule = RULES["adam"]
    case = make_case("adam", (300,), 64, seed=0)
    before = case.param.clone()
    case.states = [case.param, case.states[1]]
    with pytest.raises(ValueError, match=r"param and states\[0\] share memory"):
        first(tri, rule, case)
    assert torch.equal(case.param, before)


@triton.jit
def round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """The kernels' store of θ with a model copy, alone: reads x, writes x and its copy."""
    offs = tl.arange(0, BLOCK)
    store_theta(x_ptr + offs, out_ptr + offs, offs < n, tl.load(x_ptr + offs, mask=offs < n),
                True)


@triton.jit
def fold_kernel(x_ptr, RULE: tl.constexpr):
    """``update_state`` alone, on 16 elements: g, a and b all read from x."""
    offs = tl.arange(0, 16)
    g = tl.load(x_ptr + offs)
    a, b = update_state(g, g, g, 0.9, 0.99, 0.1, 0.01, RULE)
    tl.store(x_ptr + offs, a + b)


def test_the_kernels_tables_name_the_rules_by_their_ids():
    from armijo_fused.kernels.rules import RULE_NAMES

    by_id = sorted(RULES.values(), key=lambda r: r.rule_id)
    assert RULE_NAMES == tuple(r.name for r in by_id)
    assert STATE_COUNT == tuple(len(r.state_names) for r in by_id)
    assert DIRECTION_READS_GRAD == tuple(r.direction_reads_grad for r in by_id)


@interpreted
def test_a_rule_id_without_its_branch_in_the_kernels_is_refused():
    # update_state's branches have nothing to fall through to: a new rule id without its own
    # branch left the state as it was (the other helpers fail on their undefined result)
    x = torch.ones(16)
    fold_kernel[(1,)](x, RULE=len(STATE_COUNT) - 1)
    assert torch.allclose(x, torch.full((16,), 2.0))  # (nadam: a and b as adam's)
    with pytest.raises(Exception, match="update_state has no branch for this RULE"):
        fold_kernel[(1,)](torch.ones(16), RULE=len(STATE_COUNT))


def check_round_to_model(dtype, device):
    x = rounding_edge_values().to(device)
    out = torch.empty(x.numel(), dtype=dtype, device=device)
    round_kernel[(1,)](x, out, x.numel(), BLOCK=2048)
    want = x.cpu().to(dtype)
    assert torch.equal(out.cpu().view(torch.int16), want.view(torch.int16))


@interpreted
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # to fp16 inf
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_copy_rounds_to_nearest_even_like_torch(dtype):
    check_round_to_model(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule_name", ["momentum", "adam", "nadam"])
def test_model_copy_of_master_weights_is_rounded_once(rule_name, dtype):
    check_model_copy(rule_name, dtype, "cpu")


@interpreted
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_written_into_the_model_replace_the_master(dtype):
    check_written_weights_replace_the_master(dtype, "cpu")


@interpreted
@pytest.mark.parametrize("precond", [False, True])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_trial_points_match_torch(rule_name, precond):
    check_trial_points(rule_name, precond, "cpu")


@interpreted
def test_wrapper_names_bad_inputs():
    rule = RULES["adam"]
    case = make_case("adam", (100,), 1024)
    with pytest.raises(ValueError, match="layout.numel"):
        tri.first_pass(rule, case.param[:50], case.grad, case.states, case.scalars, 0.0,
                       case.eta, case.gscale, case.layout)
    with pytest.raises(TypeError, match="float32"):
        tri.first_pass(rule, case.param.double(), case.grad, case.states, case.scalars, 0.0,
                       case.eta, case.gscale, case.layout)
    with pytest.raises(ValueError, match="eta must be a contiguous float32"):
        tri.first_pass(rule, case.param, case.grad, case.states, case.scalars, 0.0,
                       case.eta.double(), case.gscale, case.layout)
    with pytest.raises(ValueError, match="gscale must be"):
        tri.move(rule, case.param, case.grad, case.states, case.scalars, 0.0, case.eta,
                 case.eta, case.gscale[:1], case.layout)
    with pytest.raises(TypeError, match="model_param .* must be bfloat16 or float16"):
        tri.first_pass(rule, case.param, case.grad, case.states, case.scalars, 0.0,
                       case.eta, case.gscale, case.layout, case.param.clone())
    with pytest.raises(ValueError, match="model_param must be a contiguous flat buffer"):
        tri.first_pass(rule, case.param, case.grad, case.states, case.scalars, 0.0,
                       case.eta, case.gscale, case.layout, case.param[:10].bfloat16())
    with pytest.raises(ValueError, match="2 state buffers"):
        tri.move(rule, case.param, case.grad, case.states[:1], case.scalars, 0.0, case.eta,
                 case.eta, case.gscale, case.layout)


@interpreted
@pytest.mark.parametrize(
    "cls,direction,kw",
    [(ArmijoAdam, "adam", dict(weight_decay=0.01)),
     (ArmijoSGD, "nesterov", dict(weight_decay=0.0))],
    ids=["adam", "sgd-nesterov"],
)
def test_optimizer_on_triton_matches_torch(cls, direction, kw):
    check_optimizer(cls, direction, "cpu", **kw)


def test_the_device_guard_makes_the_buffers_device_current(monkeypatch):
    # Triton launches on the current CUDA device whatever the pointers' device: a buffer on the
    # second GPU of one process (device_map="auto") ran in device 0's context and stream
    import contextlib

    entered = []

    class Device:  # stands in for torch.cuda.device: records what would be made current
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append("restored")

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    assert isinstance(tri._device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(tri._device_guard(torch.device("cuda", 0)), contextlib.nullcontext)
    with tri._device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    assert entered[-1] == "restored"


@interpreted
@pytest.mark.parametrize("ncols", [1, 3])
def test_block_sums_over_blocks_longer_than_one_iteration(ncols):
    """The block reduction adds ``_TILES_PER_ITER`` tile partials per loop iteration: blocks of
    one tile, an empty block (one tile of padding), one tile short of an iteration, exactly one,
    one over and over two iterations each get their rows' sum, bitwise the same twice."""
    from armijo_fused.storage.layout import make_layout

    per = tri._TILES_PER_ITER
    tiles = [1, 0, per - 1, per, per + 1, 2 * per + 3, 1]
    layout = make_layout(tiles, tile=1)  # one element per tile: a block of n elements, n tiles
    gen = torch.Generator().manual_seed(5)
    partials = torch.randn(layout.ntiles, ncols, generator=gen)
    out = tri._block_sums(partials, layout)
    bounds = layout.block_tiles.tolist()
    want = torch.stack([partials[a:b].double().sum(0) for a, b in zip(bounds, bounds[1:])])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(out, tri._block_sums(partials, layout))


@interpreted
def test_a_tile_too_large_for_one_program_is_refused():
    case = make_case("adam", (40000,), 16384)  # 16384 fp32 per program spills on sm_90
    with pytest.raises(ValueError, match="tile 16384 is above 8192"):
        first(tri, RULES["adam"], case)


@interpreted
def test_every_launch_wrapper_goes_through_the_device_guard(monkeypatch):
    seen = []
    real = tri._device_guard
    monkeypatch.setattr(tri, "_device_guard", lambda d: seen.append(d) or real(d))
    case = make_case("adam", (3000,), 1024)
    rule = RULES["adam"]
    first(tri, rule, case)
    move(tri, rule, case, case.eta, case.eta * 0.5, sums=True)
    tri.grad_sq_norm(case.grad, case.layout)
    p, g, st, sc, wd = _args(case)
    tri.trial_points(rule, p, g, st, sc, wd, [0.1, 0.2], case.gscale, case.layout)
    assert seen == [torch.device("cpu")] * 4


def compile_for_sm90(kernel, constexprs: dict, half=(), half_type="bf16", table=False,
                     ir="ptx", num_warps=4) -> str:
    """The sm_90 PTX (or another stage, ``ir``) of one kernel variant, compiled without a GPU
    (16-byte aligned pointers and sizes, as the launcher specialises them at run time). ``half``:
    the pointer arguments that are ``half_type``; ``table``: ``param_ptr``/``grad_ptr`` are a
    tile table's int64 addresses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    sig = {}
    for n in names:
        if n.endswith("_ptr"):
            sig[n] = "*i32" if n in ("tile_block_ptr", "lengths_ptr", "tiles_ptr",
                                     "block_tiles_ptr") else (
                "*i64" if table and n in ("param_ptr", "grad_ptr") else
                f"*{half_type}" if n in half else "*fp32")
        else:
            sig[n] = ("constexpr" if n.isupper() else
                      "i32" if n in ("n_elements", "n_candidates") else "fp32")
    aligned = [i for i, n in enumerate(names) if n.endswith("_ptr") or n == "n_elements"]
    if "constexprs" in inspect.signature(ASTSource).parameters:
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        src = ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs)
    else:
        # a constexpr left out is its default, else None, as newer Triton takes it
        constexprs = {**{n: None if p.default is inspect.Parameter.empty else p.default
                         for n, p in zip(names, kernel.params) if sig[n] == "constexpr"},
                      **constexprs}
        try:  # Triton 3.1-3.2: constexprs given as constants, alignment in an AttrsDescriptor
            from triton.backends.compiler import AttrsDescriptor

            attrs = AttrsDescriptor.from_dict({"cls": "AttrsDescriptor",
                                               "arg_properties": {"tt.divisibility": aligned}})
            src = ASTSource(kernel, sig, constants=constexprs, attrs=attrs)
        except ImportError:  # Triton 3.0 (the floor): the same, by argument position
            from triton.compiler.compiler import AttrsDescriptor

            index = {n: i for i, n in enumerate(names)}
            src = ASTSource(kernel, {index[n]: t for n, t in sig.items() if t != "constexpr"},
                            constants={index[n]: v for n, v in constexprs.items()},
                            attrs=AttrsDescriptor(divisible_by_16=set(aligned)))
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "enable_fp_fusion": False})
    return k.asm[ir]


def int32_products() -> dict:
    """Per kernel that addresses elements, the int32 multiplications in its TTIR. Below 2**31
    elements Triton passes sizes as int32, so a product such as ``k * n_elements`` is taken in
    int32 and wraps before it is widened into a pointer offset (the batched candidates' rows did:
    a wrong address once (K - 1) * n_elements >= 2**31). Offsets must be int64 from the start."""
    from armijo_fused.kernels.candidates import trial_points_kernel
    from armijo_fused.kernels.first_pass import first_pass_kernel
    from armijo_fused.kernels.move import move_kernel
    from armijo_fused.kernels.reductions import (
        block_sum_kernel,
        table_tile_sq_sum_kernel,
        tile_sq_sum_kernel,
    )

    def muls(kernel, constexprs, **kw):
        text = compile_for_sm90(kernel, constexprs, ir="ttir", **kw)
        return [line.split(" loc(")[0].strip() for line in text.splitlines()
                if re.search(r"arith\.muli [^:]*: (?:i32\b|tensor<[^>]*xi32>)", line)]

    adam = {"RULE": 4, "NSTATES": 2, "BLOCK_SIZE": 2048, "WRITE_MODEL": False, "TABLE": False,
            "FULL": True}
    retry = dict(adam, PRECOND_OLD=False, PRECOND_NEW=False, COMPUTE_SUMS=True, LOAD_GRAD=True)
    return {"first": muls(first_pass_kernel, adam),
            "first_table": muls(first_pass_kernel, dict(adam, TABLE=True, FULL=False),
                                table=True),
            "retry": muls(move_kernel, retry),
            "trial_points": muls(trial_points_kernel, {"RULE": 4, "NSTATES": 2,
                                                       "PRECOND": False, "BLOCK_SIZE": 2048}),
            "guard": muls(tile_sq_sum_kernel, {"BLOCK_SIZE": 2048}),
            "guard_table": muls(table_tile_sq_sum_kernel, {"BLOCK_SIZE": 2048, "FULL": False},
                                table=True),
            "block_sums": muls(block_sum_kernel, {"NCOLS": 3, "TILES_PER_ITER": tri._TILES_PER_ITER})}


def compiled_access_counts() -> dict:
    """Global vector loads/stores and FMAs in the sm_90 PTX of the passes (no GPU needed).

    Run in a process without TRITON_INTERPRET (kernels decorated under the interpreter cannot be
    compiled): see ``test_compiled_passes_move_the_byte_budget``.
    """
    from armijo_fused.kernels.candidates import trial_points_kernel
    from armijo_fused.kernels.first_pass import first_pass_kernel
    from armijo_fused.kernels.move import move_kernel
    from armijo_fused.kernels.reductions import table_tile_sq_sum_kernel, tile_sq_sum_kernel

    def ptx(kernel, constexprs, half=(), table=False):
        text = compile_for_sm90(kernel, constexprs, half=half, table=table)
        return {"ld": len(re.findall(r"ld\.global\.v4", text)),
                "st": len(re.findall(r"st\.global\.v4", text)),
                "fma": len(re.findall(r"fma\.rn\.f32", text))}

    adam = {"RULE": 4, "NSTATES": 2, "BLOCK_SIZE": 2048, "WRITE_MODEL": False, "TABLE": False,
            "FULL": True}
    retry = dict(adam, PRECOND_OLD=False, PRECOND_NEW=False, COMPUTE_SUMS=False)
    # bf16 model, fp32 master: bf16 gradient in, bf16 copy of θ out
    bf16 = dict(half=("grad_ptr", "model_ptr"))
    return {"first": ptx(first_pass_kernel, adam),
            "retry": ptx(move_kernel, dict(retry, LOAD_GRAD=False)),
            "nadam_retry": ptx(move_kernel, dict(retry, RULE=5, LOAD_GRAD=True)),
            "first_bf16": ptx(first_pass_kernel, dict(adam, WRITE_MODEL=True), **bf16),
            "retry_bf16": ptx(move_kernel, dict(retry, LOAD_GRAD=False, WRITE_MODEL=True), **bf16),
            # θ and g through a tile table (FSDP2 shards in place)
            "first_table": ptx(first_pass_kernel, dict(adam, TABLE=True), table=True),
            "retry_table": ptx(move_kernel, dict(retry, LOAD_GRAD=False, TABLE=True), table=True),
            "trial_points": ptx(trial_points_kernel, {"RULE": 4, "NSTATES": 2, "PRECOND": False,
                                                      "BLOCK_SIZE": 2048}),
            # the non-finite guard's Σ g², flat and through a table
            "guard": ptx(tile_sq_sum_kernel, {"BLOCK_SIZE": 2048}),
            "guard_table": ptx(table_tile_sq_sum_kernel, {"BLOCK_SIZE": 2048, "FULL": True},
                               table=True)}


def compile_every_variant() -> int:
    """Compile every variant the Triton backend can launch to sm_90 PTX; returns how many.

    Rules × the flags each wrapper passes (model copy in bf16/fp16, tile table with full and
    partial tiles, the retry's preconditioner switches and sums, batched candidates, the guard and
    the block sums), so a construct that one Triton version cannot compile fails here, on any
    machine, rather than on a GPU. Like ``compiled_access_counts``, run without the interpreter.
    """
    from armijo_fused.kernels.candidates import trial_points_kernel
    from armijo_fused.kernels.first_pass import first_pass_kernel
    from armijo_fused.kernels.move import move_kernel
    from armijo_fused.kernels.reductions import (
        block_sum_kernel,
        table_tile_sq_sum_kernel,
        tile_sq_sum_kernel,
    )
    from armijo_fused.kernels.rules import STATE_COUNT

    n = 0

    def build(kernel, constexprs, **kw):
        nonlocal n
        # a constexpr left out compiles as None (False) without a word: name them all
        missing = [a for a in kernel.arg_names if a.isupper() and a not in constexprs]
        assert not missing, f"{kernel.__name__}: constexprs {missing} not given"
        assert compile_for_sm90(kernel, constexprs, **kw)
        n += 1

    flat = {"WRITE_MODEL": False, "TABLE": False, "FULL": True, "BLOCK_SIZE": 2048}
    stores = [(dict(flat), {}),  # fp32; a bf16/fp16 model with its half gradient; a table
              (dict(flat, WRITE_MODEL=True), {"half": ("grad_ptr", "model_ptr")}),
              (dict(flat, WRITE_MODEL=True),
               {"half": ("grad_ptr", "model_ptr"), "half_type": "fp16"}),
              (dict(flat, WRITE_MODEL=True), {"half": ("model_ptr",)}),
              (dict(flat, TABLE=True), {"table": True}),
              (dict(flat, TABLE=True, FULL=False), {"table": True})]
    for rule, nstates in enumerate(STATE_COUNT):
        rk = {"RULE": rule, "NSTATES": nstates}
        for c, kw in stores:  # PRECOND: the first trial on the fallback line (passes.py)
            for precond in (False, True):
                build(first_pass_kernel, dict(c, PRECOND=precond, **rk), **kw)
        for po in (False, True):
            for pn in (False, True):
                for sums in (False, True):
                    grad = sums or po or pn or DIRECTION_READS_GRAD[rule]
                    retry = dict(rk, PRECOND_OLD=po, PRECOND_NEW=pn, COMPUTE_SUMS=sums,
                                 LOAD_GRAD=grad)
                    for c, kw in stores:  # passes.py moves a model copy or table on any line
                        build(move_kernel, dict(c, **retry), **kw)
        for precond in (False, True):
            build(trial_points_kernel, dict(rk, PRECOND=precond, BLOCK_SIZE=2048))
    for block in (1024, 2048, 4096):
        build(tile_sq_sum_kernel, {"BLOCK_SIZE": block})
    for half_type in ("bf16", "fp16"):
        build(tile_sq_sum_kernel, {"BLOCK_SIZE": 2048}, half=("x_ptr",), half_type=half_type)
    for full in (True, False):
        build(table_tile_sq_sum_kernel, {"BLOCK_SIZE": 2048, "FULL": full}, table=True)
    for ncols in (1, 3):
        build(block_sum_kernel, {"NCOLS": ncols, "TILES_PER_ITER": tri._TILES_PER_ITER},
              num_warps=tri._SUM_WARPS)  # (as they launch)
    return n


def run_compiler(helper: str):
    """Call ``helper`` of this module in a fresh process without the interpreter (kernels
    decorated under it cannot be compiled) and return its JSON result."""
    import triton

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_triton_kernels as t; "
            f"print(json.dumps(t.{helper}()))")
    here = str(Path(__file__).resolve().parent)
    out = subprocess.run([sys.executable, "-c", code, here], env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(700)
def test_every_launchable_variant_compiles_for_sm90():
    """Every kernel variant the Triton backend can launch compiles to sm_90 PTX (381 of them), so
    a construct this Triton cannot compile shows up in CI, not in the first minutes on a GPU."""
    assert run_compiler("compile_every_variant") == 381


def test_element_offsets_are_never_an_int32_product():
    assert run_compiler("int32_products") == {k: [] for k in (
        "first", "first_table", "retry", "trial_points", "guard", "guard_table", "block_sums")}


def test_compiled_passes_move_the_byte_budget():
    """Adam: the first pass reads 4 streams and writes 3 (28 B), the retry reads θ, m, v and
    writes θ (16 B, no gradient load), NAdam's retry also reads g, and no FMA is emitted; with a
    bf16 model and fp32 master weights the bf16 gradient and model copy add no other traffic; the
    guard reads g once, flat or through a table."""
    c = run_compiler("compiled_access_counts")
    first, retry, nadam_retry = c["first"], c["retry"], c["nadam_retry"]
    k = first["ld"] // 4  # vector loads per stream
    assert k >= 1 and first == {"ld": 4 * k, "st": 3 * k, "fma": 0}
    assert retry == {"ld": 3 * k, "st": k, "fma": 0}
    assert nadam_retry == {"ld": 4 * k, "st": k, "fma": 0}  # NAdam's u reads g: 20 B
    # bf16 model with fp32 master: the gradient read and the model copy read (to take weights
    # the user wrote) and written are half-width vectors: the first pass moves 30 B per
    # parameter, the retry 18 B
    h = k // 2
    assert c["first_bf16"] == {"ld": 3 * k + 2 * h, "st": 3 * k + h, "fma": 0}
    assert c["retry_bf16"] == {"ld": 3 * k, "st": k + h, "fma": 0}
    # θ and g through a tile table: the full-tile launch keeps every access a 16-byte vector
    assert c["first_table"] == first and c["retry_table"] == retry
    # batched candidates: θ, m, v read once (Adam's direction does not read g once the state is
    # updated), then one vector store per candidate in the loop
    assert c["trial_points"] == {"ld": 3 * k, "st": k, "fma": 0}
    # the guard reads g once (4 B), in 16-byte vectors through a table's full tiles too
    assert c["guard"] == {"ld": k, "st": 0, "fma": 0}
    assert c["guard_table"] == c["guard"]


# -- compiled Triton on a CUDA device: the same checks -------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
class TestCompiledTriton:
    @pytest.mark.parametrize("shape", SHAPES + [((20000, 3000), 2048), ((300000,), 4096)],
                             ids=str)
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_first_pass(self, rule_name, shape):
        check_first_pass(rule_name, shape, "cuda")

    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_first_pass_on_the_fallback_line(self, rule_name):
        check_first_pass(rule_name, MULTI, "cuda", precond=True)

    @pytest.mark.parametrize("compute_sums", [False, True])
    @pytest.mark.parametrize("po,pn", [(False, False), (False, True), (True, False), (True, True)])
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_move(self, rule_name, po, pn, compute_sums):
        check_move(rule_name, po, pn, compute_sums, "cuda")

    @pytest.mark.parametrize("compute_sums", [False, True])
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_unchanged_blocks_untouched(self, rule_name, compute_sums):
        check_unchanged_blocks_untouched(rule_name, compute_sums, "cuda")

    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_revert(self, rule_name):
        check_revert(rule_name, "cuda")

    @pytest.mark.parametrize("shape", SHAPES, ids=str)
    def test_grad_sq_norm(self, shape):
        check_grad_sq_norm(shape, "cuda")

    @pytest.mark.parametrize("bad", [(math.nan, 1.0), (1.0, math.inf)])
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_nonfinite_gscale(self, rule_name, bad):
        check_nonfinite_gscale_writes_nothing(rule_name, bad, "cuda")

    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_deterministic(self, rule_name):
        check_deterministic(rule_name, "cuda")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_half_precision_gradients(self, rule_name, dtype):
        check_half_grads(rule_name, dtype, "cuda")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_model_copy(self, rule_name, dtype):
        check_model_copy(rule_name, dtype, "cuda")

    @pytest.mark.parametrize("precond", [False, True])
    @pytest.mark.parametrize("rule_name", RULE_NAMES)
    def test_trial_points(self, rule_name, precond):
        check_trial_points(rule_name, precond, "cuda")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_written_weights_replace_the_master(self, dtype):
        check_written_weights_replace_the_master(dtype, "cuda")

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_round_to_model(self, dtype):
        check_round_to_model(dtype, "cuda")

    def test_optimizer(self):
        check_optimizer(ArmijoAdam, "adam", "cuda", weight_decay=0.01)
