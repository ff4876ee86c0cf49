"""Long runs on classifiers that fit their training set: the loss-trend guard's benchmark.

The Armijo test on one noisy mini-batch passes steps that fit that batch. On a classifier that
can fit its whole training set, searches keep passing their first (grown) trial while the loss
of the other batches turns up, and η̄ grew past anything AdamW uses (0.1-2.5 for Adam
directions) even under warmup + cosine. The loss-trend guard (``trend_guard``, on for
ArmijoAdam's global search) watches the searched batches' loss before their step and shrinks
η̄ where it rises.

Tasks (synthetic, fixed seeds, no download):

* ``mlp``: 20 inputs, 5 classes labelled by a random ReLU teacher with label noise, 2,000
  training and 2,000 test points; an MLP 20-128-128-5;
* ``cnn``: 1x16x16 images of 10 smooth random templates with noise, contrast and shifts, 2,000
  and 1,000 points; two conv + BatchNorm + pool layers and a linear head.

Each run: 5% linear warmup then cosine to 0 (LambdaLR), cross-entropy, the same batches for
every optimizer of a seed. Optimizers: ArmijoAdam (defaults), ArmijoAdam without the guard,
AdamW at 3e-4, 1e-3 (its default) and 3e-3. Reports the final training loss over the whole
training set, test accuracy, forwards per step and η̄ at the end, and writes
``bench/results/fit_classifier_<device>.json`` (device, versions, commit).

Usage: python bench/fit_classifier.py [--tasks mlp:64,mlp:16,mlp:4,cnn:4] [--steps 1500]
       [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from armijo_fused import ArmijoAdam

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import add_out_argument, positive_int, write_runs  # noqa: E402

OPTIMIZERS = ("ArmijoAdam", "ArmijoAdam trend_guard=False", "AdamW lr=0.0003", "AdamW lr=0.001",
              "AdamW lr=0.003")


def teacher_labelled(seed=0, d=20, classes=5, n_train=2000, n_test=2000):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(d, 64, generator=g) / math.sqrt(d)
    w2 = torch.randn(64, classes, generator=g) / 8

    def draw(n):
        x = torch.randn(n, d, generator=g)
        logits = torch.relu(x @ w1) @ w2 * 3 + 0.3 * torch.randn(n, classes, generator=g)
        return x, logits.argmax(1)

    return draw(n_train), draw(n_test)


def templates(seed=0, classes=10, n_train=2000, n_test=1000):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(classes, 1, 4, 4, generator=g)
    tmpl = F.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    tmpl = tmpl / tmpl.std(dim=(1, 2, 3), keepdim=True)

    def draw(n):
        y = torch.randint(0, classes, (n,), generator=g)
        contrast = 0.35 + 0.3 * torch.rand(n, 1, 1, 1, generator=g)
        x = contrast * tmpl[y] + torch.randn(n, 1, 16, 16, generator=g) \
            + 0.5 * torch.randn(n, 1, 1, 1, generator=g)
        shifts = torch.randint(-2, 3, (n, 2), generator=g).tolist()
        x = torch.stack([torch.roll(x[i], shifts=tuple(s), dims=(1, 2))
                         for i, s in enumerate(shifts)])
        return x, y

    return draw(n_train), draw(n_test)


def mlp():
    return nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 5))


def cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 16, 10))


TASKS = {"mlp": (teacher_labelled, mlp), "cnn": (templates, cnn)}


def warmup_cosine(steps: int, warmup: float = 0.05):
    w = max(1, round(warmup * steps))

    def factor(s):
        if s < w:
            return (s + 1) / w
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / max(1, steps - w))))

    return factor


def run(task: str, batch: int, name: str, seed: int, steps: int) -> dict:
    data_fn, model_fn = TASKS[task]
    (x_train, y_train), (x_test, y_test) = data_fn()
    torch.manual_seed(seed)
    model = model_fn()
    if name.startswith("ArmijoAdam"):
        opt = ArmijoAdam(model.parameters(), model=model, trend_guard="trend_guard=False" not in name)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=float(name.split("lr=")[1]), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    g = torch.Generator().manual_seed(1000 + seed)
    n = len(x_train)
    order, pos, forwards = torch.randperm(n, generator=g), 0, 0
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            if pos + batch > n:
                order, pos = torch.randperm(n, generator=g), 0
            idx = order[pos:pos + batch]
            pos += batch
            xb, yb = x_train[idx], y_train[idx]
            model.train()

            def closure(xb=xb, yb=yb):
                opt.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                return loss

            if isinstance(opt, ArmijoAdam):
                opt.step(closure)
            else:
                closure()
                opt.step()
                forwards += 1
            sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x_train), y_train))
        test_acc = float((model(x_test).argmax(1) == y_test).float().mean())
    out = {"task": task, "batch": batch, "optimizer": name, "seed": seed,
           "train_loss": train_loss, "test_acc": test_acc, "seconds": round(seconds, 1),
           "warnings": sorted({str(w.message)[:120] for w in caught})}
    if isinstance(opt, ArmijoAdam):
        g0 = opt.param_groups[0]
        out.update(forwards_per_step=g0["forwards"] / steps, eta_bar_end=g0["step_size_avg"],
                   searches=g0["searches"])
    else:
        out["forwards_per_step"] = forwards / steps
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tasks", default="mlp:64,mlp:16,mlp:4,cnn:4",
                    help="task:batch pairs, comma separated (tasks: mlp, cnn)")
    ap.add_argument("--steps", type=positive_int, default=1500, help="training steps per run")
    ap.add_argument("--seeds", default="0,1,2", help="comma separated")
    ap.add_argument("--only", default=None, help="optimizer name prefixes, comma separated")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    pairs = []
    for item in args.tasks.split(","):
        task, _, batch = item.partition(":")
        if task not in TASKS or not batch.isdigit() or int(batch) < 1:
            ap.error(f"--tasks: {item!r} is not task:batch with a task in {sorted(TASKS)}")
        pairs.append((task, int(batch)))
    names = [o for o in OPTIMIZERS if args.only is None
             or any(o.startswith(p) for p in args.only.split(","))]
    torch.set_num_threads(1)
    runs = []
    for task, batch in pairs:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in names:
                r = run(task, batch, name, seed, args.steps)
                runs.append(r)
                print(f"{task}:{batch} seed {seed} {name:28s} train {r['train_loss']:.4f} "
                      f"test acc {r['test_acc']:.3f} forwards/step {r['forwards_per_step']:.2f}"
                      + (f" eta_bar {r['eta_bar_end']:.3g}" if "eta_bar_end" in r else ""),
                      flush=True)
    write_runs(args, "fit_classifier", torch.device("cpu"), runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
