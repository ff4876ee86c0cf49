"""Tile tables (storage/table.py): the passes on tensors that stay where they are (FSDP2 shards).

Each fused backend, run through a table on separate tensors, must match the torch twin (which
gathers the tensors into flat buffers, runs the flat reference and scatters θ back): θ written in
place in every tensor, the flat states, the per-block sums, the skip of unchanged blocks, and the
per-block gradient norms. Sizes are not multiples of the tile, one tensor is empty, one block has
no elements at all.
"""

from __future__ import annotations

import os

import pytest
import torch
from _backends import CPP

from armijo_fused.directions import RULES
from armijo_fused.storage.layout import place_tensors_tiled
from armijo_fused.storage.table import make_table, table_ok

pytestmark = pytest.mark.timeout(120)

FUSED = (["cpp"] if CPP else []) + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
GROUP = {"momentum": 0.9, "alpha": 0.99, "betas": (0.9, 0.999), "eps": 1e-8}
#: (numel, block) of each tensor: a tensor smaller than a tile, one spanning several tiles, an
#: empty one, and block 2 with no elements
TENSORS = [(5, 0), (3000, 0), (0, 1), (700, 1), (0, 2), (1025, 3)]
TILE = 512


def backend(name):
    import importlib

    return importlib.import_module(f"armijo_fused.backends.{name}_backend")


