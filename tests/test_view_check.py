"""FlatBuffer.sync's one-call check (armijo_fused._C.ViewCheck) against its Python loop: each way
the model or user code can leave a tensor, found by both, repaired alike."""

import pytest
import torch

from armijo_fused import ArmijoAdam, ops

pytestmark = pytest.mark.skipif(ops._C is None or not hasattr(ops._C, "ViewCheck"),
                                reason="needs the compiled extension")


def _setup(seed=0, mode="walk"):
    """``mode``: how the check finds the buffer's state: by walking ``opt.state`` (it is mostly
    this buffer's), or, with 30 other groups' tensors in it, by looking its tensors up."""
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2, 2))]
    others = [torch.nn.Parameter(torch.randn(2)) for _ in range(30 if mode == "lookup" else 0)]
    opt = ArmijoAdam([{"params": params}] + [{"params": [q]} for q in others], weight_decay=0.1)
    for p in params + others:
        p.grad = torch.randn_like(p)
    opt.step(loss_fn=lambda: sum((p * p).sum() for p in params + others),
             loss=torch.tensor(1.0))
    return opt, params, opt._buffers[0]


def _state_copy(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


def _transpose_in_place(p):
    with torch.no_grad():
        p.set_(p.untyped_storage(), p.storage_offset(), (2, 2), (1, 2))


CASES = {
    "untouched": lambda opt, ps: None,
    "grad None": lambda opt, ps: setattr(ps[1], "grad", None),
    "grad new tensor": lambda opt, ps: setattr(ps[2], "grad", torch.full_like(ps[2], 3.0)),
    "state dict replaced": lambda opt, ps: opt.state.__setitem__(ps[0], _state_copy(opt, ps[0])),
    "state entry replaced": lambda opt, ps: opt.state[ps[2]].__setitem__(
        "exp_avg", torch.full_like(ps[2], 0.5)),
    "state deleted": lambda opt, ps: opt.state.pop(ps[1]),
    "state reordered": lambda opt, ps: [opt.state.__setitem__(p, opt.state.pop(p))
                                        for p in list(ps)[::-1]],
    "moved": lambda opt, ps: setattr(ps[1], "data", ps[1].data.clone()),
    "reshaped in place": lambda opt, ps: setattr(ps[0], "data", ps[0].data.view(4, 3)),
    # same storage, offset and sizes, other strides: the gradient view would be indexed wrongly
    "strides changed in place": lambda opt, ps: _transpose_in_place(ps[2]),
    # the whole flat storage moved (model.share_memory()): every view moved with it
    "storage moved as a whole": lambda opt, ps: ps[0].data.share_memory_(),
    # the gradient view itself re-pointed, same object (old-style manual averaging)
    "grad data assigned": lambda opt, ps: setattr(ps[1].grad, "data", ps[1].grad.data / 2),
}


@pytest.mark.parametrize("mode", ["walk", "lookup"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_call_check_matches_the_loop(case, mode):
    results = []
    for fast in (True, False):
        opt, params, buf = _setup(mode=mode)
        if not fast:
            buf._checker = None
        CASES[case](opt, params)
        ok = buf.sync(opt.state)
        grads_ok = all(p.grad is gv and gv.data_ptr() == gs.data_ptr()
                       for p, gv, gs in zip(buf.params, buf._grad_views, buf._grad_slots))
        state = {i: {k: v.clone() for k, v in opt.state[p].items()}
                 for i, p in enumerate(buf.params)} if ok else None
        attached = ok and all(opt.state[p][n] is v for i, p, _, _, _, _, e in buf._checks
                              for n, v in e)
        results.append((ok, grads_ok, attached, sorted(buf.fresh), buf.gathered,
                        [g.clone() for g in buf._grad_views], state))
    (ok, grads_ok, attached, fresh, gathered, grads, state), other = results
    assert (ok, grads_ok, attached, fresh, gathered) == other[:5]
    assert all(torch.equal(a, b) for a, b in zip(grads, other[5]))
    if ok:
        assert grads_ok and attached
        assert all(torch.equal(state[i][k], other[6][i][k]) for i in state for k in state[i])
    assert ok == (case not in ("moved", "reshaped in place", "strides changed in place"))


@pytest.mark.parametrize("mode", ["walk", "lookup"])
def test_check_reports_each_finding(mode):
    opt, params, buf = _setup(mode=mode)
    assert buf._checker.check(buf.params, opt.state) == (-1, -1, True)
    params[2].grad = None
    assert buf._checker.check(buf.params, opt.state) == (-1, 2, True)
    del opt.state[params[0]]
    assert buf._checker.check(buf.params, opt.state) == (-1, 2, False)
    params[1].grad.data = params[1].grad.data.clone()  # p.grad is still its view: moved away
    assert buf._checker.check(buf.params, opt.state) == (-1, 1, False)
    params[1].data = params[1].data.clone()
    assert buf._checker.check(buf.params, opt.state)[0] == 1


def test_the_check_keeps_no_cycle_alive():
    # a parameter that refers back to the optimizer (torch's _apply_optimizer_in_backward sets
    # p._in_backward_optimizers = [opt]): with the parameters held by the C++ object, invisible to
    # the garbage collector, nothing of the model or the optimizer was ever freed
    import gc
    import weakref

    opt, params, buf = _setup()
    params[0]._in_backward_optimizers = [opt]
    refs = [weakref.ref(opt), weakref.ref(buf), weakref.ref(params[0])]
    del opt, params, buf
    gc.collect()
    assert all(r() is None for r in refs)


def test_bad_arguments_raise_instead_of_crashing():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match="sviews"):
        ops._C.ViewCheck([w], [w], [w], [w], ["a"], [[]])
    with pytest.raises(ValueError, match="params must hold tensors"):
        ops._C.ViewCheck([1], [w], [w], [w], [], [])
    with pytest.raises(ValueError, match="gslots must be a list of 1"):
        ops._C.ViewCheck([w], [w], [w], [], [], [])
    with pytest.raises(ValueError, match="one list per state name"):
        ops._C.ViewCheck([w], [w], [w], [w], ["a"], [])
    check = ops._C.ViewCheck([w], [w], [w], [w], [], [])
    with pytest.raises(ValueError, match="not the tensors it was built for"):
        check.check([torch.zeros(2)], {})


class _NotATensor:
    """A group entry that is no tensor: the key reads its attribute as the reference does."""

    def __init__(self, requires_grad):
        self.requires_grad = requires_grad


def test_trainable_key_matches_its_python_reference():
    from armijo_fused.optimizers.store import trainable_key_reference

    ps = [torch.nn.Parameter(torch.randn(3)) for _ in range(5)]
    ps[1].requires_grad_(False)
    plain = torch.randn(2)  # a tensor that does not train
    odd = [_NotATensor(True), _NotATensor(False)]
    groups = [{"params": ps}, {"params": []}, {"params": (ps[0], plain, *odd)},
              {"params": [ps[3]]}]
    got = ops._C.trainable_key([g["params"] for g in groups])
    assert got == trainable_key_reference(groups)
    assert got[0] == (5, id(ps[0]), 0, id(ps[2]), id(ps[3]), id(ps[4]))
    assert got[2] == (4, id(ps[0]), 0, id(odd[0]), 0)
    ps[2].requires_grad_(False)  # a tensor frozen after the store exists: the key changes
    assert ops._C.trainable_key([g["params"] for g in groups]) != got
    with pytest.raises(TypeError, match="sequence"):
        ops._C.trainable_key([5])
