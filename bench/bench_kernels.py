"""GPU speed of the Triton first pass and retry against torch's AdamW step, in % of copy bandwidth.

Parameter lists shaped like GPT-2 124M and GPT-2 1.5B (fp32, tied embeddings), one block per
transformer layer (plus one for the embeddings and one for the final layer norm), laid out in one
flat buffer as the optimizer does. Passes timed (CUDA events, warm-up, median of ``--repeats``
of the device's time, the calls queued behind a GPU sleep so that no host work sits between the
events; the first pass and AdamW also one call at a time, host included, as ``ms_synced``):

* ``first_pass`` (Adam rule): reads θ, g, m, v, writes θ, m, v          28 B/param
* ``move_all``: a global retry, every block's η changes: reads θ, m, v, writes θ   16 B/param
* ``move_one_block``: a layer-wise retry, one block's η changes; the other tiles exit early
  (the byte budget counts that block's 16 B/param only)
* ``first_pass_bf16_master``: a bf16 model with fp32 master weights: the first pass on the
  master with a bf16 gradient, reading and writing the model's bf16 copy of θ  30 B/param
* ``move_all_bf16_master``: its global retry: reads θ, m, v, writes θ and the bf16 copy  18 B/param
* ``first_pass_table`` / ``move_all_table``: the same two passes through a tile table, on
  separate tensors that stay in place (the FSDP2 path: ``storage/table.py``)  28 / 16 B/param
* ``adamw_fused``: ``torch.optim.AdamW(fused=True).step()``              28 B/param
* ``adamw_foreach``: ``torch.optim.AdamW(foreach=True).step()``          28 B/param (its minimum)

on the same parameter list (the AdamW parameters and gradients are views of the flat buffers).
The device's copy bandwidth is measured with ``dst.copy_(src)`` on a large tensor (bytes = 2 ×
size), after half a second of copies, at the start and at the end (the higher counts); each pass
reports ms, GB/s from its byte budget and that as a % of the copy bandwidth.
Writes ``bench/results/kernels_<device-slug>.json`` (device, torch / triton / CUDA versions, git
commit) and a PNG bar chart beside it.

Usage: python bench/bench_kernels.py [--models gpt2-124m,gpt2-1.5b] [--repeats 30] [--tiles 2048]
Without CUDA it prints that it needs CUDA and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import (  # noqa: E402
    add_out_argument,
    device_slug,
    environment,
    git_commit,
    gpu_state,
    out_file,
    positive_int,
)

#: GPT-2 configurations: (vocab, context, width, layers)
MODELS = {
    "gpt2-124m": (50257, 1024, 768, 12),
    "gpt2-1.5b": (50257, 1024, 1600, 48),
}
#: parameters of each model (tied lm_head): the shape lists are checked against these
EXPECTED_PARAMS = {"gpt2-124m": 124_439_808, "gpt2-1.5b": 1_557_611_200}
BYTES_PER_PARAM = {"first_pass": 28, "move_all": 16, "move_one_block": 16,
                   "first_pass_bf16_master": 30, "move_all_bf16_master": 18,
                   "first_pass_table": 28, "move_all_table": 16,
                   "adamw_fused": 28, "adamw_foreach": 28}


def gpt2_blocks(vocab: int, ctx: int, d: int, layers: int) -> list[list[tuple[int, ...]]]:
    """Tensor shapes per block: embeddings, one block per transformer layer, the final norm."""
    layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),  # ln_1, attn c_attn, c_proj
             (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]  # ln_2, mlp c_fc, c_proj
    return [[(vocab, d), (ctx, d)]] + [list(layer) for _ in range(layers)] + [[(d,), (d,)]]


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _sleep_cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond, measured once."""
    global _CYCLES_PER_MS
    if _CYCLES_PER_MS is None:
        torch.cuda._sleep(1_000_000)  # (warm)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _CYCLES_PER_MS = 10_000_000 / max(start.elapsed_time(end), 1e-3)
    return _CYCLES_PER_MS


_CYCLES_PER_MS = None


