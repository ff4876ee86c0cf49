"""FSDP2: optimizer time per step with the passes on the shards in place against flat copies.

``storage/sharded.py`` runs the fused passes on FSDP2's local shards either in place, through a
tile table (the default for fp32 shards), or on flat copies of them (copied in at every step, θ
copied back after every pass). This times both on the same model and data:

* ``step``: a step without a search (cadence far away): sync + first pass + reshard, i.e. the
  optimizer's whole work on a non-search step; the backward that produced the gradient is not in
  the timing;
* ``search_step``: a step that searches, minus nothing: closure forward/backward + trial forwards
  + passes, so the saving shows against the whole step.

Runs 2 gloo ranks on CPU (one thread each). Writes bench/results/fsdp2_in_place_cpu.json with the
machine, versions and commit.

Usage: python bench/fsdp2_in_place.py [--width 768] [--layers 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import add_out_argument, environment, out_file, positive_int, write_result  # noqa: E402


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh())
                           for _ in range(layers)], nn.Linear(width, 1))


def run_rank(rank: int, world: int, port: int, out: str, args: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the machine's cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from armijo_fused import ArmijoAdam
    from armijo_fused.storage.sharded import ShardedBuffer

    result = {}
    for mode in ("in_place", "copies"):
        ShardedBuffer.default_in_place = None if mode == "in_place" else False
        model = make_model(args["width"], args["layers"])
        mesh = init_device_mesh("cpu", (world,))
        for block in model:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(args["batch"], args["width"], generator=g)
        y = torch.randn(args["batch"], 1, generator=g)

        def loss_fn(model=model, x=x, y=y):
            return nn.functional.mse_loss(model(x), y)

        times = {}
        for kind, cadence in (("step", 10**6), ("search_step", "every")):
            opt = ArmijoAdam(model.parameters(), model=model, cadence=cadence)
            ts = []
            for _ in range(args["steps"] + 2):
                opt.zero_grad()
                loss = loss_fn()
                loss.backward()
                torch.distributed.barrier()
                t0 = time.perf_counter()
                if kind == "step":
                    opt.step(loss_fn=loss_fn, loss=loss.detach())
                else:
                    def closure():
                        opt.zero_grad()
                        v = loss_fn()
                        v.backward()
                        return v
                    opt.step(closure)
                ts.append((time.perf_counter() - t0) * 1e3)
            # the first steps build the buffers (and step 1 searches): not timed
            times[kind] = {"median_ms": statistics.median(ts[2:]), "runs_ms": ts[2:]}
            times["in_place_buffers"] = [b.in_place for b in opt._buffers]
        result[mode] = times
    result["params"] = sum(p.numel() for p in make_model(args["width"], args["layers"]).parameters())
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--width", type=int, default=768, help="width of the Linear+Tanh layers")
    ap.add_argument("--layers", type=int, default=8, help="Linear+Tanh layers")
    ap.add_argument("--batch", type=int, default=16, help="rows of each rank's fixed batch")
    ap.add_argument("--steps", type=positive_int, default=20, help="timed steps (after 2 untimed)")
    add_out_argument(ap, one_json=True)
    args = ap.parse_args(argv)
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(run_rank, args=(world, port, tmp, vars(args)), nprocs=world,
                           start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    r0 = ranks[0]
    print(f"{r0['params'] / 1e6:.1f}M parameters, FSDP2 over {world} gloo ranks, 1 thread each")
    ratios = {}
    for kind in ("step", "search_step"):
        a, b = r0["in_place"][kind]["median_ms"], r0["copies"][kind]["median_ms"]
        ratios[kind] = b / a
        print(f"{kind:12s} in place {a:8.2f} ms   copies {b:8.2f} ms   copies / in place "
              f"{b / a:.2f}x")
    write_result(out_file(args.out, "fsdp2_in_place_cpu.json"), {
        "benchmark": "fsdp2_in_place", **environment(torch.device("cpu")),
        "torch_threads": 1, "world": world, "args": vars(args), "params": r0["params"],
        "ranks": ranks, "copies_over_in_place": ratios,
    })


if __name__ == "__main__":
    main()
