"""``python -m armijo_fused demo``: ArmijoAdam against AdamW on Shakespeare, on your machine.

Both optimizers train the same small transformer (:mod:`armijo_fused.models`) from the same
initial weights on the same character-level batches (:mod:`armijo_fused.data`), under the same
5 % warmup + cosine schedule (to 10 % of the peak):

* ArmijoAdam with its defaults and ``weight_decay=0.01``. No learning rate is given: the line
  search finds η on each searched batch, and the schedule multiplies the applied step, so the
  parameters move by η · min(1, lr_t / lr_0).
* ``torch.optim.AdamW`` at torch's defaults (lr = 1e-3, betas (0.9, 0.999), weight decay 0.01):
  what one gets without a learning-rate sweep.

It prints a table (final training and validation loss on fixed held-out batches, ms per step,
extra forwards per step = (forwards − steps) / steps) and writes ``losses.png`` (loss curves and
ArmijoAdam's step sizes) and ``results.json`` into ``--out``. The default size finishes in about
two to four minutes on two CPU cores; a GPU is used when present.

The helpers (:func:`warmup_cosine`, :func:`evaluate`, :func:`closure_step`, :func:`plain_step`,
:func:`train`) are shared with the benchmarks in ``bench/``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Callable

import torch
from torch import nn

from .cli import prepare_out_dir, program
from .data import BatchSampler, fixed_batches, load_shakespeare
from .models import TransformerConfig, TransformerLM

__all__ = ["warmup_cosine", "evaluate", "closure_step", "plain_step", "train", "main"]


# -- shared training helpers ------------------------------------------------------------------
def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05,
                  floor: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    r"""Linear warmup then cosine decay, as a multiplier of each group's initial lr.

    .. math::
        s(t) = \begin{cases} (t+1)/W & t < W \\
        f + (1-f)\,\tfrac12\bigl(1 + \cos(\pi\,(t-W)/(T-W))\bigr) & t \ge W \end{cases}

    with W = max(1, ⌊warmup·T⌋) and floor f. The warmup starts at 1/W rather than 0 so that the
    first step already moves. For ArmijoAdam, s(t) is the lr_t / lr_0 that scales the searched η.
    """
    w = max(1, int(warmup * steps))

    def factor(t: int) -> float:
        if t < w:
            return (t + 1) / w
        frac = min(1.0, (t - w) / max(1, steps - w))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast: torch.autocast | None = None) -> float:
    """Mean loss of ``model(x, y)`` over fixed batches, in eval mode (restored afterwards)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for x, y in batches:
        if autocast is not None:
            with autocast:
                total += float(model(x, y))
        else:
            total += float(model(x, y))
    model.train(was_training)
    return total / max(1, len(batches))


def closure_step(opt: torch.optim.Optimizer, model: nn.Module,
                 autocast: Callable | None = None) -> Callable:
    """``step(x, y)`` for optimizers that take a torch-style closure (zero_grad + loss +
    backward), e.g. ArmijoAdam or LBFGS. Returns the loss at the parameters before the step."""

    ac = autocast or nullcontext

    def step(x, y):
        def closure():
            opt.zero_grad()
            with ac():
                loss = model(x, y)
            loss.backward()
            return loss

        out = opt.step(closure)  # (the closure's own value, its graph attached, as torch's)
        return out.detach() if torch.is_tensor(out) else out

    return step


def plain_step(opt: torch.optim.Optimizer, model: nn.Module,
               autocast: Callable | None = None) -> Callable:
    """``step(x, y)`` for ordinary optimizers: zero_grad, forward, backward, step."""

    ac = autocast or nullcontext

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with ac():
            loss = model(x, y)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(step: Callable, sampler: BatchSampler, steps: int, *, scheduler=None,
          record: Callable[[], dict] | None = None, eval_every: int = 0,
          eval_fn: Callable[[], dict] | None = None, name: str = "", progress: bool = True,
          device: torch.device | str = "cpu") -> dict:
    """Run ``steps`` training steps; returns the curves.

    ``step(x, y)`` does one optimizer step and returns the batch loss; ``record()`` adds values
    per step (e.g. the step size); ``eval_fn()`` returns a dict of evaluation losses, run every
    ``eval_every`` steps and after the last one. Wall-clock time excludes evaluation and is
    measured with the device synchronised at each step.

    Returns ``{"step": [...], "loss": [...], "time": [...], <record keys>: [...],
    "eval": [{"step": k, "time": t, **eval_fn()}, ...]}``.
    """
    device = torch.device(device)
    out: dict = {"step": [], "loss": [], "time": [], "eval": []}
    elapsed = 0.0
    every = max(1, steps // 10)
    for k in range(1, steps + 1):
        x, y = sampler.next()
        _sync(device)
        t0 = time.perf_counter()
        loss = step(x, y)
        loss_value = float(loss)  # the sync that makes the timing honest
        elapsed += time.perf_counter() - t0
        out["step"].append(k)
        out["loss"].append(loss_value)
        out["time"].append(elapsed)
        if record is not None:  # before the scheduler moves lr on to the next step's
            for key, v in record().items():
                out.setdefault(key, []).append(v)
        if scheduler is not None:
            scheduler.step()
        if eval_fn is not None and ((eval_every and k % eval_every == 0) or k == steps):
            out["eval"].append({"step": k, "time": elapsed, **eval_fn()})
        if progress and (k % every == 0 or k == steps):
            recent = out["loss"][-every:]
            print(f"  [{name}] step {k:5d}/{steps}  loss {sum(recent) / len(recent):.3f}  "
                  f"{elapsed:6.1f} s", flush=True)
        if not math.isfinite(loss_value):
            print(f"  [{name}] loss is {loss_value} at step {k}; stopping this run", flush=True)
            break
    return out


def _geometric_mean(values) -> float:
    """Of a layer-wise run's per-block step sizes (blocks with nothing to train are NaN)."""
    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(logs) / len(logs)) if logs else math.nan