def cuda_median_ms(fn, repeats: int, warmup: int = 5) -> tuple[float, list[float]]:
    """Median over ``repeats`` of one call's device time, from CUDA events (after ``warmup``
    calls). The calls are queued behind a GPU sleep longer than the host takes to issue them
    all, so each pair of events brackets the device work alone: timed one call at a time (a
    synchronize after each), the interval also held the host's work before the first launch,
    about 1 ms of Python for AdamW(fused).step() over 148 tensors (its kernels: 0.1 ms on this
    CPU's count), which made fused AdamW look slower than it is. See ``cuda_synced_ms``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    host_ms = 1e3 * (time.perf_counter() - t0)  # (host and device: an upper bound of the host's)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda._sleep(int(_sleep_cycles_per_ms() * (2.0 * repeats * host_ms + 5.0)))
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in zip(starts, ends)]
    return statistics.median(times), times


def cuda_synced_ms(fn, repeats: int) -> float:
    """Median of one call from the host's issue to the device's end (a synchronize after each,
    events around it): what a loop that waits on each step sees, host overhead included."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(repeats: int, nbytes: int = 2 << 30, warm_ms: float = 500.0) -> dict:
    """GB/s of ``dst.copy_(src)`` on ``nbytes`` fp32 (read + write = 2 × nbytes), after copies
    for ``warm_ms`` (an idle card's clocks rise under load: 5 warm-up copies, 5 ms, measured a
    reference too low, which inflates every "% of copy")."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    while 1e3 * (time.perf_counter() - t0) < warm_ms:
        dst.copy_(src)
        torch.cuda.synchronize()
    ms, _ = cuda_median_ms(lambda: dst.copy_(src), repeats)
    return {"bytes": 2 * nbytes, "ms": ms, "gb_per_s": 2 * nbytes / ms / 1e6}


class FlatModel:
    """θ, g, m, v of one model in flat buffers, and the model's tensors as views of θ and g."""

    def __init__(self, blocks, tile: int):
        from armijo_fused.storage.layout import make_layout

        self.layout = make_layout([sum(numel(s) for s in b) for b in blocks], tile=tile,
                                  device="cuda")
        n = self.layout.numel
        self.param = torch.zeros(n, device="cuda")
        self.grad = torch.zeros(n, device="cuda")
        self.states = [torch.zeros(n, device="cuda") for _ in range(2)]
        self.params = []
        for b, shapes in enumerate(blocks):
            off = self.layout.block_offsets[b]
            for shape in shapes:
                k = numel(shape)
                self.param[off:off + k].normal_(0.0, 0.02)
                self.grad[off:off + k].normal_(0.0, 1e-3)
                p = torch.nn.Parameter(self.param[off:off + k].view(shape))
                p.grad = self.grad[off:off + k].view(shape)
                self.params.append(p)
                off += k
        assert self.params[0].data_ptr() == self.param.data_ptr()  # views, not copies

    @property
    def nparams(self) -> int:
        return sum(p.numel() for p in self.params)


def bench_bf16_master(model: FlatModel, rule, scalars, eta, eta_half, gscale, repeats) -> dict:
    """A bf16 model with fp32 master weights (``model.param`` plays the master): the first pass
    and a global retry with a bf16 gradient, each writing the model's bf16 copy of θ."""
    from armijo_fused.backends import triton_backend as tri

    grad16 = model.grad.to(torch.bfloat16)
    model16 = model.param.to(torch.bfloat16)

    def first():
        tri.first_pass(rule, model.param, grad16, model.states, scalars, 0.1, eta, gscale,
                       model.layout, model16)

    def move_all():
        tri.move(rule, model.param, grad16, model.states, scalars, 0.1, eta, eta_half, gscale,
                 model.layout, model_param=model16)

    return {"first_pass_bf16_master": cuda_median_ms(first, repeats),
            "move_all_bf16_master": cuda_median_ms(move_all, repeats)}


