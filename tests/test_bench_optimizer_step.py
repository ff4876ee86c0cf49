"""bench/optimizer_step.py on a tiny CPU parameter list: the script runs and its rows mean what
they say (the search row searched once with one accepted trial, the plain row did not search)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from _backends import needs_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@needs_cpp
def test_optimizer_step_bench_runs_small(tmp_path):
    import optimizer_step

    threads = torch.get_num_threads()
    out = tmp_path / "opt.json"
    try:
        assert optimizer_step.main(["--device", "cpu", "--params", "2e5", "--repeats", "2",
                                    "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert res["environment"]["device"] == "cpu" and res["numel"] > 1e5
    assert rows["adamw_fused"]["over_adamw_fused"] == 1.0
    for key in ("armijo_search", "armijo_search_no_check_finite"):
        assert rows[key]["searched"] and rows[key]["trials"] == 1 and not rows[key]["skipped"]
    for key in ("armijo_plain", "armijo_plain_no_check_finite", "sgd_momentum_plain"):
        assert not rows[key]["searched"] and rows[key]["trials"] == 0
    # along g, then the step along the momentum direction: two trials, both accepted at once
    assert rows["sgd_momentum_search"]["searched"] and rows["sgd_momentum_search"]["trials"] == 2
    assert all(r["ms"] > 0 for r in rows.values())


@needs_cpp
def test_host_overhead_bench_counts_the_launches_of_a_step(tmp_path):
    """bench/host_overhead.py runs; and a step dispatches few operations, each a launch on a GPU
    before or around the passes: one guard, one first pass and a handful of scalar ops (a count,
    so it is exact on any machine; it was 19 with a search and 19 without before the guard became
    base + 0·probe)."""
    import host_overhead

    out = tmp_path / "host.json"
    assert host_overhead.main(["--device", "cpu", "--repeats", "3", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    search, plain = rows["armijo_search"], rows["armijo_plain"]
    assert search["searched"] and search["trials"] == 1 and not search["non_descent"]
    assert not plain["searched"] and plain["trials"] == 0
    for row in (search, plain):
        assert row["op_counts"]["armijo_fused.first_pass.default"] == 1
        assert row["op_counts"]["armijo_fused.grad_sq_norm.default"] == 1
    assert search["ops"] <= 8 and plain["ops"] <= 11
    assert rows["adamw_foreach"]["ops"] > rows["adamw_fused"]["ops"]
