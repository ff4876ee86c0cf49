"""scripts/acceptance_report.py: reads GPU result files and JUnit XML into verdicts.

The inputs here are made up, in the structure the benchmarks write, to check the report's logic:
a bound met is PASS, one missed is FAIL, an absent file is MISSING, and the CPU result files
committed in bench/results are never taken for GPU ones.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("acceptance_report",
                                                  ROOT / "scripts" / "acceptance_report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up there)
    spec.loader.exec_module(mod)
    return mod


def verdicts(lines):
    return {line.what: line.verdict() for line in lines}


def test_committed_cpu_results_are_not_gpu_results(tmp_path):
    """The CPU result files in bench/results never count as GPU ones: with them alone every line
    is MISSING; with every committed file, each line that has a value read a GPU's file."""
    rep = load_report()
    results = ROOT / "bench" / "results"
    gpu = ("nvidia", "_cuda")
    for p in results.glob("*.json"):
        if not any(tag in p.name for tag in gpu):
            (tmp_path / p.name).write_bytes(p.read_bytes())
    assert len(list(tmp_path.glob("*.json"))) >= 10
    lines = rep.report(tmp_path, None)
    assert lines and all(line.verdict() == "MISSING" for line in lines)
    measured = [line for line in rep.report(results, None) if line.verdict() != "MISSING"]
    assert measured and all(any(tag in line.source for tag in gpu) for line in measured)


def write(path: Path, data) -> None:
    path.write_text(json.dumps(data))


def test_bounds_give_pass_and_fail(tmp_path):
    rep = load_report()

    def passes(first, move, bf16):
        return {"first_pass": {"pct_of_copy": first, "gb_per_s": 3000.0},
                "move_all": {"pct_of_copy": move}, "first_pass_bf16_master": {"pct_of_copy": bf16},
                "move_all_bf16_master": {"pct_of_copy": bf16}, "adamw_fused": {"ms": 1.0}}

    write(tmp_path / "kernels_nvidia-h200.json", {"device": "NVIDIA H200", "models": {
        "gpt2-124m": {"passes": passes(93.0, 88.0, 86.0), "first_pass_over_adamw_fused": 0.85},
        "gpt2-1.5b": {"passes": passes(95.0, 91.0, 84.0), "first_pass_over_adamw_fused": 0.95}}})
    write(tmp_path / "optimizer_step_nvidia-h200.json", {"rows": {"armijo_search": {
        "searched": True, "trials": 1, "over_adamw_fused": 1.08}}})
    # (the ratios are on the means; the medians, lower, must not decide)
    def row(name, mean):
        return {"name": name, "ms_mean": mean, "ms_median": 0.9 * mean,
                "x_adamw_fused": mean / 100.0, "x_adamw_fused_median": 0.9 * mean / 90.0}

    write(tmp_path / "step_nvidia-h200.json", {"rows": [
        row("AdamW fused", 100.0), row("ArmijoAdam adaptive", 108.0),
        row("ArmijoAdam every", 145.0), row("ArmijoAdam layerwise", 114.0), row("SaLSa", 250.0)]})
    write(tmp_path / "batched_candidates_cuda.json", {"same_accepted_as_sequential": True, "rows": [
        {"candidates": None, "ms_per_step": 10.0, "trials_per_step": 3.0},
        {"candidates": 2, "ms_per_step": 8.0}, {"candidates": 4, "ms_per_step": 9.0}]})
    junit = tmp_path / "gpu_tests.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_triton_kernels.TestCompiledTriton" name="test_a"/>'
        '<testcase classname="tests.test_triton_kernels.TestCompiledTriton" name="test_b">'
        '<failure message="x"/></testcase>'
        '<testcase classname="tests.test_memory" '
        'name="test_peak_memory_of_a_search_step_matches_fused_adamw"/>'
        '</testsuite></testsuites>')
    v = verdicts(rep.report(tmp_path, junit))
    assert v["gpt2-124m first_pass: % of copy bandwidth"] == "PASS"
    assert v["gpt2-124m move_all: % of copy bandwidth"] == "FAIL"
    assert v["gpt2-124m first_pass_bf16_master: % of copy bandwidth"] == "PASS"
    assert v["gpt2-1.5b first_pass_bf16_master: % of copy bandwidth"] == "FAIL"
    assert v["gpt2-124m first pass / AdamW(fused) step"] == "PASS"
    assert v["gpt2-1.5b first pass / AdamW(fused) step"] == "FAIL"
    assert v["kernels file names the device, GB/s beside AdamW(fused)"] == "PASS"
    assert v["124M optimizer step with one accepted trial / AdamW(fused)"] == "PASS"
    assert v["training step, ArmijoAdam adaptive / AdamW(fused)"] == "PASS"
    assert v["training step, ArmijoAdam every-step search / AdamW(fused)"] == "FAIL"
    assert v["SaLSa ms/step / ArmijoAdam adaptive ms/step"] == "PASS"  # 250 / 108
    assert v["training step, layer-wise / global ArmijoAdam (both adaptive)"] == "FAIL"  # 1.056
    assert v["batched candidates ms/step / sequential (trials > 1), best K"] == "PASS"
    assert v["batched candidates accept what sequential accepts (GPU)"] == "PASS"
    assert v["compiled Triton kernels agree with the reference (2 tests ran)"] == "FAIL"
    assert v["peak memory of a search step <= AdamW(fused)'s (1 tests ran)"] == "PASS"
    assert v["no host sync on steps without a search (0 tests ran)"] == "MISSING"
    assert load_report().main(["--results", str(tmp_path), "--junit", str(junit)]) == 0
    # --strict: a gate (FAIL or MISSING lines: exit 1)
    assert load_report().main(["--results", str(tmp_path), "--junit", str(junit),
                               "--strict"]) == 1