def bench_table(blocks, tile: int, rule, scalars, repeats: int) -> dict:
    """The first pass and a global retry through a tile table, on one tensor per parameter (as
    FSDP2 keeps its shards) rather than a flat buffer; freed before returning."""
    from armijo_fused.backends import triton_backend as tri
    from armijo_fused.storage.layout import place_tensors_tiled
    from armijo_fused.storage.table import make_table

    shapes = [s for b in blocks for s in b]
    block_ids = [i for i, b in enumerate(blocks) for _ in b]
    params = [torch.empty(s, device="cuda").normal_(0.0, 0.02) for s in shapes]
    grads = [torch.empty(s, device="cuda").normal_(0.0, 1e-3) for s in shapes]
    layout, offsets = place_tensors_tiled([numel(s) for s in shapes], block_ids, tile=tile,
                                          device="cuda")
    table = make_table(layout, offsets, params, grads, "cuda")
    states = [torch.zeros(layout.numel, device="cuda") for _ in range(2)]
    eta = torch.full((layout.nblocks,), 1e-3, device="cuda")
    eta_half = eta * 0.5
    gscale = torch.ones(2, device="cuda")

    def first():
        tri.first_pass(rule, None, None, states, scalars, 0.1, eta, gscale, layout, table=table)

    def move_all():
        tri.move(rule, None, None, states, scalars, 0.1, eta, eta_half, gscale, layout,
                 table=table)

    return {"first_pass_table": cuda_median_ms(first, repeats),
            "move_all_table": cuda_median_ms(move_all, repeats)}


