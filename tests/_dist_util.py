"""Run a function on N CPU processes with the gloo backend, torchrun-free, with a hard timeout.

``run_ranks(fn, world=2, timeout=90, args=...)`` spawns ``world`` processes (spawn start method),
initialises gloo on a free localhost port, calls ``fn(rank, world, *args)`` in each and returns the
list of what each rank returned (anything torch.save can write). A rank that raises fails the test
with its traceback; ranks still running at ``timeout`` without a result are killed and the test
fails with a message saying so (a deadlock shows up as this timeout, never as a hung test run); a
rank that wrote its result but does not exit (stuck in ``destroy_process_group``) is killed quietly.
Once a rank has raised, the others get ``GRACE`` seconds and are then killed (they may be waiting on
it in a collective). Ranks are killed on every way out, an interrupted wait included.
``fn`` must be importable by name (a module-level function of a test module or of this one).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _save(record, path):
    # whole or not at all: the parent reads it as soon as it is there (run_ranks)
    torch.save(record, path + ".part")
    os.replace(path + ".part", path)


def _entry(fn, rank, world, port, out_dir, args, env):
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # two ranks share a 2-core machine
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        if env.get("_AF_INIT", "1") == "1":
            torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        _save({"ok": True, "result": result}, path)
    except BaseException:
        _save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


GRACE = 5.0  # seconds the other ranks get once one rank has failed (they may be waiting on it)


class _PortTaken(AssertionError):
    """Rank 0 could not bind the port ``free_port`` picked: another process took it first."""


def run_ranks(fn, *, world: int = 2, timeout: float = 90.0, args=(), init: bool = True,
              env: dict | None = None):
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; return the per-rank results.

    ``init=False`` leaves ``init_process_group`` to ``fn`` (the env vars of torchrun are set).
    Rank 0 binds the port seconds after ``free_port`` released it: should another process take
    it in between, the run is made once more on a new port, within the same ``timeout``.
    """
    deadline = time.monotonic() + timeout  # both runs together: the timeout stays hard
    try:
        return _run_ranks_once(fn, world, deadline, args, init, env)
    except _PortTaken:
        return _run_ranks_once(fn, world, deadline, args, init, env)


def _run_ranks_once(fn, world, deadline, args, init, env):
    ctx = mp.get_context("spawn")
    env = dict(env or {})
    env["_AF_INIT"] = "1" if init else "0"
    with tempfile.TemporaryDirectory() as out_dir:
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args, env),
                             daemon=False) for r in range(world)]
        try:
            for p in procs:
                p.start()
            paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world)]
            records, hung = _wait(procs, paths, deadline)
        finally:
            # also when pytest-timeout or ^C interrupts the wait: a live non-daemon rank would
            # hold up the interpreter's exit
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join(5)
        # everything that went wrong, together: one rank's error can be another's death
        said = [f"rank {r} raised:\n{rec['error']}" for r, rec in enumerate(records)
                if rec is not None and not rec["ok"]]
        dead = [r for r, rec in enumerate(records) if rec is None and r not in hung]
        if dead:
            codes = [procs[r].exitcode for r in dead]
            said.append(f"ranks {dead} died without a result (exit codes {codes})")
        if hung:
            said.append(f"ranks {hung} were still running (deadlock?) and were killed")
        if said:
            rank0 = records[0]
            if (rank0 is not None and not rank0["ok"] and str(port) in rank0["error"]
                    and "address already in use" in rank0["error"].lower()):
                raise _PortTaken("\n".join(said))
            raise AssertionError("\n".join(said))
        return [rec["result"] for rec in records]


def _wait(procs, paths, deadline):
    """Wait for every rank's record, or the deadline, or GRACE seconds after a rank failed;
    return the records (None: none written) and the ranks still running without one."""
    records = [None] * len(procs)

    def read_new():
        for r, path in enumerate(paths):
            if records[r] is None and os.path.exists(path):
                records[r] = torch.load(path, weights_only=False)

    failed_at = None
    while time.monotonic() < deadline:
        read_new()
        if failed_at is None and any(
                (rec is not None and not rec["ok"])
                or (rec is None and not p.is_alive() and not os.path.exists(path))
                for rec, p, path in zip(records, procs, paths)):
            failed_at = time.monotonic()  # a rank raised, or died without a record
        if all(rec is not None or not p.is_alive() for rec, p in zip(records, procs)):
            break
        if failed_at is not None and time.monotonic() > failed_at + GRACE:
            break
        time.sleep(0.05)
    for p in procs:
        p.join(max(0.1, min(10.0, deadline - time.monotonic())) if failed_at is None else 0.1)
    # a rank that wrote its result and is still running is stuck in destroy_process_group
    # (torch 2.6's gloo, now and then), after the test's own work: killed by the caller, not
    # counted as a deadlock of the code under test
    read_new()  # written while the others were being joined
    hung = [r for r, p in enumerate(procs) if p.is_alive() and records[r] is None]
    return records, hung
