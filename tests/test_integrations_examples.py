"""The integration examples run end to end (tiny sizes) and learn something."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
pytestmark = [pytest.mark.timeout(180)]


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_plain_loop_forms_agree():
    finals = load("plain_loop").main(["--steps", "25"])
    # the three forms replay the same dropout masks and take the same decisions
    assert finals["closure"] == pytest.approx(finals["loss_fn"], rel=1e-5)
    assert finals["closure"] == pytest.approx(finals["registered"], rel=1e-5)
    model, x, y = load("plain_loop").make()
    import torch

    with torch.no_grad():
        start = float(torch.nn.functional.mse_loss(model.eval()(x), y))
    assert finals["closure"] < start


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_nanogpt_loop(dtype):
    losses = load("nanogpt_loop").main(["--steps", "8", "--dtype", dtype])
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_hf_and_lightning_examples(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning")
    loss = load("hf_trainer").main(["--steps", "4", "--out", str(tmp_path)])
    assert math.isfinite(loss)
    assert math.isfinite(load("lightning_module").main(["--steps", "6"]))


def test_accelerate_loop():
    pytest.importorskip("accelerate")
    losses = load("accelerate_loop").main(["--steps", "12"])
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
