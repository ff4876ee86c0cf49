"""Layer-wise search when a layer is unfrozen mid-run: do the trained blocks keep their step sizes?

Trains a GPT-2 of 3 layers of width 64 (HF transformers; ``--model reference``: this package's
reference transformer of that shape) on the Shakespeare plays with a layer-wise optimizer while
its middle layer is frozen (``requires_grad=False``), then unfreezes it. The unfrozen block is
searched from a step size no test has judged; where it overshot, the search used to blame the
blocks held fixed and drag them down with it. Records per seed the mean training loss of the
last 10 steps of each phase, forwards per step and each block's final step size; writes
bench/results/layerwise_unfreeze_<model>_<optimizer>_cpu.json.

A/B: ``--against DIR`` runs the same seeds, in turn, with another checkout's package first on the
path (its python/ folder). Usage: python bench/layerwise_unfreeze.py [--model gpt2|reference]
[--optimizer sgd|adam] [--seeds 0,1,2] [--frozen-steps 150] [--steps 60] [--against DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def run(model_kind: str, optimizer: str, seed: int, frozen_steps: int, steps: int) -> dict:
    import torch

    import armijo_fused
    from armijo_fused import ArmijoAdam, ArmijoSGD
    from armijo_fused.data import BatchSampler, load_shakespeare
    from armijo_fused.models import TransformerConfig, TransformerLM

    torch.manual_seed(seed)
    data = load_shakespeare(max_plays=3)
    if model_kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        gpt2 = GPT2LMHeadModel(GPT2Config(
            vocab_size=data.vocab_size, n_positions=64, n_embd=64, n_layer=3, n_head=4,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
        model, frozen = gpt2, gpt2.transformer.h[1]

        def forward(x, y):
            return gpt2(x, labels=y).loss
    else:
        model = TransformerLM(TransformerConfig(vocab_size=data.vocab_size, context=64,
                                                d_model=64, n_layers=3, n_heads=4))
        frozen, forward = model.layers[1], model
    frozen.requires_grad_(False)
    if optimizer == "sgd":  # (plain SGD: its η is the only scale a block has)
        opt = ArmijoSGD(model.parameters(), model=model, layerwise=True, momentum=0.0)
    else:
        opt = ArmijoAdam(model.parameters(), model=model, layerwise=True)
    batches = BatchSampler(data.train, 16, 64, seed=seed)
    losses = []
    for k in range(frozen_steps + steps):
        if k == frozen_steps:
            frozen.requires_grad_(True)
        x, y = batches.next()
        opt.zero_grad()
        loss = forward(x, y)
        loss.backward()
        opt.step(loss_fn=lambda x=x, y=y: forward(x, y), loss=loss.detach())
        losses.append(float(loss))
    names = opt.param_groups[0]["block_names"]
    return {"package": str(Path(armijo_fused.__file__).parent),
            "loss_frozen_last10": sum(losses[frozen_steps - 10:frozen_steps]) / 10,
            "loss_last10": sum(losses[-10:]) / 10,
            "forwards_per_step": opt.stats["forwards"] / len(losses),
            "step_size": dict(zip(names, opt.param_groups[0]["step_size"]))}


def _child(path: str | None, args, seed: int) -> dict:
    from _env import run_child  # (bench/ is on the path: main puts it there)

    return run_child(__file__, ["--child", "--model", args.model, "--optimizer", args.optimizer,
                                "--seeds", str(seed), "--frozen-steps", str(args.frozen_steps),
                                "--steps", str(args.steps)], path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", choices=("gpt2", "reference"), default="gpt2",
                    help="HF transformers' GPT-2 (LayerNorm, biases, GELU; needs transformers) "
                         "or this package's reference transformer (RMSNorm, no biases)")
    ap.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                    help="layer-wise ArmijoSGD (momentum 0) or ArmijoAdam, with defaults")
    ap.add_argument("--seeds", default="0,1,2", help="comma separated")
    ap.add_argument("--frozen-steps", type=int, default=150,
                    help="steps with the middle layer frozen")
    ap.add_argument("--steps", type=int, default=60, help="steps after unfreezing it")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _env import add_ab_arguments, add_out_argument, environment, git_commit, out_file, write_result

    add_ab_arguments(ap)
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    if args.frozen_steps < 10 or args.steps < 10:
        ap.error("--frozen-steps and --steps must be at least 10 (the means are over 10 steps)")
    if args.child:
        print(json.dumps(run(args.model, args.optimizer, seeds[0], args.frozen_steps,
                             args.steps)))
        return 0
    import torch

    variants = {"this": None} if args.against is None else {"against": args.against,
                                                            "this": None}
    result = {"environment": environment(torch.device("cpu")), "model": args.model,
              "optimizer": args.optimizer,
              "frozen_steps": args.frozen_steps, "steps": args.steps, "variants": {}}
    for name in variants:
        result["variants"][name] = {"seeds": {}}
    for seed in seeds:
        for name, path in variants.items():
            r = _child(path, args, seed)
            entry = result["variants"][name]
            commit = git_commit(r["package"])
            entry["commit"] = commit if commit == "unknown" else commit[:7] + commit[40:]
            entry["seeds"][seed] = r
            etas = " ".join(f"{v:.2g}" for v in r["step_size"].values())
            print(f"{name:8s} seed {seed}: loss {r['loss_frozen_last10']:.3f} frozen, "
                  f"{r['loss_last10']:.3f} after; {r['forwards_per_step']:.2f} forwards/step; "
                  f"η {etas}", flush=True)
    write_result(out_file(args.out, f"layerwise_unfreeze_{args.model}_{args.optimizer}_cpu.json"),
                 result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
