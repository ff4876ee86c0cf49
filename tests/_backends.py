"""Which optional backends this installation has, for tests that compare them."""

from __future__ import annotations

import pytest


def cpp_available() -> bool:
    try:
        from armijo_fused import ops
    except Exception:  # an install without the extension: not importable means not available
        return False
    return ops.available()


CPP = cpp_available()
needs_cpp = pytest.mark.skipif(not CPP, reason="armijo_fused.ops (C++ extension) not available")
