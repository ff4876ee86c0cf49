import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when there is no GPU (DESIGN.md §6).
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
