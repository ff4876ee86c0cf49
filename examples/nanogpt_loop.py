"""A nanoGPT / torchtitan-style pretraining loop with ArmijoAdam.

    python examples/nanogpt_loop.py [--steps 30] [--dtype bf16|fp16|fp32] [--accum 2]

What it shows:
* autocast (bf16 by default; fp16 with a GradScaler: ``scaler.step(opt, loss_fn=..., loss=...)``
  unscales the gradient first and skips the step on overflow, leaving the state untouched);
* gradient accumulation over micro-batches: each micro-batch loss is divided by the number of
  micro-batches before its backward, and the trial loss re-evaluates *the same micro-batches with
  the same normalisation* under the same autocast, so the Armijo test compares like with like;
* clipping inside the optimizer (``max_grad_norm``): it shapes the direction only, while the test
  keeps the true gradient (clipping p.grad outside would falsify ⟨g, d⟩);
* a warmup + cosine schedule: it multiplies the step the search found (lr_t / lr_0).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn
from torch.nn import functional as F

from armijo_fused import ArmijoAdam


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True, dropout=0.0)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab=64, d=64, heads=4, layers=2, ctx=32):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as in nanoGPT
        for emb in (self.tok, self.pos):
            nn.init.normal_(emb.weight, std=0.02)

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), 1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def data(steps, accum, batch, ctx, vocab, seed=0):
    """Micro-batches of a learnable sequence task: x_{t+1} = (x_t + k) mod vocab."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            start = torch.randint(0, vocab, (batch, 1), generator=g)
            k = torch.randint(1, 4, (batch, 1), generator=g)
            seq = (start + k * torch.arange(ctx + 1)) % vocab
            micro.append((seq[:, :-1], seq[:, 1:]))
        yield micro


def lr_at(step, steps, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    ctx, vocab = 32, 64
    model = TinyGPT(vocab=vocab, ctx=ctx).to(device)
    # nanoGPT's configure_optimizers with the class swapped: torch's arguments, fused=True
    # included, are taken as they are; lr's value only matters through the schedule's ratio
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = ArmijoAdam(groups, lr=6e-4, betas=(0.9, 0.95), fused=True,
                     max_grad_norm=1.0, model=model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, args.steps, args.steps // 10))
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]
    scaler = torch.amp.GradScaler(device) if args.dtype == "fp16" else None

    def autocast():
        return torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype is not None)

    def window_loss(micro):
        """Σ_j loss_j / accum over the micro-batches: the quantity whose gradient we have."""
        total = 0.0
        for x, y in micro:
            with autocast():
                logits = model(x.to(device))
            total = total + F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
        return total / len(micro)

    t0 = time.perf_counter()
    losses = []
    for step, micro in enumerate(data(args.steps, args.accum, args.batch, ctx, vocab)):
        opt.capture_rng()  # trials replay the window's dropout masks (none here, but free)
        opt.zero_grad()
        f0 = 0.0
        for x, y in micro:
            with autocast():
                logits = model(x.to(device))
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten())
            loss = loss / len(micro)
            (scaler.scale(loss) if scaler else loss).backward()
            f0 = f0 + loss.detach()
        trial = lambda micro=micro: window_loss(micro)
        if scaler is not None:
            scaler.step(opt, loss_fn=trial, loss=f0)  # unscales first; skips on overflow
            scaler.update()
        else:
            opt.step(loss_fn=trial, loss=f0)
        sched.step()
        losses.append(float(f0))
        if step % 10 == 0 or step == args.steps - 1:
            s = opt.stats
            print(f"step {step:3d}  loss {float(f0):.3f}  eta {s['step_size']:.2e}  "
                  f"applied {s['applied_step']:.2e}  searched {s['searched']}")
    s = opt.stats
    print(f"{args.steps} steps in {time.perf_counter() - t0:.1f} s, "
          f"forwards per step {s['forwards'] / args.steps:.2f} (1 = no line-search overhead)")
    return losses


if __name__ == "__main__":
    main()
