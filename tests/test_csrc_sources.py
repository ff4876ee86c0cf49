"""Checks on the C++ sources that no compiler here can make.

The AVX2 tile kernels (csrc/cpu/kernels_avx2.cpp) compile kernels.h under ``#pragma GCC target``.
A standard header first included under the pragma becomes AVX2 code there, and baseline code
that inlines it fails to build: GCC 13's ``<string>`` marks ``~allocator()`` always_inline, and
the extension did not build on the H200 machines ("inlining failed ... target specific option
mismatch"). GCC 12, this machine's, lets it pass, so the rule is checked on the text: every
standard header the kernel headers include is included before the pragma.
"""

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1] / "csrc"
PRAGMA = "#pragma GCC push_options"


def _includes(text: str) -> tuple[set[str], set[str]]:
    """(standard headers ``<...>``, project headers ``"..."``) a source includes, outside the
    blocks for other architectures (arm_neon.h, emmintrin.h: never reached on an AVX2 build)."""
    std = set(re.findall(r'^\s*#include\s*<([^>]+)>', text, re.M))
    own = set(re.findall(r'^\s*#include\s*"([^"]+)"', text, re.M))
    return std - {"arm_neon.h", "emmintrin.h"}, own


def _std_headers_below(header: str, seen: set[str] | None = None) -> set[str]:
    """Every standard header ``header`` includes, directly or through project headers."""
    seen = set() if seen is None else seen
    if header in seen:
        return set()
    seen.add(header)
    std, own = _includes((CSRC / header).read_text())
    for h in own:
        std |= _std_headers_below(h, seen)
    return std


def test_the_avx2_file_includes_every_standard_header_before_its_target_pragma():
    text = (CSRC / "cpu" / "kernels_avx2.cpp").read_text()
    assert PRAGMA in text and '#include "cpu/kernels.h"' in text
    before, after = text.split(PRAGMA, 1)
    needed = _std_headers_below("cpu/kernels.h")
    assert {"string", "stdexcept", "cmath"} <= needed  # (the walk reached the headers)
    early, _ = _includes(before)
    assert needed <= early, f"include before the pragma: {sorted(needed - early)}"
    late, _ = _includes(after)
    assert not late, f"standard headers under the pragma: {sorted(late)}"
