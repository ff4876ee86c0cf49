"""bench/memory.py runs and measures what the README says of memory: a first step that holds
what fused AdamW holds, and a loaded checkpoint copied into the store (so the loaded dict costs
its two moments for as long as the caller keeps it), where AdamW aliases it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                                reason="needs Linux's /proc/self/clear_refs")


def test_memory_bench_writes_its_rows(tmp_path):
    import memory

    out = tmp_path / "memory.json"
    assert memory.main(["--params", "2e6", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == set(memory.CASES)
    first = rows["armijo_first_step"]["copies_of_theta"]
    assert abs(first - rows["adamw_first_step"]["copies_of_theta"]) < 0.3  # m and v, both
    held = rows["armijo_resume_dict_held"]["held_after_steps"]
    assert held - rows["armijo_resume"]["held_after_steps"] > 1.5  # the dict's m and v
    assert abs(rows["adamw_resume_dict_held"]["held_after_steps"]
               - rows["adamw_resume"]["held_after_steps"]) < 0.3  # aliased
