"""The multi-process test harness itself (tests/_dist_util.py): a port taken between
``free_port`` and rank 0's bind costs one more run, not a failed test."""

from __future__ import annotations

import socket

import _dist_util
import pytest

pytestmark = [pytest.mark.timeout(120)]


def _rank_id(rank, world):
    return rank, world


def test_a_port_taken_before_rank_0_binds_it_is_retried_on_a_new_port(monkeypatch):
    held = []
    pick = _dist_util.free_port

    def taken_the_first_time():
        port = pick()
        if not held:  # another process binds the first port before rank 0 does
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        return port

    monkeypatch.setattr(_dist_util, "free_port", taken_the_first_time)
    try:
        # (rank 1 waits for rank 0 until the timeout in the first run: kept short)
        assert _dist_util.run_ranks(_rank_id, world=2, timeout=10) == [(0, 2), (1, 2)]
    finally:
        for s in held:
            s.close()
    assert len(held) == 1
