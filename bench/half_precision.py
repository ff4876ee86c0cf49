"""bf16 parameters: ArmijoAdam's fp32 master weights against stepping the bf16 tensors directly.

The same model, initial weights and batches (character-level Shakespeare, the reference
transformer of :mod:`armijo_fused.models`), four runs:

* ``ArmijoAdam fp32``: fp32 parameters, the reference;
* ``ArmijoAdam bf16``: the model cast to bf16; the optimizer keeps fp32 master weights and fp32
  moments and writes the bf16 tensors from the master (automatic for bf16 parameters);
* ``AdamW fp32``: ``torch.optim.AdamW(lr=1e-3)`` on fp32 parameters;
* ``AdamW bf16``: the same on the bf16 model: torch steps the bf16 tensors themselves (bf16
  moments too), so an update smaller than half a bf16 ulp of its weight is rounded away.

No schedules (as in the demo). The loss is computed in fp32 from the logits either way. Reports
the final training loss on fixed training batches, the validation loss and ms per step, and
writes ``bench/results/half_precision_<device>.json`` (device, versions, commit).

Usage: python bench/half_precision.py [--steps 300] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from armijo_fused import ArmijoAdam
from armijo_fused.data import BatchSampler, fixed_batches, load_shakespeare
from armijo_fused.demo import evaluate
from armijo_fused.models import TransformerConfig, TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import add_out_argument, environment, out_file, positive_int, result_slug, write_result  # noqa: E402


def run(name: str, base: TransformerLM, data, args, device) -> dict:
    model = copy.deepcopy(base).to(device)
    if name.endswith("bf16"):
        model = model.to(torch.bfloat16)
    if name.startswith("ArmijoAdam"):
        opt = ArmijoAdam(model.parameters(), weight_decay=args.wd, model=model)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=args.wd)
    sampler = BatchSampler(data.train, args.batch, args.context, seed=args.seed, device=device)
    losses, t0 = [], time.perf_counter()
    for _ in range(args.steps):
        x, y = sampler.next()

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = model(x, y)
            loss.backward()
            return loss

        if isinstance(opt, ArmijoAdam):
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        losses.append(float(loss.detach()))
    if device.type == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - t0) / args.steps * 1e3
    train_fixed = fixed_batches(data.train, 8, args.batch, args.context, seed=99, device=device)
    val_fixed = fixed_batches(data.val, 8, args.batch, args.context, seed=7, device=device)
    out = {"train_loss": evaluate(model, train_fixed), "val_loss": evaluate(model, val_fixed),
           "ms_per_step": ms, "losses": losses,
           "param_dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    if isinstance(opt, ArmijoAdam):
        p = next(model.parameters())
        out["state_dtypes"] = sorted({str(v.dtype).replace("torch.", "")
                                      for v in opt.state[p].values() if torch.is_tensor(v)})
        out["forwards_per_step"] = opt.param_groups[0]["forwards"] / args.steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--steps", type=positive_int, default=300, help="training steps per run")
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch")
    ap.add_argument("--context", type=int, default=64, help="characters per sequence")
    ap.add_argument("--wd", type=float, default=0.01, help="decoupled weight decay (all runs)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    data = load_shakespeare()
    torch.manual_seed(args.seed)
    base = TransformerLM(TransformerConfig(vocab_size=data.vocab_size, context=args.context))
    names = ["ArmijoAdam fp32", "ArmijoAdam bf16", "AdamW fp32", "AdamW bf16"]
    runs = {}
    for name in names:
        runs[name] = run(name, base, data, args, device)
        r = runs[name]
        print(f"{name:16s} train {r['train_loss']:.4f}  val {r['val_loss']:.4f}  "
              f"{r['ms_per_step']:6.1f} ms/step", flush=True)
    gap = {
        "ArmijoAdam bf16 / fp32 train loss":
            runs["ArmijoAdam bf16"]["train_loss"] / runs["ArmijoAdam fp32"]["train_loss"],
        "AdamW bf16 / fp32 train loss":
            runs["AdamW bf16"]["train_loss"] / runs["AdamW fp32"]["train_loss"],
    }
    for k, v in gap.items():
        print(f"{k}: {v:.3f}")
    out = out_file(args.out, f"half_precision_{result_slug(device)}.json")
    write_result(out, {"benchmark": "half_precision", **environment(device), "args": vars(args),
        "params": sum(p.numel() for p in base.parameters()), "runs": runs, "ratios": gap})
    return 0


if __name__ == "__main__":
    sys.exit(main())
