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
    # each returns the loss over its whole data set before and after training
    before, after = load("hf_trainer").main(["--steps", "4", "--out", str(tmp_path)])
    assert math.isfinite(after) and after < before
    before, after = load("lightning_module").main(["--steps", "6"])
    assert math.isfinite(after) and after < before


def test_accelerate_loop():
    pytest.importorskip("accelerate")
    losses = load("accelerate_loop").main(["--steps", "12"])
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


def test_accelerate_save_state_keeps_every_parameter(tmp_path):
    """The flat store's parameters are views of one storage; safetensors (accelerate's default
    format) kept one of them. The example saves in torch's format, which a fresh model and
    optimizer load back whole."""
    pytest.importorskip("accelerate")
    import torch
    from accelerate import Accelerator

    from armijo_fused import ArmijoAdam

    ex = load("accelerate_loop")
    ex.main(["--steps", "4", "--save", str(tmp_path)])
    model, _ = ex.make(seed=1)  # other initial weights
    initial, _ = ex.make()  # the example's starting weights
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01, model=model)
    model, opt = accelerator.prepare(model, opt)
    accelerator.load_state(str(tmp_path))
    saved = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    assert set(saved) == set(model.state_dict())  # every tensor, not one per storage
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved[name])
    assert not torch.equal(model.state_dict()["0.weight"], initial.state_dict()["0.weight"])
    assert opt.optimizer.param_groups[0]["step"] == 4  # the example's 4 steps
