"""Layer-wise vs global ArmijoAdam on real text: cost per step and the per-block step sizes.

Trains the reference transformer (armijo_fused.models) on the Shakespeare plays (armijo_fused.data)
with ArmijoAdam searching one global step size and with ``layerwise=True`` (one step size per
block, round-robin search), same cadence, same seed and batches. Records the median ms per step
(whole step: forward, backward, optimizer and trial forwards), forwards per step, final training
and validation loss, and the per-block step-size traces; writes
bench/results/layerwise_<device>.json and a PNG of the traces.

Issue 5's acceptance: layer-wise no slower per step than global by more than 5% at the same
cadence. Usage: python bench/layerwise.py [--steps 200] [--cadence every] [--device cuda]
[--block-search grow_all --tag=-grow-all]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from armijo_fused import ArmijoAdam

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _env import add_out_argument, positive_int  # noqa: E402
from convergence import environment  # noqa: E402  (the shared environment record)

from armijo_fused.data import BatchSampler, fixed_batches, load_shakespeare
from armijo_fused.models import TransformerConfig, TransformerLM


def _cadence(value):
    return int(value) if value.isdigit() else value


def train(layerwise, args, data, device):
    torch.manual_seed(args.seed)
    cfg = TransformerConfig(vocab_size=data.vocab_size, context=args.context,
                            d_model=args.d_model, n_layers=args.layers, n_heads=args.heads)
    model = TransformerLM(cfg).to(device)
    opt = ArmijoAdam(model.parameters(), weight_decay=0.1, betas=(0.9, 0.95), model=model,
                     cadence=_cadence(args.cadence), layerwise=layerwise,
                     **({"block_search": args.block_search} if layerwise else {}))
    sampler = BatchSampler(data.train, args.batch, args.context, seed=args.seed, device=device)
    val = fixed_batches(data.val, 4, args.batch, args.context, device=device)
    times, losses, steps_trace = [], [], []
    for _ in range(args.steps):
        x, y = sampler.next()

        def closure():
            opt.zero_grad()
            loss = model(x, y)
            loss.backward()
            return loss

        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        s = opt.stats["step_size"]
        steps_trace.append(list(s) if isinstance(s, list) else [s])
    with torch.no_grad():
        val_loss = sum(float(model(xv, yv)) for xv, yv in val) / len(val)
    warm = times[args.steps // 10:]  # the first steps include allocation and growth
    names = opt.param_groups[0].get("block_names", ["global"])
    return dict(
        layerwise=layerwise, ms_per_step_median=1e3 * statistics.median(warm),
        ms_per_step_mean=1e3 * statistics.fmean(warm),
        forwards_per_step=opt.param_groups[0]["forwards"] / args.steps,
        train_loss_last20=statistics.fmean(losses[-20:]), val_loss=val_loss,
        block_names=names, step_sizes=steps_trace, losses=losses,
    )


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        label = "layer-wise" if r["layerwise"] else "global"
        ax1.plot(r["losses"], label=label, lw=0.8)
        trace = list(zip(*r["step_sizes"]))
        for name, t in zip(r["block_names"], trace):
            ax2.semilogy(t, lw=1.0 if r["layerwise"] else 2.0,
                         ls="-" if r["layerwise"] else "--",
                         label=f"{name}" if r["layerwise"] else "global")
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax1.legend()
    ax2.set(xlabel="step", ylabel="accepted step size η", title="step size per block")
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device")
    ap.add_argument("--steps", type=positive_int, default=200, help="training steps per run")
    ap.add_argument("--cadence", default="every", help="every | adaptive | an int k")
    ap.add_argument("--batch", type=int, default=16, help="sequences per batch")
    ap.add_argument("--context", type=int, default=64, help="characters per sequence")
    ap.add_argument("--d-model", type=int, default=64, help="model width")
    ap.add_argument("--layers", type=int, default=4, help="transformer layers")
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--plays", type=int, default=6, help="Shakespeare plays read")
    ap.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    ap.add_argument("--block-search", default="round_robin",
                    choices=("round_robin", "stale", "grow_all", "exact"),
                    help="the layer-wise run's block_search")
    ap.add_argument("--tag", default="", help="suffix of the result files")
    add_out_argument(ap, one_json=False)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    data = load_shakespeare(max_plays=args.plays)
    rows = [train(False, args, data, device), train(True, args, data, device)]
    g, lw = rows
    ratio = lw["ms_per_step_median"] / g["ms_per_step_median"]
    print(f"{'':12} {'ms/step':>8} {'fwd/step':>9} {'train(last20)':>14} {'val':>7}")
    for r in rows:
        print(f"{'layer-wise' if r['layerwise'] else 'global':12} {r['ms_per_step_median']:8.1f} "
              f"{r['forwards_per_step']:9.2f} {r['train_loss_last20']:14.4f} {r['val_loss']:7.4f}")
    print(f"layer-wise / global time per step: {ratio:.3f} (acceptance: <= 1.05)")
    print("final per-block step sizes:",
          dict(zip(lw["block_names"], (f"{x:.2e}" for x in lw["step_sizes"][-1]))))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"layerwise_{device.type}{args.tag}")
    plot(rows, stem + ".png")
    result = dict(benchmark="layerwise", env=environment(device), args=vars(args),
                  time_ratio_layerwise_over_global=ratio, rows=rows)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
