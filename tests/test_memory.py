"""Issue 4: no memory beyond AdamW's (θ, g, m, v) in the default fp32 mode.

On CPU the check is structural: every tensor the optimizer holds lives in the flat buffers, which
are exactly θ, g, m and v (plus tile padding), and the model's parameters and gradients are views
into them, not copies. On a GPU the peak allocation of a searching step is measured against
AdamW(fused=True)'s.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from armijo_fused import ArmijoAdam


def _model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(device)


def _closure(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    return closure


def _storages(tensors):
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def test_optimizer_holds_only_theta_g_m_v_and_the_model_views_them():
    model = _model()
    x = torch.randn(32, 64)
    opt = ArmijoAdam(model.parameters(), cadence="every", backend="torch")
    for _ in range(3):
        opt.step(_closure(opt, model, x))
    n = sum(p.numel() for p in model.parameters())
    (buf,) = opt._buffers
    held = [buf.param, buf.grad, *buf.states]
    held += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    held += [p for p in model.parameters()] + [p.grad for p in model.parameters()]
    storages = _storages(held)
    assert len(storages) == 4  # θ, g, m, v: parameters, grads and state are all views
    padding = buf.layout.tile * buf.layout.nblocks
    assert sum(storages.values()) <= 4 * 4 * (n + padding)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_of_a_search_step_matches_fused_adamw():
    def peak(make_opt, search):
        model = _model("cuda")
        x = torch.randn(32, 64, device="cuda")
        opt = make_opt(model)
        closure = _closure(opt, model, x)
        if search:
            opt.step(closure)
        else:
            closure()
            opt.step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            if search:
                opt.step(closure)
            else:
                closure()
                opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda m: ArmijoAdam(m.parameters(), cadence="every"), True)
    adamw = peak(lambda m: torch.optim.AdamW(m.parameters(), fused=True), False)
    assert ours <= adamw * 1.1 + (1 << 20)  # activations of the trial forward are the same size
