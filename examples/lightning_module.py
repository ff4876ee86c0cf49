"""PyTorch Lightning with ArmijoAdam: automatic optimization through ArmijoLightningMixin.

    python examples/lightning_module.py [--steps 20] [--precision 32-true|bf16-mixed]

The mixin passes a loss-only function beside Lightning's closure: the closure runs once (forward,
backward, hooks), trials evaluate ``armijo_loss`` on the accumulation window's micro-batches.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as L
import torch
from torch import nn

from armijo_fused import ArmijoAdam
from armijo_fused.integrations.lightning import ArmijoLightningMixin


class LitRegressor(ArmijoLightningMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        loss = self.armijo_loss(batch, batch_idx)
        self.log("train_loss", loss, prog_bar=True)  # silenced during trials anyway
        return loss

    def armijo_loss(self, batch, batch_idx):  # the loss only: what every trial evaluates
        x, y = batch
        return nn.functional.mse_loss(self.net(x).float(), y)

    def configure_optimizers(self):
        opt = ArmijoAdam(self.parameters(), weight_decay=0.01, model=self)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.trainer.max_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", default="32-true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(512, 8)
    data = torch.utils.data.TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
    model = LitRegressor()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps,
                        accumulate_grad_batches=2, precision=args.precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    before = mean_loss(model, data)
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=32, shuffle=True))
    after = mean_loss(model, data)
    s = trainer.optimizers[0].stats
    print(f"loss on the data {before:.4f} -> {after:.4f}, step size {s['step_size']:.2e}")
    return before, after


@torch.no_grad()
def mean_loss(model, data):
    x, y = data.tensors
    return float(model.armijo_loss((x.to(model.device), y.to(model.device)), 0))


if __name__ == "__main__":
    main()
