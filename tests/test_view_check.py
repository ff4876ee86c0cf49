"""FlatBuffer.sync's one-call check (armijo_fused._C.ViewCheck) against its Python loop: each way
the model or user code can leave a tensor, found by both, repaired alike."""

import pytest
import torch

from armijo_fused import ArmijoAdam, ops

pytestmark = pytest.mark.skipif(ops._C is None or not hasattr(ops._C, "ViewCheck"),
                                reason="needs the compiled extension")


def _setup(seed=0):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)),
              torch.nn.Parameter(torch.randn(2, 2))]
    opt = ArmijoAdam(params, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step(loss_fn=lambda: sum((p * p).sum() for p in params), loss=torch.tensor(1.0))
    return opt, params, opt._buffers[0]


def _state_copy(opt, p):
    return {k: v.clone() for k, v in opt.state[p].items()}


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
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_call_check_matches_the_loop(case):
    results = []
    for fast in (True, False):
        opt, params, buf = _setup()
        if not fast:
            buf._checker = None
        CASES[case](opt, params)
        ok = buf.sync(opt.state)
        grads_ok = all(p.grad is gv for p, gv in zip(buf.params, buf._grad_views))
        state = {i: {k: v.clone() for k, v in opt.state[p].items()}
                 for i, p in enumerate(buf.params)} if ok else None
        attached = ok and all(opt.state[p][n] is v for i, p, _, _, _, e in buf._checks
                              for n, v in e)
        results.append((ok, grads_ok, attached, sorted(buf.fresh), buf.gathered,
                        [g.clone() for g in buf._grad_views], state))
    (ok, grads_ok, attached, fresh, gathered, grads, state), other = results
    assert (ok, grads_ok, attached, fresh, gathered) == other[:5]
    assert all(torch.equal(a, b) for a, b in zip(grads, other[5]))
    if ok:
        assert grads_ok and attached
        assert all(torch.equal(state[i][k], other[6][i][k]) for i in state for k in state[i])
    assert ok == (case not in ("moved", "reshaped in place"))


def test_check_reports_each_finding():
    opt, params, buf = _setup()
    assert buf._checker.check(opt.state) == (-1, -1, True)
    params[2].grad = None
    assert buf._checker.check(opt.state) == (-1, 2, True)
    del opt.state[params[0]]
    assert buf._checker.check(opt.state) == (-1, 2, False)
    params[1].data = params[1].data.clone()
    assert buf._checker.check(opt.state)[0] == 1