def bench_model(name: str, tile: int, repeats: int, copy_gbs: float) -> dict:
    from armijo_fused.backends import triton_backend as tri
    from armijo_fused.directions import get_rule

    blocks = gpt2_blocks(*MODELS[name])
    model = FlatModel(blocks, tile)
    n = model.nparams
    if n != EXPECTED_PARAMS[name]:
        raise AssertionError(f"{name}: {n} parameters, expected {EXPECTED_PARAMS[name]}")
    rule = get_rule("adam")
    group = {"betas": (0.9, 0.999), "eps": 1e-8}
    scalars = rule.scalars(group, 10)
    nb = model.layout.nblocks
    eta = torch.full((nb,), 1e-3, device="cuda")
    eta_half = eta * 0.5
    one = 1 + MODELS[name][3] // 2  # a transformer layer in the middle
    eta_one = eta.clone()
    eta_one[one] *= 0.5
    gscale = torch.ones(2, device="cuda")
    args = (rule, model.param, model.grad, model.states, scalars, 0.1)

    def first():
        tri.first_pass(*args, eta, gscale, model.layout)

    def move_all():
        tri.move(*args, eta, eta_half, gscale, model.layout)

    def move_one():
        tri.move(*args, eta, eta_one, gscale, model.layout)

    rows = {}
    rows["first_pass"] = cuda_median_ms(first, repeats)  # (warms up: compiles the kernel)
    synced = {"first_pass": cuda_synced_ms(first, repeats)}
    rows["move_all"] = cuda_median_ms(move_all, repeats)
    rows["move_one_block"] = cuda_median_ms(move_one, repeats)

    rows.update(bench_bf16_master(model, rule, scalars, eta, eta_half, gscale, repeats))
    rows.update(bench_table(blocks, tile, rule, scalars, repeats))
    torch.cuda.empty_cache()
    torch.cuda.empty_cache()
    for impl in ("fused", "foreach"):
        opt = torch.optim.AdamW(model.params, lr=1e-3, weight_decay=0.1,
                                **{impl: True})
        rows[f"adamw_{impl}"] = cuda_median_ms(opt.step, repeats)
        synced[f"adamw_{impl}"] = cuda_synced_ms(opt.step, repeats)
        del opt  # free its moments before the next one
        torch.cuda.empty_cache()

    one_numel = sum(numel(s) for s in blocks[one])
    out = {"params": n, "padded": model.layout.numel, "blocks": nb, "tile": tile,
           "num_warps": tri._num_warps(tile), "changed_block_params": one_numel, "passes": {}}
    for key, (ms, times) in rows.items():
        moved = one_numel if key == "move_one_block" else n
        gbs = BYTES_PER_PARAM[key] * moved / ms / 1e6
        out["passes"][key] = {
            "ms": ms, "bytes_per_param": BYTES_PER_PARAM[key], "params_moved": moved,
            "gb_per_s": gbs, "pct_of_copy": 100.0 * gbs / copy_gbs,
            "ms_min": min(times), "ms_max": max(times),
        }
        if key in synced:
            out["passes"][key]["ms_synced"] = synced[key]
    p = out["passes"]
    out["first_pass_over_adamw_fused"] = p["first_pass"]["ms"] / p["adamw_fused"]["ms"]
    # (each waited on, host work included: what a loop that syncs per step sees; not the line)
    out["first_pass_over_adamw_fused_synced"] = (p["first_pass"]["ms_synced"]
                                                 / p["adamw_fused"]["ms_synced"])
    out["move_all_over_first_pass"] = p["move_all"]["ms"] / p["first_pass"]["ms"]
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    keys = list(BYTES_PER_PARAM)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        passes = result["models"][m]["passes"]
        ms = [passes[k]["ms"] for k in keys]
        bars = ax.bar(range(len(keys)), ms,
                      color=["C0", "C0", "C2", "C4", "C4", "C5", "C5", "C1", "C3"])
        for bar, k in zip(bars, keys):
            ax.annotate(f"{passes[k]['pct_of_copy']:.0f}%", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("ms per call (median)")
        ax.set_title(f"{m}: {result['models'][m]['params'] / 1e6:.0f}M params")
    fig.suptitle(f"{result['device']} — labels: % of copy bandwidth "
                 f"({result.get('copy_gb_per_s_used', result['copy']['gb_per_s']):.0f} GB/s)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--repeats", type=positive_int, default=30, help="timed calls per pass (>= 20)")
    ap.add_argument("--tiles", default="2048",
                    help="comma-separated tile sizes (BLOCK_SIZE) to try; the fastest first "
                         "pass per model is reported")
    add_out_argument(ap, one_json=True)  # (the PNG goes beside the JSON)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs CUDA (a GPU): the Triton kernels are timed on the device. "
              "Nothing measured.")
        return 0
    if args.repeats < 20:
        ap.error("--repeats must be at least 20")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    tiles = [int(t) for t in args.tiles.split(",")]

    import triton

    dev = torch.cuda.get_device_name()
    copy = copy_bandwidth(args.repeats)
    print(f"{dev}: copy bandwidth {copy['gb_per_s']:.0f} GB/s")
    result = {
        "device": dev, "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "repeats": args.repeats,
        "environment": environment(torch.device("cuda")),  # (versions, the card's clocks)
        "copy": copy, "models": {}, "tile_sweep": {},
    }
    for m in models:
        runs = {}
        for tile in tiles:
            runs[tile] = bench_model(m, tile, args.repeats, copy["gb_per_s"])
            torch.cuda.empty_cache()  # the model's buffers are gone: return them to the device
            fp = runs[tile]["passes"]["first_pass"]
            print(f"  {m} tile {tile}: first pass {fp['ms']:.3f} ms ({fp['pct_of_copy']:.0f}%)")
        best = min(runs, key=lambda t: runs[t]["passes"]["first_pass"]["ms"])
        result["models"][m] = runs[best]
        if len(tiles) > 1:
            result["tile_sweep"][m] = {str(t): r["passes"]["first_pass"]["ms"]
                                       for t, r in runs.items()}
        print(f"{m} ({runs[best]['params'] / 1e6:.1f}M params, tile {best}):")
        for key, row in runs[best]["passes"].items():
            print(f"  {key:22s} {row['ms']:9.3f} ms  {row['gb_per_s']:7.0f} GB/s  "
                  f"{row['pct_of_copy']:5.1f}% of copy")
        print(f"  first_pass / fused AdamW = {runs[best]['first_pass_over_adamw_fused']:.3f}")

    # the reference again, at the end: the higher one counts (a reference measured while the
    # card's clocks were still rising would inflate every "% of copy")
    result["copy_end"] = copy_bandwidth(args.repeats)
    result["gpu_state_end"] = gpu_state()
    best_copy = max(copy["gb_per_s"], result["copy_end"]["gb_per_s"])
    result["copy_gb_per_s_used"] = best_copy
    for model in result["models"].values():
        for row in model["passes"].values():
            row["pct_of_copy"] = 100.0 * row["gb_per_s"] / best_copy
    print(f"copy bandwidth at the end {result['copy_end']['gb_per_s']:.0f} GB/s; "
          f"% of copy against {best_copy:.0f} GB/s")
    out = out_file(args.out, f"kernels_{device_slug(dev)}.json")
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