def armijo_record(opt) -> Callable[[], dict]:
    """``record`` for :func:`train`: ArmijoAdam's searched η, applied step, lr_t / lr_0 and trials. A
    layer-wise run reports one η per block: the record keeps them (``*_blocks``) and, for the
    curves and the summaries, their geometric mean."""

    def record():
        s = opt.stats
        out = {"trials": int(s["trials"]), "searched": bool(s["searched"]),
               "lr_factor": float(s["lr_factor"])}
        for key in ("step_size", "applied_step"):
            v = s[key]
            if isinstance(v, (list, tuple)):
                out[f"{key}_blocks"] = [float(x) for x in v]
                out[key] = _geometric_mean([float(x) for x in v])
            else:
                out[key] = float(v)
        return out

    return record


# -- the demo -----------------------------------------------------------------------------------
def _positive(text: str) -> int:
    """argparse type: an integer >= 1 (a batch of 0 or no evaluation batches ended in a
    traceback, or in losses printed as 0.0000)."""
    try:
        value = int(text)
    except ValueError:  # (argparse's own message named this function: "invalid _positive")
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{program()} demo",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a small transformer on Shakespeare with ArmijoAdam (defaults, "
                    "weight decay 0.01) and "
                    "with AdamW (torch defaults, lr=1e-3), same schedule, same batches.")
    p.add_argument("--steps", type=_positive, default=500, help="training steps per optimizer")
    p.add_argument("--out", default="demo_out", help="output directory (PNG and JSON)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    p.add_argument("--batch", type=_positive, default=32, help="sequences per batch")
    p.add_argument("--context", type=_positive, default=64, help="characters per sequence")
    p.add_argument("--layers", type=_positive, default=2, help="transformer blocks")
    p.add_argument("--width", type=_positive, default=128, help="model width d")
    p.add_argument("--eval-batches", type=_positive, default=16,
                   help="fixed batches for the final train / validation loss")
    p.add_argument("--max-plays", type=_positive, default=None, help="use only the first N plays; unset: all")
    p.add_argument("--threads", type=_positive, default=1,
                   help="CPU threads for torch (a model this small gains little from more, and "
                        "OpenMP threads stall badly on a shared, busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def _usage_error(message: str) -> SystemExit:
    """A one-line error and exit status 2, as argparse gives for a bad option."""
    print(f"error: {message}", file=sys.stderr)
    return SystemExit(2)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise _usage_error(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise _usage_error("--device cuda was asked for but torch sees no CUDA device")
    return dev


def _heads(width: int) -> int:
    """One head per 32 channels, or the nearest count below that divides the width."""
    return next(h for h in range(max(1, width // 32), 0, -1) if width % h == 0)


def _plot(path: str, runs: dict, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, steps // 50)
    for name, r in runs.items():
        loss = torch.tensor(r["curve"]["loss"])
        if len(loss) >= window:  # running mean: batch losses are noisy
            smooth = loss.unfold(0, window, 1).mean(1)
            ax1.plot(range(window, len(loss) + 1), smooth, label=f"{name} (train, batch mean)")
        ev = r["curve"]["eval"]
        ax1.plot([e["step"] for e in ev], [e["val"] for e in ev], "o--", ms=3,
                 label=f"{name} (validation)")
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats / char)")
    ax1.set_title("loss")
    ax1.legend(fontsize=8)
    armijo = next((r for r in runs.values() if "step_size" in r["curve"]), None)
    if armijo is not None:
        c = armijo["curve"]
        ax2.semilogy(c["step"], c["step_size"], lw=1, label="searched η")
        ax2.semilogy(c["step"], c["applied_step"], lw=1, label="applied η · lr_t / lr_0")
        ks = [k for k, s in zip(c["step"], c["searched"]) if s]
        ax2.semilogy(ks, [c["step_size"][k - 1] for k in ks], "o", ms=4,
                     label="steps with a search")
    adamw = next((r for r in runs.values() if "lr" in r["curve"]), None)
    if adamw is not None:
        ax2.semilogy(adamw["curve"]["step"], adamw["curve"]["lr"], "k:", lw=1, label="AdamW lr")
    ax2.set_xlabel("step")
    ax2.set_title("ArmijoAdam step size")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from . import ArmijoAdam

    device = _device(args.device)
    problem = prepare_out_dir(args.out)
    if problem is not None:
        raise _usage_error(problem)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    try:
        data = load_shakespeare(max_plays=args.max_plays)
    except ImportError as e:
        raise _usage_error(f"{e}") from None
    # the evaluation batches first (their sampler has a generator of its own): a context longer
    # than the text (--max-plays 1 --context 20000) is refused before a model with that many
    # positions is built (--context 10000000 allocated gigabytes first)
    try:
        eval_sets = {
            "train": fixed_batches(data.train, args.eval_batches, args.batch, args.context,
                                   seed=args.seed + 1000, device=device),
            "val": fixed_batches(data.val, args.eval_batches, args.batch, args.context,
                                 seed=args.seed + 2000, device=device),
        }
    except ValueError as e:
        raise _usage_error(f"--context {args.context}: {e}") from None
    cfg = TransformerConfig(vocab_size=data.vocab_size, context=args.context,
                            d_model=args.width, n_layers=args.layers, n_heads=_heads(args.width))
    torch.manual_seed(args.seed)
    base = TransformerLM(cfg).to(device)
    if not args.quiet:
        print(f"Shakespeare: {len(data.train):,} train / {len(data.val):,} validation chars, "
              f"vocab {data.vocab_size}; model {base.num_parameters():,} parameters "
              f"({cfg.n_layers} layers, d={cfg.d_model}, context {cfg.context}); "
              f"{args.steps} steps of {args.batch}x{args.context} on {device}", flush=True)

    runs = {}
    for name in ("ArmijoAdam", "AdamW"):
        model = copy.deepcopy(base)
        if name == "ArmijoAdam":
            opt = ArmijoAdam(model.parameters(), weight_decay=0.01, model=model)
            step, record = closure_step(opt, model), armijo_record(opt)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
            step = plain_step(opt, model)
            record = (lambda o: lambda: {"lr": o.param_groups[0]["lr"]})(opt)
        sched = warmup_cosine(opt, args.steps)
        sampler = BatchSampler(data.train, args.batch, args.context, seed=args.seed,
                               device=device)
        curve = train(step, sampler, args.steps, scheduler=sched, record=record,
                      eval_every=max(1, args.steps // 5),
                      eval_fn=lambda m=model: {"val": evaluate(m, eval_sets["val"])},
                      name=name, progress=not args.quiet, device=device)
        n = len(curve["step"])
        forwards = opt.stats["forwards"] if hasattr(opt, "stats") else n
        runs[name] = {
            "train": evaluate(model, eval_sets["train"]),
            "val": evaluate(model, eval_sets["val"]),
            "ms_per_step": 1000.0 * curve["time"][-1] / n,
            "extra_forwards_per_step": (forwards - n) / n,
            "steps": n,
            "curve": curve,
        }

    print(f"\n{'optimizer':34s} {'train loss':>10s} {'val loss':>9s} {'ms/step':>8s} "
          f"{'extra fwd/step':>15s}")
    labels = {"ArmijoAdam": "ArmijoAdam (defaults, wd 0.01)",
              "AdamW": "AdamW (lr 1e-3, wd 0.01)"}
    for name, r in runs.items():
        print(f"{labels[name]:34s} {r['train']:10.4f} {r['val']:9.4f} {r['ms_per_step']:8.1f} "
              f"{r['extra_forwards_per_step']:15.2f}")

    png = os.path.join(args.out, "losses.png")
    _plot(png, runs, args.steps)
    result = {
        "device": str(device), "torch": torch.__version__, "config": vars(cfg),
        "args": vars(args), "schedule": "5% linear warmup, cosine to 10%",
        "runs": runs, "seconds_total": time.perf_counter() - t_start,
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {png} and {os.path.join(args.out, 'results.json')} "
          f"({result['seconds_total']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
