"""Parity of the C++ CPU passes (armijo_fused._C) with the torch reference (torch_backend.py).

The kernels keep the torch twin's operation order in fp32, so parameters and states agree to a
few ulps (torch may fuse a multiply-add where the kernels round twice); the per-block sums are
accumulated in double per tile, so they agree with torch's fp32 sums to fp32 summation error.
Also checked: the skip of unchanged blocks, the revert, the non-finite gscale guard, bitwise
determinism across runs and thread counts, error messages, the torch.compile registration
(opcheck), and whole optimizers with backend="cpp" against backend="torch".
"""

from __future__ import annotations

import pytest
import torch
from kernel_cases import SHAPES, make_case, rounding_edge_values
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD, ops
from armijo_fused.backends import cpp_backend as cpp
from armijo_fused.backends import resolve_backend
from armijo_fused.backends import torch_backend as ref
from armijo_fused.directions import RULES
from armijo_fused.storage.layout import make_layout

pytestmark = [
    pytest.mark.skipif(not ops.available(), reason=f"C++ extension unavailable: "
                       f"{ops.why_unavailable()}"),
    pytest.mark.timeout(120),
]

RULE_NAMES = list(RULES)
TOL = dict(rtol=1e-6, atol=1e-7)
#: [unscale, clip]: both away from 1, so each must be applied where it belongs
GSCALE = (0.5, 0.25)
MULTI = ((3000, 17, 1), 512)
PRECONDS = [(False, False), (False, True), (True, False), (True, True)]


def _simds():
    """The kernel builds this machine can run: the baseline, and AVX2 where the CPU has it."""
    if not ops.available():
        return []
    found, before = ["baseline"], ops.cpu_simd()
    try:
        ops.set_cpu_simd("avx2")
        found.append("avx2")
    except RuntimeError:
        pass
    finally:
        ops.set_cpu_simd(before)
    return found


SIMDS = _simds()


@pytest.fixture(params=SIMDS)
def simd(request):
    before = ops.cpu_simd()
    yield ops.set_cpu_simd(request.param)
    ops.set_cpu_simd(before)


def shape_id(shape):
    sizes, tile = shape
    return "x".join(map(str, sizes)) + f"-t{tile}"


def case(rule_name, shape, seed=0, **kw):
    c = make_case(rule_name, *shape, seed=seed, **kw)
    c.gscale = torch.tensor(GSCALE)
    return c


def assert_sums_close(actual, expected):
    """fp32 summation error: relative to the largest sum of that kind."""
    scale = expected.abs().amax(dim=0, keepdim=True).clamp_min(1e-30)
    torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=2e-6)


def run_first(backend, rule, c, precond=False):
    return backend.first_pass(rule, c.param, c.grad, c.states, c.scalars, c.weight_decay, c.eta,
                              c.gscale, c.layout, precond=precond)


def run_move(backend, rule, c, eta_old, eta_new, po=False, pn=False, sums=False):
    return backend.move(rule, c.param, c.grad, c.states, c.scalars, c.weight_decay, eta_old,
                        eta_new, c.gscale, c.layout, po, pn, sums)


def assert_case_close(a, b):
    torch.testing.assert_close(a.param, b.param, **TOL)
    for x, y in zip(a.states, b.states):
        torch.testing.assert_close(x, y, **TOL)