def test_a_step_file_from_before_the_mean_ratios_is_not_read_as_them(tmp_path):
    # its x_adamw_fused was on medians, which hide the steps that search
    rep = load_report()
    write(tmp_path / "step_nvidia-h200.json", {"rows": [
        {"name": "AdamW fused", "ms_median": 100.0, "x_adamw_fused": 1.0},
        {"name": "ArmijoAdam adaptive", "ms_median": 108.0, "x_adamw_fused": 1.08}]})
    v = verdicts(rep.report(tmp_path, None))
    assert v["training step, ArmijoAdam adaptive / AdamW(fused)"] == "MISSING"


def test_the_newest_result_file_counts_not_the_last_name(tmp_path):
    # files[-1] was the name that sorts last: an older run on another card could win
    rep = load_report()
    for name, date, ratio in (("optimizer_step_nvidia-h200.json", "2026-12-01", 1.30),
                              ("optimizer_step_nvidia-h100.json", "2026-12-02", 1.05)):
        write(tmp_path / name, {"env": {"date": date}, "rows": {"armijo_search": {
            "searched": True, "trials": 1, "over_adamw_fused": ratio}}})
    line = next(x for x in rep.report(tmp_path, None) if x.what.startswith("124M optimizer"))
    assert line.value == 1.05 and line.source == "optimizer_step_nvidia-h100.json"


def test_the_optimizer_step_line_needs_one_trial_on_every_timed_step(tmp_path):
    # the last step's stats alone were read: a run whose other steps took two trials passed
    rep = load_report()
    write(tmp_path / "optimizer_step_nvidia-h200.json", {"rows": {"armijo_search": {
        "searched": True, "trials": 1, "trials_per_step": 1.5, "searches_per_step": 1.0,
        "over_adamw_fused": 1.05}}})
    line = next(x for x in rep.report(tmp_path, None) if x.what.startswith("124M optimizer"))
    assert line.verdict() == "MISSING"
