"""Wall-clock timing shared by the CPU-side benchmarks."""

from __future__ import annotations

import time


def interleaved_times(fns: dict, repeats: int, warmup: int = 3, sync=None) -> dict:
    """Wall times (ms) of each callable, ``repeats`` of each. Runs are interleaved (one of each
    per round), so a change in the machine's load during the benchmark hits every candidate
    alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before and after each timed call, so
    device work and host work both count."""
    sync = sync or (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times
