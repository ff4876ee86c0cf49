"""An accelerate loop with gradient accumulation, ArmijoAdam swapped in for AdamW.

    python examples/accelerate_loop.py [--steps 40] [--accumulate 2] [--save DIR]

``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, whose ``step()``
takes no loss function, so the trial loss is registered on the optimizer inside it
(``set_closure``) when the window's last micro-batch has run. ``accelerator.backward`` divides
each micro-batch's loss by the number of accumulation steps; the trial must compute the same
function, so it sums the window's micro-batch losses divided the same way, and the loss at θ0 is
that sum of the training losses (``provide_loss``: no extra forward). The RNG state recorded
before each micro-batch's forward lets the trials replay its dropout masks, even where the data
loading draws random numbers between micro-batches. Steps between windows are no-ops, as for
any optimizer under ``accelerator.accumulate``. ``--save DIR`` ends with
``accelerator.save_state(DIR, safe_serialization=False)``: the parameters are views of the
optimizer's flat buffer, which safetensors (the default format) would save as one tensor.
"""

from __future__ import annotations

import argparse

import torch
from accelerate import Accelerator
from torch import nn

import armijo_fused
from armijo_fused import ArmijoAdam
from armijo_fused.integrations import armijo_optimizer


def make(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, 16, generator=g)
    y = torch.sin(x[:, :4].sum(1, keepdim=True)) + 0.05 * torch.randn(2048, 1, generator=g)
    return model, torch.utils.data.TensorDataset(x, y)


def main(argv=None) -> list[float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps")
    ap.add_argument("--accumulate", type=int, default=2)
    ap.add_argument("--save", default=None, help="save_state here at the end")
    args = ap.parse_args(argv)
    for name in ("steps", "accumulate"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")

    model, data = make()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=args.accumulate)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    opt = ArmijoAdam(model.parameters(), weight_decay=0.01, model=model)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    armijo = armijo_optimizer(opt)  # the ArmijoAdam inside the AcceleratedOptimizer

    window, losses, step_losses = [], [], []
    batches = iter(loader)
    while len(step_losses) < args.steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            continue
        with accelerator.accumulate(model):
            if not window:
                armijo.capture_rng()  # trials replay this window's dropout masks ...
            window.append((x, y, armijo_fused.get_rng_state()))  # ... each micro-batch's own
            loss = nn.functional.mse_loss(model(x), y)
            accelerator.backward(loss)  # divides by the accumulation steps
            losses.append(loss.detach() / args.accumulate)
            if accelerator.sync_gradients:  # the window is complete: this step() steps
                kept = list(window)
                armijo.set_closure(lambda kept=kept: sum(
                    armijo_fused.set_rng_state(rng) or
                    nn.functional.mse_loss(model(bx), by) / args.accumulate
                    for bx, by, rng in kept))
                armijo.provide_loss(torch.stack(losses).sum())
                step_losses.append(float(torch.stack(losses).sum()))
                window, losses = [], []
            opt.step()
            opt.zero_grad()
        last = len(step_losses) == args.steps  # (fewer than 10 steps printed nothing)
        if step_losses and (len(step_losses) % 10 == 0 or last) and not window:
            accelerator.print(f"step {len(step_losses):4d}  loss {step_losses[-1]:.4f}  "
                              f"step size {armijo.stats['step_size']:.2e}")
    if args.save:
        accelerator.save_state(args.save, safe_serialization=False)
    return step_losses


if __name__ == "__main__":
    main()
