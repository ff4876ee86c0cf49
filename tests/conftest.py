import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when there is no GPU (docs/design.md §6).
# The variable must be set before any module decorates a kernel with @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# torch's CPU wheel (MKL build) computes sqrt, exp, log, ... through MKL's VML, which sets itself
# up at its first call in a process. Made from two threads at once (a tensor over ATen's
# 2048-element VML grain), that first call computed the second thread's half in a low-accuracy
# mode in about one process in three (float32 sqrt off by up to 3e-5, 1e-4 relative), and a
# kernel-against-twin comparison failed at random. The first call is made here, on one thread.
for _dtype in (torch.float32, torch.float64):
    _x = torch.full((16,), 2.0, dtype=_dtype)
    _x.sqrt(), _x.exp(), _x.log(), _x.rsqrt()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For modules that step tiny tensors, where a second intra-op thread buys nothing and, on a
    loaded 2-core machine, costs 10x in OpenMP synchronisation. Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