# -- first pass ------------------------------------------------------------------------------------
@pytest.mark.parametrize("precond", [False, True], ids=["along_d", "on_fallback"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_first_pass_matches_torch(rule_name, shape, precond, simd):
    rule, c = RULES[rule_name], case(rule_name, shape)
    a, b = c.clone(), c.clone()
    s_ref = run_first(ref, rule, a, precond)
    s_cpp = run_first(cpp, rule, b, precond)
    assert s_cpp.dtype == torch.float32 and s_cpp.shape == (c.layout.nblocks, 3)
    assert_case_close(b, a)
    assert_sums_close(s_cpp, s_ref)
    assert not torch.equal(b.param, c.param)  # it did move


@pytest.mark.parametrize("backend", [ref, cpp], ids=["torch", "cpp"])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_first_pass_on_the_fallback_line_is_first_pass_then_move_there(rule_name, backend):
    # one pass where a search along g (SGD with momentum) took two: same state, same sums of
    # (g, d), and θ at θ0 - η p (to rounding: the two-pass path went out along d and back)
    rule, c = RULES[rule_name], case(rule_name, MULTI, seed=3, weight_decay=0.1)
    one, two = c.clone(), c.clone()
    s_one = run_first(backend, rule, one, precond=True)
    s_two = run_first(backend, rule, two)
    run_move(backend, rule, two, two.eta, two.eta, po=False, pn=True)
    assert torch.equal(s_one, s_two)
    for x, y in zip(one.states, two.states):
        assert torch.equal(x, y)
    torch.testing.assert_close(one.param, two.param, rtol=1e-5, atol=1e-6)
    assert not torch.equal(one.param, run_first_along_d(backend, rule, c))


def run_first_along_d(backend, rule, c):
    c = c.clone()
    run_first(backend, rule, c)
    return c.param


# -- trial points (batched candidates) -------------------------------------------------------------
def run_trials(backend, rule, c, etas, precond=False):
    return backend.trial_points(rule, c.param, c.grad, c.states, c.scalars, c.weight_decay, etas,
                                c.gscale, c.layout, precond)


@pytest.mark.parametrize("precond", [False, True], ids=["along_d", "on_fallback"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_trial_points_match_torch(rule_name, shape, precond, simd):
    """K rows θ0 − η_k·d from the state the search's first pass left (θ at θ0), nothing written."""
    rule, c = RULES[rule_name], case(rule_name, shape, seed=8)
    run_first(ref, rule, c, precond)
    c.param.copy_(case(rule_name, shape, seed=8).param)  # (θ back at θ0; the state updated)
    before = c.clone()
    etas = [0.3, 0.15, 0.075, 1e-3, 0.0]
    got = run_trials(cpp, rule, c, etas, precond)
    want = run_trials(ref, rule, c, etas, precond)
    assert got.shape == (len(etas), c.layout.numel) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)
    assert torch.equal(got[-1], c.param)  # η = 0: θ0 itself
    assert not torch.equal(got[0], got[1])
    for x, y in zip([c.param, *c.states], [before.param, *before.states]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule_name", ["sgd", "adam", "nadam"])
def test_trial_points_of_half_gradients_match_torch(rule_name, dtype, simd):
    rule, c = RULES[rule_name], case(rule_name, MULTI, seed=9)
    c.grad = c.grad.to(dtype)
    torch.testing.assert_close(run_trials(cpp, rule, c, [0.2, 0.05]),
                               run_trials(ref, rule, c, [0.2, 0.05]), **TOL)


@pytest.mark.parametrize("tile", [512, 3, 2**63 - 1])  # (the last: its tile count overflowed)
def test_trial_points_of_a_length_that_is_not_whole_tiles(tile):
    # (the flat store pads to whole tiles; the op itself takes any length: the last tile short)
    rule, c = RULES["adam"], case("adam", ((1000,), 512), seed=3)
    n = 777
    p, g, st = c.param[:n].clone(), c.grad[:n].clone(), [s[:n].clone() for s in c.states]
    etas = torch.tensor([0.5, 0.25])
    got = ops.trial_points(rule.rule_id, p, g, st, c.scalars, c.weight_decay, etas, c.gscale,
                           tile)
    want = run_trials(ref, rule, c, [0.5, 0.25])[:, :n]
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("change, match", [
    (dict(etas=torch.tensor([])), "etas must be a contiguous 1-D float32 CPU tensor of at least"),
    (dict(etas=torch.tensor([0.1], dtype=torch.float64)), "etas must be .*got Double"),
    (dict(rule=9), "unknown rule id 9"),
    (dict(states=[]), "rule adam \\(id 4\\) keeps 2 state buffer\\(s\\), got 0"),
    (dict(tile=0), "tile must be positive"),
    (dict(grad=torch.zeros(5)), "grad has 5 elements but param has"),
])
def test_trial_points_errors_name_the_argument(change, match):
    c = case("adam", ((300,), 64))
    args = dict(rule=4, param=c.param, grad=c.grad, states=c.states, etas=torch.tensor([0.1]),
                tile=64)
    args.update(change)
    with pytest.raises(RuntimeError, match=match):
        ops.trial_points(args["rule"], args["param"], args["grad"], args["states"], c.scalars,
                         0.0, args["etas"], c.gscale, args["tile"])


# -- move ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compute_sums", [False, True])
@pytest.mark.parametrize("po,pn", PRECONDS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_move_matches_torch(rule_name, shape, po, pn, compute_sums, simd):
    rule, c = RULES[rule_name], case(rule_name, shape, seed=1)
    run_first(ref, rule, c)  # θ at the first trial point, states updated
    a, b = c.clone(), c.clone()
    eta_mid = c.eta * 0.5
    eta_last = c.eta * 0.25
    for e_old, e_new, p_old, p_new in ((c.eta, eta_mid, po, pn), (eta_mid, eta_last, pn, pn)):
        s_ref = run_move(ref, rule, a, e_old, e_new, p_old, p_new, compute_sums)
        s_cpp = run_move(cpp, rule, b, e_old, e_new, p_old, p_new, compute_sums)
        assert_case_close(b, a)
        if compute_sums:
            assert_sums_close(s_cpp, s_ref)
        else:
            assert s_cpp is None and s_ref is None
    assert not torch.equal(b.param, c.param)
    for x, y in zip(b.states, c.states):  # move only reads the state
        assert torch.equal(x, y)


@pytest.mark.parametrize("compute_sums", [False, True])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_move_leaves_unchanged_blocks_unwritten(rule_name, compute_sums):
    rule, c = RULES[rule_name], case(rule_name, MULTI, seed=2)
    run_first(ref, rule, c)
    before = c.param.clone()
    eta_new = c.eta.clone()
    eta_new[1:] *= 0.5  # block 0 keeps its step size and direction
    a, b = c.clone(), c.clone()
    s_ref = run_move(ref, rule, a, c.eta, eta_new, sums=compute_sums)
    s_cpp = run_move(cpp, rule, b, c.eta, eta_new, sums=compute_sums)
    sl = slice(c.layout.block_offsets[0], c.layout.block_offsets[1])
    rest = slice(c.layout.block_offsets[1], None)
    assert torch.equal(b.param[sl], before[sl])  # bitwise: never rewritten
    torch.testing.assert_close(b.param[rest], a.param[rest], **TOL)
    assert not torch.equal(b.param[rest], before[rest])
    if compute_sums:
        assert_sums_close(s_cpp, s_ref)
    # the test can fail: recomputing block 0 through θ0 does not give back the same bits
    u = rule.direction(c.grad * GSCALE[0] * GSCALE[1], c.states, c.scalars)
    e = float(c.eta[0])
    theta0 = (before[sl] + e * u[sl]) / (1 - e * c.weight_decay)
    recomputed = theta0 - e * (u[sl] + c.weight_decay * theta0)
    assert not torch.equal(recomputed, before[sl])


def test_move_with_nothing_changed_writes_nothing():
    rule, c = RULES["adam"], case("adam", MULTI, seed=3)
    run_first(ref, rule, c)
    before = c.param.clone()
    assert run_move(cpp, rule, c, c.eta, c.eta.clone()) is None
    assert torch.equal(c.param, before)
    sums = run_move(cpp, rule, c, c.eta, c.eta.clone(), sums=True)
    assert torch.equal(c.param, before)
    assert sums.abs().sum() > 0


@pytest.mark.parametrize("po", [False, True, "first"])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_move_to_zero_reverts_to_theta0(rule_name, po):
    rule, c = RULES[rule_name], case(rule_name, MULTI, seed=4, weight_decay=0.1)
    c.eta = c.eta * 20  # a long step, so the revert has something to undo
    theta0 = c.param.clone()
    run_first(cpp, rule, c, precond=po == "first")  # "first": the first pass wrote that line
    if po is True:  # the fallback direction was applied: move there, then revert from it
        run_move(cpp, rule, c, c.eta, c.eta, po=False, pn=True)
    po = bool(po)
    assert (c.param - theta0).abs().max() > 1e-4
    run_move(cpp, rule, c, c.eta, torch.zeros_like(c.eta), po=po, pn=po)
    torch.testing.assert_close(c.param, theta0, rtol=1e-5, atol=1e-6)


# -- bf16/fp16 models: half gradients in, the model's half copy of the fp32 master out ----------
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_half_gradients_and_model_copy_match_torch(rule_name, dtype, simd):
    """A half gradient is widened as torch widens it; every θ written lands in the model copy
    rounded once (bitwise torch's cast of the master), and a block the retry leaves alone keeps
    its copy untouched."""
    rule = RULES[rule_name]
    a = case(rule_name, MULTI, seed=11)
    a.grad = a.grad.to(dtype)
    b = a.clone()
    model_a, model_b = a.param.to(dtype), a.param.to(dtype)
    assert_sums_close(cpp.first_pass(rule, b.param, b.grad, b.states, b.scalars,
                                     b.weight_decay, b.eta, b.gscale, b.layout, model_b),
                      ref.first_pass(rule, a.param, a.grad, a.states, a.scalars,
                                     a.weight_decay, a.eta, a.gscale, a.layout, model_a))
    assert_case_close(b, a)
    assert torch.equal(model_b, b.param.to(dtype))
    assert not torch.equal(model_b, a.param.to(dtype).zero_())  # the copy was written

    eta_new = b.eta * 0.5
    eta_new[1] = b.eta[1]  # block 1 keeps its step size: neither θ nor its copy is written
    kept = slice(b.layout.block_offsets[1], b.layout.block_offsets[2])
    model_b[kept] = 0  # a marker the retry must not overwrite
    ra = ref.move(rule, a.param, a.grad, a.states, a.scalars, a.weight_decay, a.eta, eta_new,
                  a.gscale, a.layout, False, False, True, model_a)
    rb = cpp.move(rule, b.param, b.grad, b.states, b.scalars, b.weight_decay, b.eta, eta_new,
                  b.gscale, b.layout, False, False, True, model_b)
    assert_sums_close(rb, ra)
    assert_case_close(b, a)
    moved = torch.ones_like(model_b, dtype=torch.bool)
    moved[kept] = False
    assert torch.equal(model_b[moved], b.param.to(dtype)[moved])
    assert torch.equal(model_b[kept], torch.zeros_like(model_b[kept]))

    # the fallback direction changes every block: the whole copy is rewritten
    ref.move(rule, a.param, a.grad, a.states, a.scalars, a.weight_decay, eta_new, eta_new,
             a.gscale, a.layout, False, True, False, model_a)
    cpp.move(rule, b.param, b.grad, b.states, b.scalars, b.weight_decay, eta_new, eta_new,
             b.gscale, b.layout, False, True, False, model_b)
    assert_case_close(b, a)
    assert torch.equal(model_b, b.param.to(dtype))


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("rule_name", ["sgd", "adam"])
def test_weights_written_into_the_model_replace_the_master(rule_name, dtype, simd):
    """Elements of the model copy that are not the master rounded (the user loaded or initialised
    weights) are where the first pass starts from; the rest keep the exact fp32 master."""
    rule = RULES[rule_name]
    a = case(rule_name, MULTI, seed=13)
    a.grad = a.grad.to(dtype)
    model = a.param.to(dtype)
    written = torch.zeros(a.layout.numel, dtype=torch.bool)
    written[::7] = True
    model[written] = 0.5
    b = a.clone()
    model_a, model_b = model.clone(), model.clone()
    zero = torch.zeros_like(a.eta)  # no step: θ after the pass is where the pass started
    assert_sums_close(cpp.first_pass(rule, b.param, b.grad, b.states, b.scalars, 0.0, zero,
                                     b.gscale, b.layout, model_b),
                      ref.first_pass(rule, a.param, a.grad, a.states, a.scalars, 0.0, zero,
                                     a.gscale, a.layout, model_a))
    assert torch.equal(b.param, a.param) and torch.equal(model_b, model_a)
    assert torch.equal(b.param[written], torch.full_like(b.param[written], 0.5))
    start = case(rule_name, MULTI, seed=13).param
    assert torch.equal(b.param[~written], start[~written])  # the fp32 master, not its rounding


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_model_copy_rounds_to_nearest_even_like_torch(dtype, simd):
    """SGD with a zero gradient and no weight decay writes θ unchanged: the copy is the cast.
    (±inf is left out: d = 0 + 0·inf is NaN there.)"""
    x = rounding_edge_values()
    x = x[torch.isfinite(x)]
    c = make_case("sgd", (x.numel(),), 256, weight_decay=0.0)
    c.param[: x.numel()] = x
    c.grad.zero_()
    model = torch.zeros(c.layout.numel, dtype=dtype)
    cpp.first_pass(RULES["sgd"], c.param, c.grad, c.states, c.scalars, 0.0, c.eta,
                   torch.ones(2), c.layout, model)
    assert torch.equal(model.view(torch.int16), c.param.to(dtype).view(torch.int16))


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_grad_sq_norm_of_half_gradients(dtype, simd):
    c = case("sgd", ((3000, 17, 1), 512), seed=12)
    g = c.grad.to(dtype)
    torch.testing.assert_close(cpp.grad_sq_norm(g, c.layout), ref.grad_sq_norm(g, c.layout),
                               rtol=2e-6, atol=1e-30)


# -- grad norm and the non-finite guard -----------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_grad_sq_norm_matches_torch(shape, simd):
    c = case("sgd", shape)
    c.grad[: c.layout.block_numels[0]] *= 30  # a spread of magnitudes
    expected = ref.grad_sq_norm(c.grad, c.layout)
    out = cpp.grad_sq_norm(c.grad, c.layout)
    assert out.dtype == torch.float32 and out.shape == (c.layout.nblocks,)
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-30)


@pytest.mark.parametrize("bad", [(float("nan"), 1.0), (1.0, float("inf")), (float("-inf"), 0.5)])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_non_finite_gscale_writes_nothing(rule_name, bad):
    rule, c = RULES[rule_name], case(rule_name, MULTI, seed=5)
    c.gscale = torch.tensor(bad)
    before = c.clone()
    sums = run_first(cpp, rule, c)
    assert torch.equal(sums, torch.zeros(c.layout.nblocks, 3))
    for pc, sums_on in ((False, False), (True, True)):
        out = run_move(cpp, rule, c, c.eta, c.eta * 0.5, po=False, pn=pc, sums=sums_on)
        if sums_on:
            assert torch.equal(out, torch.zeros(c.layout.nblocks, 3))
    assert torch.equal(c.param, before.param)
    for x, y in zip(c.states, before.states):
        assert torch.equal(x, y)


# -- determinism -----------------------------------------------------------------------------------
def _passes(rule, c, half=None):
    """First pass, a retry with sums, the gradient norm; with ``half`` a half-precision model
    (half gradient, a model copy in which every 5th weight was written since the last step)."""
    c = c.clone()
    model = None
    if half is not None:
        c.grad = c.grad.to(half)
        model = c.param.to(half)
        model[::5] = 0.25
    s1 = cpp.first_pass(rule, c.param, c.grad, c.states, c.scalars, c.weight_decay, c.eta,
                        c.gscale, c.layout, model)
    s2 = cpp.move(rule, c.param, c.grad, c.states, c.scalars, c.weight_decay, c.eta,
                  c.eta * 0.5, c.gscale, c.layout, False, True, True, model)
    s3 = cpp.grad_sq_norm(c.grad, c.layout)
    trials = cpp.trial_points(rule, c.param, c.grad, c.states, c.scalars, c.weight_decay,
                              [0.2, 0.1], c.gscale, c.layout)
    return [s1, s2, s3, trials, c.param] + list(c.states) + ([model] if model is not None else [])


@pytest.mark.parametrize("rule_name", ["adam", "nesterov"])
def test_bitwise_deterministic_across_runs_and_threads(rule_name):
    # several parallel work items per block, blocks that end inside a tile
    rule, c = RULES[rule_name], case(rule_name, ((150_001, 70_000, 999), 2048), seed=6)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _passes(rule, c)
        again = _passes(rule, c)
        torch.set_num_threads(1)
        single = _passes(rule, c)
    finally:
        torch.set_num_threads(threads)
    for x, y, z in zip(first, again, single):
        assert torch.equal(x, y)
        assert torch.equal(x, z)


@pytest.mark.skipif(len(SIMDS) < 2, reason="one kernel build on this machine (no AVX2)")
@pytest.mark.parametrize("half", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("rule_name", RULE_NAMES)
def test_bitwise_identical_across_instruction_sets(rule_name, half):
    """bf16 included: its conversions run inside the SIMD kernels, lane by lane."""
    rule, c = RULES[rule_name], case(rule_name, ((150_001, 70_000, 999), 2048), seed=7)
    before = ops.cpu_simd()
    try:
        results = {}
        for name in SIMDS:
            ops.set_cpu_simd(name)
            results[name] = _passes(rule, c, half)
    finally:
        ops.set_cpu_simd(before)
    for x, y in zip(results["baseline"], results["avx2"]):
        assert torch.equal(x, y)


def test_unknown_simd_is_an_error():
    with pytest.raises(RuntimeError, match="SIMD avx9 is not available"):
        ops.set_cpu_simd("avx9")


# -- errors ----------------------------------------------------------------------------------------
def _op_args(c, **over):
    args = dict(rule_id=RULES["adam"].rule_id, param=c.param, grad=c.grad, states=c.states,
                scalars=c.scalars, weight_decay=c.weight_decay, eta=c.eta, gscale=c.gscale,
                tile_block=c.layout.tile_block, block_tiles=c.layout.block_tiles,
                tile=c.layout.tile)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: dict(param=c.param.double()), r"param must be float32, got Double"),
        (lambda c: dict(grad=c.grad[:-8]), r"grad has \d+ elements but param has \d+"),
        (lambda c: dict(param=c.param.view(-1, 2)), r"param must be a 1-D flat buffer"),
        (lambda c: dict(grad=torch.zeros(2 * c.grad.numel())[::2]), r"grad must be contiguous"),
        (lambda c: dict(rule_id=7), r"unknown rule id 7 \(expected 0..5"),
        (lambda c: dict(rule_id=-1), r"unknown rule id -1"),
        (lambda c: dict(states=c.states[:1]), r"rule adam \(id 4\) keeps 2 state buffer"),
        (lambda c: dict(states=[c.states[0], c.states[1].half()]), r"states\[1\] must be float32"),
        (lambda c: dict(scalars=c.scalars[:3]), r"scalars must hold the rule's 5 host scalars"),
        (lambda c: dict(eta=c.eta[:1]), r"eta must be .* one step size per block \(3\)"),
        (lambda c: dict(eta=c.eta.double()), r"eta must be a contiguous float32"),
        (lambda c: dict(gscale=torch.ones(3)), r"gscale must be .* 2 entries"),
        (lambda c: dict(tile=1000), r"not a whole number of tiles of 1000"),
        (lambda c: dict(tile_block=c.layout.tile_block.long()), r"tile_block must be .*int32"),
        (lambda c: dict(tile_block=torch.zeros_like(c.layout.tile_block)),
         r"tile_block\[\d+\] is 0 but block_tiles puts that tile in block 1"),
        (lambda c: dict(states=[c.states[0], c.states[0]]), r"states\[0\] and states\[1\] share"),
        (lambda c: dict(grad=c.param), r"param and grad share memory"),
        (lambda c: dict(grad=c.grad.double()), r"grad must be float32, bfloat16 or float16"),
        (lambda c: dict(model_param=c.param.clone()),
         r"model_param \(the model's copy of the fp32 master\) must be bfloat16 or float16"),
        (lambda c: dict(model_param=torch.zeros(8, dtype=torch.bfloat16)),
         r"model_param has 8 elements but param has \d+"),
        (lambda c: dict(model_param=c.grad.view(torch.bfloat16)[: c.grad.numel()]),
         r"grad and model_param share memory"),
    ],
)
def test_clear_errors(change, match):
    c = case("adam", MULTI)
    with pytest.raises(RuntimeError, match=match):
        ops.first_pass(**_op_args(c, **change(c)))


@pytest.mark.parametrize("arg", ["grad", "eta", "gscale", "tile_block", "block_tiles"])
def test_a_stray_meta_tensor_is_refused_not_answered_with_garbage(arg):
    # the fake kernels double as the ops' Meta kernels, which the dispatcher picks when any input
    # is on the meta device: the call returned uninitialised sums and ran nothing
    c = case("adam", MULTI)
    change = {arg: torch.empty_like(_op_args(c)[arg], device="meta")}
    before = c.param.clone()
    with pytest.raises(RuntimeError, match=rf"first_pass: {arg} is on meta, the first buffer on cpu"):
        ops.first_pass(**_op_args(c, **change))
    assert torch.equal(c.param, before)
    with pytest.raises(RuntimeError, match=r"grad_sq_norm: tile_block is on cpu, the first buffer "
                                           r"on meta"):
        ops.grad_sq_norm(torch.empty_like(c.grad, device="meta"), c.layout.tile_block,
                         c.layout.block_tiles, c.layout.tile)


def test_the_torch_reference_refuses_what_the_kernels_refuse():
    # a short buffer gave its block an empty slice and sums of 0; an int gradient ran
    c = case("adam", MULTI)
    with pytest.raises(ValueError, match=r"torch backend grad_sq_norm: grad must be a contiguous "
                                         r"flat buffer of layout.numel=\d+ elements"):
        ref.grad_sq_norm(c.grad[:-5], c.layout)
    with pytest.raises(TypeError, match=r"torch backend first_pass: grad must be floating point"):
        ref.first_pass(RULES["adam"], c.param, c.grad.int(), c.states, c.scalars, 0.0, c.eta,
                       c.gscale, c.layout)
    with pytest.raises(ValueError, match=r"torch backend move: states\[1\] must be a contiguous"):
        ref.move(RULES["adam"], c.param, c.grad, [c.states[0], c.states[1][:-1]], c.scalars,
                 0.0, c.eta, c.eta, c.gscale, c.layout)


def test_move_and_norm_errors():
    c = case("momentum", MULTI)
    rid = RULES["momentum"].rule_id
    with pytest.raises(RuntimeError, match=r"eta_new must be .* one step size per block"):
        ops.move(rid, c.param, c.grad, c.states, c.scalars, 0.0, c.eta, c.eta[:2],
                 c.gscale, c.layout.tile_block, c.layout.block_tiles, c.layout.tile)
    with pytest.raises(RuntimeError, match=r"rule momentum \(id 1\) keeps 1 state buffer"):
        ops.move(rid, c.param, c.grad, [], c.scalars, 0.0, c.eta, c.eta, c.gscale,
                 c.layout.tile_block, c.layout.block_tiles, c.layout.tile)
    with pytest.raises(RuntimeError, match=r"grad must be float32, bfloat16 or float16, got Int"):
        ops.grad_sq_norm(c.grad.int(), c.layout.tile_block, c.layout.block_tiles, c.layout.tile)


# -- torch.compile registration --------------------------------------------------------------------
def test_opcheck_schemas_and_fake_impls():
    c = case("adam", ((300, 5), 64))
    lay = c.layout
    torch.library.opcheck(
        torch.ops.armijo_fused.first_pass.default,
        (4, c.param, c.grad, c.states, list(c.scalars), 0.01, c.eta, c.gscale, lay.tile_block,
         lay.block_tiles, lay.tile),
    )
    torch.library.opcheck(
        torch.ops.armijo_fused.move.default,
        (4, c.param, c.grad, c.states, list(c.scalars), 0.01, c.eta, c.eta * 0.5, c.gscale,
         lay.tile_block, lay.block_tiles, lay.tile, False, True, True),
    )
    torch.library.opcheck(torch.ops.armijo_fused.grad_sq_norm.default,
                          (c.grad, lay.tile_block, lay.block_tiles, lay.tile))
    torch.library.opcheck(
        torch.ops.armijo_fused.trial_points.default,
        (4, c.param, c.grad, c.states, list(c.scalars), 0.01, torch.tensor([0.2, 0.1]), c.gscale,
         lay.tile, False),
    )
    # a bf16 model with fp32 master weights: half gradient, and the model copy the ops write
    g16, model = c.grad.bfloat16(), c.param.bfloat16()
    torch.library.opcheck(
        torch.ops.armijo_fused.first_pass.default,
        (4, c.param, g16, c.states, list(c.scalars), 0.01, c.eta, c.gscale, lay.tile_block,
         lay.block_tiles, lay.tile, model),
    )
    torch.library.opcheck(
        torch.ops.armijo_fused.move.default,
        (4, c.param, g16, c.states, list(c.scalars), 0.01, c.eta, c.eta * 0.5, c.gscale,
         lay.tile_block, lay.block_tiles, lay.tile, False, False, False, model),
    )
    # the norm of a half gradient is fp32, in the fake kernel too (compiled code read it as
    # bf16 and returned other numbers)
    torch.library.opcheck(torch.ops.armijo_fused.grad_sq_norm.default,
                          (g16, lay.tile_block, lay.block_tiles, lay.tile))


def test_torch_compile_traces_the_ops_and_keeps_their_writes():
    rule, c = RULES["adam"], case("adam", ((3000, 17), 512))
    a = c.clone()

    def step(param, grad, m, v, eta, gscale):
        sums = cpp.first_pass(rule, param, grad, [m, v], c.scalars, c.weight_decay, eta, gscale,
                              c.layout)
        return sums[:, 0].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(c.param, c.grad, c.states[0], c.states[1], c.eta, c.gscale)
    want = run_first(ref, rule, a)[:, 0].sum()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert_case_close(c, a)  # the in-place writes survive functionalisation


# -- optimizers ------------------------------------------------------------------------------------
def _mlp_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 10, generator=g)
    y = torch.randn(64, 1, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 1))
    return model, X, y


