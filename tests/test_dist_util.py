"""The multi-process test harness itself (tests/_dist_util.py): a port taken between
``free_port`` and rank 0's bind costs one more run, not a failed test; a rank that raises or dies
while the other waits on it in a collective fails the test at once with what happened, not after
the timeout, and no rank is left running."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time

import _dist_util
import pytest


def _rank_id(rank, world):
    return rank, world


@pytest.mark.timeout(120)
def test_a_port_taken_before_rank_0_binds_it_is_retried_on_a_new_port(monkeypatch):
    held, picks = [], []
    pick = _dist_util.free_port

    def taken_the_first_time():
        port = pick()
        picks.append(port)
        if not held:  # another process binds the first port before rank 0 does
            s = socket.socket()
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        return port

    monkeypatch.setattr(_dist_util, "free_port", taken_the_first_time)
    try:
        assert _dist_util.run_ranks(_rank_id, world=2, timeout=60) == [(0, 2), (1, 2)]
    finally:
        for s in held:
            s.close()
    assert len(picks) == 2  # the first run failed on the taken port, the second ran


def _rank_raises_while_the_other_waits(rank, world):
    if rank == 0:
        raise ValueError("rank 0's own error")
    time.sleep(300)  # as a rank blocked in a collective that rank 0 never joins
    return "unreachable"


# (the harness's timeout is 120 s, pytest's 40: the test passes only if the waiting rank is
# killed GRACE seconds after rank 0's error, not at the harness's timeout)
@pytest.mark.timeout(40)
def test_a_rank_that_raises_ends_the_run_without_waiting_for_the_timeout():
    with pytest.raises(AssertionError, match="rank 0's own error"):
        _dist_util.run_ranks(_rank_raises_while_the_other_waits, world=2, timeout=120)
    assert not multiprocessing.active_children()  # the waiting rank was killed, not left behind


def _rank_dies_while_the_other_waits(rank, world):
    if rank == 0:
        os._exit(3)  # as a crash: no record written
    time.sleep(300)


@pytest.mark.timeout(40)
def test_a_rank_that_dies_without_a_result_is_named_with_its_exit_code():
    with pytest.raises(AssertionError, match=r"ranks \[0\] died without a result \(exit codes \[3\]\)"):
        _dist_util.run_ranks(_rank_dies_while_the_other_waits, world=2, timeout=120)
    assert not multiprocessing.active_children()
