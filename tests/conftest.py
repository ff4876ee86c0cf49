import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when there is no GPU (docs/design.md §6).
# The variable must be set before any module decorates a kernel with @triton.jit.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
