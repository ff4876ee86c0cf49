"""CPU speed of the C++ first pass and retry against torch's AdamW step, at 10M parameters.

Issue acceptance: on a 2-core CPU the C++ ArmijoAdam first pass is at least 2x faster than
``torch.optim.AdamW(foreach=True).step()`` at 10M parameters. The first pass does what an AdamW
step does (moments, direction, decoupled weight decay, parameter update) plus the per-block
reductions of the line search, in one read of (θ, g, m, v) and one write of (θ, m, v): 28 bytes
per parameter. The retry (``move``) reads θ, m, v and writes θ: 16 bytes per parameter.

A bf16 model with fp32 master weights runs the same passes on the master with the bf16 gradient,
reading the model's bf16 copy of θ (to take weights the user wrote) and writing it in the same
pass: 30 bytes per parameter (g and the copy are 2 bytes each). It is timed against the same work
unfused: a torch pass that takes the written weights, the C++ pass, then a copy of the master into
the model.

Parameters are a GPT-like list of tensors (token and position embeddings, per layer attention and
MLP matrices with biases and layer norms) totalling about 10M; the C++ passes run on one flat
buffer holding them, the AdamW steps on the tensor list. Each timing is the median of repeated
runs after warm-up. Writes bench/results/cpu_first_pass.json with the machine, versions, git
commit and thread count.

Usage: python bench/cpu_first_pass.py [--params 10e6] [--repeats 30] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import (  # noqa: E402
    add_out_argument,
    cpu_caches,
    cpu_model,
    git_commit,
    out_file,
    positive_float,
    positive_int,
    write_result,
)
from _timing import interleaved_times  # noqa: E402

from armijo_fused import ops
from armijo_fused.backends import cpp_backend, torch_backend
from armijo_fused.directions import get_rule
from armijo_fused.storage.layout import make_layout


def gpt_shapes(target: int) -> list[tuple[int, ...]]:
    """Tensor shapes of a small GPT (6 layers, width 320, context 256) whose token embedding
    (vocab rounded to 64) brings the total to about ``target`` parameters."""
    n_layer, ctx, d = 6, 256, 320
    layer = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
             (d, 4 * d), (d,)]
    rest = n_layer * sum(_numel(s) for s in layer) + ctx * d + 2 * d
    vocab = max(64, round((target - rest) / d / 64) * 64)
    return [(vocab, d), (ctx, d)] + layer * n_layer + [(d,), (d,)]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def interleaved_ms(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """(median ms, all times) of each callable, timed interleaved (bench/_timing.py)."""
    times = interleaved_times(fns, repeats, warmup)
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--params", type=positive_float, default=10e6,
                    help="parameter count (GPT-like tensors)")
    ap.add_argument("--repeats", type=positive_int, default=30, help="timed runs of each pass")
    ap.add_argument("--threads", type=int, default=None, help="torch threads; unset: as set")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    if not ops.available():
        raise SystemExit(f"the C++ extension is not available: {ops.why_unavailable()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    torch.manual_seed(0)

    shapes = gpt_shapes(int(args.params))
    tensors = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) * 1e-3 for s in shapes]
    n = sum(t.numel() for t in tensors)

    # The flat buffer of the C++ passes: one block (a global step size), as the optimizer lays it.
    rule = get_rule("adam")
    layout = make_layout([n])
    param = torch.zeros(layout.numel)
    grad = torch.zeros(layout.numel)
    torch.cat([t.reshape(-1) for t in tensors], out=param[:n])
    torch.cat([g.reshape(-1) for g in grads], out=grad[:n])
    states = [torch.zeros(layout.numel), torch.zeros(layout.numel)]
    scalars = rule.scalars({"betas": (0.9, 0.999), "eps": 1e-8}, 10)
    wd = 0.1
    eta = torch.tensor([1e-3])
    gscale = torch.ones(2)
    etas = [torch.tensor([1e-3]), torch.tensor([5e-4])]

    def cpp_first():
        cpp_backend.first_pass(rule, param, grad, states, scalars, wd, eta, gscale, layout)

    flip = [0]

    def cpp_move():  # a backtracking retry: η alternates so every call moves θ
        i = flip[0]
        cpp_backend.move(rule, param, grad, states, scalars, wd, etas[i], etas[1 - i], gscale,
                         layout)
        flip[0] = 1 - i

    grad16 = grad.to(torch.bfloat16)
    model16 = param.to(torch.bfloat16)

    def cpp_first_bf16():  # bf16 model, fp32 master: the model copy written inside the pass
        cpp_backend.first_pass(rule, param, grad16, states, scalars, wd, eta, gscale, layout,
                               model16)

    grad_f16 = grad.to(torch.float16)
    model_f16 = param.to(torch.float16)

    def cpp_first_fp16():  # the same with an fp16 model (F16C under AVX2)
        cpp_backend.first_pass(rule, param, grad_f16, states, scalars, wd, eta, gscale, layout,
                               model_f16)

    def cpp_first_bf16_unfused():  # the same work in separate passes over memory
        torch.where(param.to(torch.bfloat16) != model16, model16.float(), param, out=param)
        cpp_backend.first_pass(rule, param, grad16, states, scalars, wd, eta, gscale, layout)
        model16.copy_(param)

    def torch_first():
        torch_backend.first_pass(rule, param, grad, states, scalars, wd, eta, gscale, layout)

    def adamw(**kw):
        ps = [torch.nn.Parameter(t.clone()) for t in tensors]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=wd, **kw)
        return opt.step

    scratch = torch.empty(layout.numel)

    def copy_fn():  # the bandwidth anchor: read one buffer, write another
        scratch.copy_(grad)

    simd = ops.cpu_simd()  # what the machine picks; the acceptance ratio is measured with it

    def on(isa, fn):  # run fn with the given kernels, then go back to the machine's choice
        def run():
            ops.set_cpu_simd(isa)
            try:
                fn()
            finally:
                ops.set_cpu_simd("auto" if simd == "avx2" else "baseline")
        return run

    candidates = {
        "cpp first_pass (flat)": cpp_first,
        "cpp move / retry (flat)": cpp_move,
        "cpp first_pass (bf16 model, fp32 master)": cpp_first_bf16,
        "cpp first_pass (fp16 model, fp32 master)": cpp_first_fp16,
        "bf16 model, unfused (take, pass, copy)": cpp_first_bf16_unfused,
    }
    if simd == "avx2":  # the portable build too, for scale
        base = ops.set_cpu_simd("baseline")
        ops.set_cpu_simd("auto")
        candidates[f"cpp first_pass (flat, {base})"] = on("baseline", cpp_first)
        candidates[f"cpp move / retry (flat, {base})"] = on("baseline", cpp_move)
    candidates["AdamW(foreach=True).step"] = adamw(foreach=True)
    try:
        candidates["AdamW(fused=True).step"] = adamw(fused=True)
        candidates["AdamW(fused=True).step"]()
    except (RuntimeError, ValueError) as e:
        candidates.pop("AdamW(fused=True).step")
        print(f"AdamW(fused=True) does not run on CPU here: {e}")
    candidates["AdamW(foreach=False).step"] = adamw(foreach=False)
    candidates["copy (read+write, 8 B/param)"] = copy_fn
    rows = interleaved_ms(candidates, args.repeats)
    # the readable reference is ~30x slower: a few runs on their own
    rows.update(interleaved_ms({"torch reference first_pass (flat)": torch_first}, 5, warmup=1))

    bytes_per = {k: 28 for k in rows if k.startswith("cpp first_pass")}
    bytes_per.update({k: 16 for k in rows if k.startswith("cpp move")})
    bytes_per["copy (read+write, 8 B/param)"] = 8
    bytes_per["cpp first_pass (bf16 model, fp32 master)"] = 30
    bytes_per["cpp first_pass (fp16 model, fp32 master)"] = 30
    bytes_per["bf16 model, unfused (take, pass, copy)"] = 12 + 28 + 6  # take: read 6 B, write 4 B
    print(f"{n / 1e6:.2f}M parameters in {len(shapes)} tensors; {threads} torch threads; "
          f"{simd} kernels; load average before {load_before[0]:.2f}")
    print(f"{'pass':40s} {'median ms':>10s} {'GB/s':>8s}")
    for name, (ms, _) in rows.items():
        gbs = f"{bytes_per[name] * layout.numel / ms / 1e6:8.1f}" if name in bytes_per else ""
        print(f"{name:40s} {ms:10.2f} {gbs:>8s}")
    first = rows["cpp first_pass (flat)"][0]
    ratio = rows["AdamW(foreach=True).step"][0] / first
    print(f"AdamW(foreach=True).step / cpp first_pass = {ratio:.2f}x (acceptance: >= 2x)")
    ratio_fused = None
    if "AdamW(fused=True).step" in rows:
        ratio_fused = rows["AdamW(fused=True).step"][0] / first
        print(f"AdamW(fused=True).step / cpp first_pass = {ratio_fused:.2f}x")
    bf16 = rows["cpp first_pass (bf16 model, fp32 master)"][0]
    ratio_bf16 = rows["bf16 model, unfused (take, pass, copy)"][0] / bf16
    print(f"bf16 model: unfused / fused = {ratio_bf16:.2f}x; fused bf16-master pass / "
          f"fp32 pass = {bf16 / first:.2f}x")

    result = {
        "benchmark": "cpu_first_pass",
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                   "simd": simd, "caches": cpu_caches()},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "threads": threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "params": n,
        "padded_numel": layout.numel,
        "tensors": len(shapes),
        "repeats": args.repeats,
        "timings_ms": {k: {"median": v[0], "runs": v[1]} for k, v in rows.items()},
        "ratio_adamw_foreach_over_cpp_first_pass": ratio,
        "ratio_adamw_fused_over_cpp_first_pass": ratio_fused,
        "ratio_unfused_over_fused_bf16_master": ratio_bf16,
        "ratio_bf16_master_over_fp32_first_pass": bf16 / first,
    }
    write_result(out_file(args.out, "cpu_first_pass.json"), result)


if __name__ == "__main__":
    main()