def _train(opt_cls, backend, steps=15, **kw):
    model, X, y = _mlp_problem()
    opt = opt_cls(model.parameters(), backend=backend, cadence="every", weight_decay=0.01, **kw)
    losses, etas = [], []
    for k in range(steps):
        xb, yb = X[(4 * k) % 48:(4 * k) % 48 + 16], y[(4 * k) % 48:(4 * k) % 48 + 16]

        def closure(xb=xb, yb=yb):
            opt.zero_grad()
            loss = ((model(xb) - yb) ** 2).mean()
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
        etas.append(opt.stats["step_size"])
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return opt, losses, etas, params


@pytest.mark.parametrize(
    "opt_cls,kw",
    [(ArmijoAdam, dict(direction="adam")), (ArmijoSGD, dict(direction="momentum",
                                                            init_step_size=0.1))],
    ids=["adam", "sgd-momentum"],
)
def test_optimizer_cpp_matches_torch(opt_cls, kw):
    opt_c, loss_c, eta_c, p_c = _train(opt_cls, "cpp", **kw)
    opt_t, loss_t, eta_t, p_t = _train(opt_cls, "torch", **kw)
    assert opt_c._buffers[0].backend.name == "cpp"
    assert opt_t._buffers[0].backend.name == "torch"
    assert eta_c == eta_t  # the same accepted step sizes, trial for trial
    assert any(e != eta_c[0] for e in eta_c)  # the search did move η
    torch.testing.assert_close(torch.tensor(loss_c), torch.tensor(loss_t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p_c, p_t, rtol=1e-5, atol=1e-5)


def test_auto_backend_picks_cpp_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64).name == "torch"
    model, X, y = _mlp_problem()
    opt = ArmijoAdam(model.parameters())

    def closure():
        opt.zero_grad()
        loss = ((model(X) - y) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert opt._buffers[0].backend.name == "cpp"


def test_layout_tensors_are_what_the_ops_take():
    lay = make_layout([5, 3000], tile=1024)
    assert lay.tile_block.dtype == torch.int32 and lay.block_tiles.dtype == torch.int32
    out = cpp.grad_sq_norm(torch.ones(lay.numel), lay)
    # padding counts too: grad_sq_norm does not assume zeros there
    torch.testing.assert_close(out, torch.tensor([1024.0, 3072.0]))
