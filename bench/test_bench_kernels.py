"""pytest-benchmark view of bench_kernels.py (GPU only): ``python -m pytest bench/ -m gpu``.

The script is the source of the recorded numbers (copy bandwidth, % of it, JSON + chart); this
suite times the same calls on GPT-2 124M for pytest-benchmark's comparison tooling. Each timed
call ends with a synchronize, so the numbers include launch overhead and the kernel itself.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def gpt2_small():
    from bench_kernels import MODELS, FlatModel, gpt2_blocks

    from armijo_fused.storage.layout import DEFAULT_TILE

    return FlatModel(gpt2_blocks(*MODELS["gpt2-124m"]), DEFAULT_TILE)


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _adam_args(model):
    from armijo_fused.directions import get_rule

    rule = get_rule("adam")
    scalars = rule.scalars({"betas": (0.9, 0.999), "eps": 1e-8}, 10)
    return rule, model.param, model.grad, model.states, scalars, 0.1


def test_first_pass(benchmark, gpt2_small):
    from armijo_fused.backends import triton_backend as tri

    m = gpt2_small
    eta = torch.full((m.layout.nblocks,), 1e-3, device="cuda")
    gscale = torch.ones(2, device="cuda")
    benchmark(_synced(lambda: tri.first_pass(*_adam_args(m), eta, gscale, m.layout)))


def test_retry_all_blocks(benchmark, gpt2_small):
    from armijo_fused.backends import triton_backend as tri

    m = gpt2_small
    eta = torch.full((m.layout.nblocks,), 1e-3, device="cuda")
    gscale = torch.ones(2, device="cuda")
    benchmark(_synced(lambda: tri.move(*_adam_args(m), eta, eta * 0.5, gscale, m.layout)))


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_step(benchmark, gpt2_small, impl):
    opt = torch.optim.AdamW(gpt2_small.params, lr=1e-3, weight_decay=0.1, **{impl: True})
    benchmark(_synced(opt.step))
