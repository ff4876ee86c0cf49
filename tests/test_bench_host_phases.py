"""bench/host_phases.py on a few steps: the Triton path with no-op kernels runs on a CPU, its search
steps search with one accepted trial (the script checks that itself), and the phases add up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


@pytest.mark.timeout(300)
def test_host_phases_runs_and_its_phases_add_up(tmp_path):
    import host_phases

    out = tmp_path / "phases.json"
    assert host_phases.main(["--repeats", "60", "--rounds", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    this = res["variants"]["this"]
    assert Path(this["package"]).name == "armijo_fused"
    search, plain = this["search"]["us"], this["plain"]["us"]
    assert set(search) == set(host_phases.PHASES)
    assert set(plain) == {"to_passes", "to_first", "first", "exposed", "total"}
    for us in (search, plain):
        assert 0 < us["to_passes"] < us["to_first"] < us["exposed"] <= us["total"]
    # (medians of sums are not sums of medians, and CI's CPU is shared: loosely)
    assert search["exposed"] + search["window"] + search["read"] == pytest.approx(
        search["total"], rel=0.3)