def make(rule_name, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    numels, blocks = [n for n, _ in TENSORS], [b for _, b in TENSORS]
    layout, offsets = place_tensors_tiled(numels, blocks, tile=TILE, device=device)
    params = [torch.randn(n, generator=gen).to(device) for n in numels]
    grads = [(torch.randn(n, generator=gen) * 0.1).to(device) for n in numels]
    states = []
    for name in RULES[rule_name].state_names:
        s = torch.zeros(layout.numel)
        for n, off in zip(numels, offsets):
            x = torch.randn(n, generator=gen) * 1e-2
            s[off:off + n] = x.abs() if name in ("exp_avg_sq", "square_avg") else x
        states.append(s.to(device))
    eta = (torch.rand(layout.nblocks, generator=gen) * 1e-2 + 1e-3).to(device)
    return layout, offsets, params, grads, states, eta


def clone_case(case):
    layout, offsets, params, grads, states, eta = case
    params, grads = [p.clone() for p in params], [g.clone() for g in grads]
    return layout, offsets, params, grads, [s.clone() for s in states], eta.clone()


def run(name, rule_name, case, gscale=(0.5, 0.25), precond=False):
    layout, offsets, params, grads, states, eta = case
    rule, b = RULES[rule_name], backend(name)
    device = params[0].device
    table = make_table(layout, offsets, params, grads, device)
    scal, wd, gs = rule.scalars(GROUP, 3), 0.01, torch.tensor(gscale, device=device)
    # precond: the first trial on the fallback line (ArmijoSGD with momentum), then moves from it
    out = [b.first_pass(rule, None, None, states, scal, wd, eta, gs, layout, table=table,
                        precond=precond)]
    new = eta * 0.5
    new[1] = eta[1]  # block 1 keeps its step size
    kept = [p.clone() for p, blk in zip(params, (b_ for _, b_ in TENSORS)) if blk == 1]
    out.append(b.move(rule, None, None, states, scal, wd, eta, new, gs, layout, precond, precond,
                      True, table=table))
    still = [p for p, (_, blk) in zip(params, TENSORS) if blk == 1]
    assert all(torch.equal(a, k) for a, k in zip(still, kept))  # an unchanged block is not written
    out.append(b.move(rule, None, None, states, scal, wd, new, new * 0.5, gs, layout, precond,
                      not precond, False, table=table))
    out.append(b.grad_sq_norm(None, layout, table=table))
    return out


def check_against_twin(rule_name, name, device, precond=False):
    start = make(rule_name, seed=1, device=device)
    a, b = clone_case(start), clone_case(start)
    want, got = run("torch", rule_name, a, precond=precond), run(name, rule_name, b,
                                                                  precond=precond)
    assert got[2] is None and want[2] is None
    for x, y in zip(got[:2] + got[3:], want[:2] + want[3:]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    for p, q, p0 in zip(b[2], a[2], start[2]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        if p.numel():
            assert not torch.equal(p, p0)  # θ was written in place, in the caller's tensor
    for s, t in zip(b[4], a[4]):
        torch.testing.assert_close(s, t, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("precond", [False, True], ids=["along_d", "on_fallback"])
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("rule_name", list(RULES))
def test_table_passes_match_the_torch_twin(rule_name, name, precond):
    check_against_twin(rule_name, name, "cpu", precond)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule_name", list(RULES))
def test_compiled_triton_table_passes_match_the_torch_twin(rule_name):
    check_against_twin(rule_name, "triton", "cuda")


@pytest.mark.parametrize("name", ["torch"] + FUSED)
def test_non_finite_gscale_writes_nothing_through_the_table(name):
    case = make("adam", seed=2)
    layout, offsets, params, grads, states, eta = case
    before = [p.clone() for p in params] + [s.clone() for s in states]
    table = make_table(layout, offsets, params, grads, "cpu")
    rule = RULES["adam"]
    sums = backend(name).first_pass(rule, None, None, states, rule.scalars(GROUP, 3), 0.0, eta,
                                    torch.tensor([float("nan"), 1.0]), layout, table=table)
    assert not sums.any()
    assert all(torch.equal(x, y) for x, y in zip(params + states, before))


def test_table_rejects_what_it_cannot_address():
    assert "float32" in table_ok([torch.zeros(4, dtype=torch.bfloat16)])
    assert "contiguous" in table_ok([torch.zeros(4, 4).t()])
    assert "aligned" in table_ok([torch.zeros(9)[1:]])
    assert table_ok([torch.zeros(9)]) == ""
    layout, offsets = place_tensors_tiled([4], [0], tile=TILE)
    with pytest.raises(ValueError, match="aligned"):
        make_table(layout, offsets, [torch.zeros(5)[1:]], [torch.zeros(4)], "cpu")


@pytest.mark.skipif("triton" not in FUSED, reason="needs TRITON_INTERPRET=1")
def test_triton_table_passes_refuse_a_strided_state_buffer():
    layout, offsets, params, grads, states, eta = make("momentum", seed=0, device="cpu")
    table = make_table(layout, offsets, params, grads, "cpu")
    strided = torch.zeros(2 * layout.numel)[::2]  # the right length, every other element
    rule = RULES["momentum"]
    with pytest.raises(ValueError, match=r"states\[0\] must be a contiguous float32"):
        backend("triton").first_pass(rule, None, None, [strided], rule.scalars(GROUP, 1), 0.0,
                                     eta, torch.ones(2), layout, table=table)


def test_tiled_placement_starts_every_tensor_on_a_tile():
    layout, offsets = place_tensors_tiled([n for n, _ in TENSORS], [b for _, b in TENSORS],
                                          tile=TILE)
    assert all(o % TILE == 0 for o in offsets)
    assert layout.block_numels == (3005, 700, 0, 1025)
    # block 0: 1 + 6 tiles, block 1: 2 tiles (the empty tensor has none), block 2: one empty tile
    assert layout.block_offsets == (0, 7 * TILE, 9 * TILE, 10 * TILE, 13 * TILE)


@pytest.mark.skipif(not CPP, reason="needs the compiled extension")
def test_cpp_table_norm_rejects_malformed_columns():
    from armijo_fused import ops

    layout, offsets, params, grads, _, _ = make("sgd")
    table = make_table(layout, offsets, params, grads, "cpu")
    args = (layout.tile_block, layout.block_tiles, layout.tile)
    bad = table.lengths.clone()
    bad[0] = TILE + 1
    with pytest.raises(RuntimeError, match=r"lengths\[0\] is 513, outside 0..512"):
        ops.grad_sq_norm_table(table.grad_ptrs, bad, *args)
    with pytest.raises(RuntimeError, match="grad_ptrs must be a contiguous 1-D Long"):
        ops.grad_sq_norm_table(table.grad_ptrs.int(), table.lengths, *args)
    with pytest.raises(RuntimeError, match="one entry per tile"):
        ops.grad_sq_norm_table(table.grad_ptrs[1:], table.lengths[1:], *args)


@pytest.mark.skipif(not CPP, reason="needs the compiled extension")
def test_cpp_table_passes_refuse_what_the_flat_ones_do():
    # review of the ops called directly: a null tile address crashed the process (SIGSEGV),
    # states that share memory ran (the kernels' __restrict__ pointers: garbage sums), and a
    # tile of 2^62 overflowed the length into "buffers hold -2 tiles"
    from armijo_fused import ops

    layout, offsets, params, grads, states, eta = make("adam")
    table = make_table(layout, offsets, params, grads, "cpu")
    lay = (layout.tile_block, layout.block_tiles, layout.tile)
    scalars, gscale = [0.9, 0.999, 1.0, 1.0, 1e-8], torch.ones(2)
    rule = RULES["adam"].rule_id

    def first(param_ptrs=table.param_ptrs, grad_ptrs=table.grad_ptrs, st=states):
        return ops.first_pass_table(rule, param_ptrs, grad_ptrs, table.lengths, st, scalars,
                                    0.0, eta, gscale, *lay)

    def move(st):
        return ops.move_table(rule, table.param_ptrs, table.grad_ptrs, table.lengths, st,
                              scalars, 0.0, eta, eta * 0.5, gscale, *lay, compute_sums=True)

    null = table.grad_ptrs.clone()
    null[1] = 0
    with pytest.raises(RuntimeError, match=r"grad_ptrs\[1\] is 0 for a tile of 512 elements"):
        ops.grad_sq_norm_table(null, table.lengths, *lay)
    pnull = table.param_ptrs.clone()
    pnull[1] = 0
    with pytest.raises(RuntimeError, match=r"param_ptrs\[1\] is 0 for a tile"):
        first(param_ptrs=pnull)
    odd = table.grad_ptrs.clone()
    odd[0] += 2
    with pytest.raises(RuntimeError, match=r"grad_ptrs\[0\] is \d+ for a tile .* first fp32"):
        first(grad_ptrs=odd)
    with pytest.raises(RuntimeError, match=r"states\[0\] and states\[1\] share memory"):
        first(st=[states[0], states[0]])
    with pytest.raises(RuntimeError, match=r"states\[0\] and states\[1\] share memory"):
        longer = torch.zeros(layout.numel + 1)
        move([longer[:-1], longer[1:]])  # overlapping, not equal
    # a state buffer that holds a tile's θ, or a tile whose θ is its g
    theta_in_state = make_table(layout, offsets, [states[1][o:o + p.numel()]
                                                  for p, o in zip(params, offsets)], grads, "cpu")
    with pytest.raises(RuntimeError, match=r"tile 0's param shares memory with states\[1\]"):
        first(param_ptrs=theta_in_state.param_ptrs)
    with pytest.raises(RuntimeError, match=r"tile 0's param and grad share memory"):
        first(grad_ptrs=table.param_ptrs)
    g_in_state = make_table(layout, offsets, params, [states[0][o:o + g.numel()]
                                                      for g, o in zip(grads, offsets)], "cpu")
    with pytest.raises(RuntimeError, match=r"tile 0's grad shares memory with states\[0\]"):
        first(grad_ptrs=g_in_state.grad_ptrs)
    with pytest.raises(RuntimeError, match=r"tile must be positive and \d+ tiles of it countable"):
        ops.grad_sq_norm_table(table.grad_ptrs, table.lengths, layout.tile_block,
                               layout.block_tiles, 2**62)
    # nothing was written by the refused calls, and the table as made passes
    assert all(torch.equal(p, q) for p, q in zip(params, make("adam")[2]))
    assert first().isfinite().all()

