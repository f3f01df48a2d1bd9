"""Replacing and cleaning stale blocks from racing processes: one winner, and no live block is removed.

Every trial leaves a stale block (its owner exited without unlinking), then starts real processes
that hit it at once through a barrier. Trials are bounded; without the name's lock many of them race.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import numpy as np
import pytest

from simbridge.shm import Block, BlockExists, BlockNotFound, block_info, cleanup_stale, remove
from simbridge.shm.namelock import lock_path

CTX = multiprocessing.get_context("fork")
TRIALS = 15
WAIT_S = 60.0


def _leave_stale(name: str) -> None:
    """A block whose owner is gone: the child creates it and exits without any cleanup."""

    def owner() -> None:
        block = Block.create(name, 4, np.int64)
        block.publish(np.zeros(4, np.int64))
        os._exit(0)  # no finalizer, no atexit (block is still referenced): what a crash leaves behind

    proc = CTX.Process(target=owner, daemon=True)
    proc.start()
    proc.join(WAIT_S)
    assert proc.exitcode == 0
    info = block_info(name)
    assert info is not None and info.stale


def _contender(role: str, name: str, barrier: Barrier, done: Event, results: Any) -> None:
    try:
        barrier.wait(WAIT_S)
        if role == "clean":
            cleanup_stale(prefix=name)
            results.put(("cleaned", os.getpid(), ""))
            return
        if role == "rm":
            with contextlib.suppress(BlockExists, BlockNotFound):  # a live owner's, or gone: both fine
                remove(name)
            results.put(("cleaned", os.getpid(), ""))
            return
        try:
            block = Block.create(name, 4, np.int64)
        except BlockExists as exc:
            results.put(("lost", os.getpid(), str(exc)))
            return
        block.publish(np.full(4, os.getpid(), np.int64))
        results.put(("won", os.getpid(), ""))
        # Once every contender is done: is the name still our block, or did someone unlink it?
        done.wait(WAIT_S)
        info = block_info(name)
        kept = info is not None and info.owner_pid == os.getpid()
        results.put(("kept" if kept else "lost its block", os.getpid(), ""))
        block.close()
    except BaseException as exc:  # reported, so the parent never waits for a crashed child
        results.put(("error", os.getpid(), repr(exc)))
    finally:
        results.close()
        results.join_thread()  # os._exit would drop what the queue's feeder thread has not sent yet
        os._exit(0)


def _trial(name: str, roles: list[str]) -> tuple[list[tuple[str, int, str]], str | None]:
    """Run one race; returns every contender's outcome and what the winner found at the end."""
    _leave_stale(name)
    results = CTX.Queue()
    barrier = CTX.Barrier(len(roles))
    done = CTX.Event()
    procs: list[BaseProcess] = [
        CTX.Process(target=_contender, args=(role, name, barrier, done, results), daemon=True)
        for role in roles
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=WAIT_S) for _ in roles]
    assert not [o for o in outcomes if o[0] == "error"], outcomes
    winners = [pid for kind, pid, _ in outcomes if kind == "won"]
    found = None
    if len(winners) == 1:
        with Block.open(name, timeout=5) as reader:  # readers find the winner's block
            assert reader.read(timeout=5).array.tolist() == [winners[0]] * 4
    done.set()
    if len(winners) == 1:
        found = results.get(timeout=WAIT_S)[0]
    for p in procs:
        p.join(WAIT_S)
        assert p.exitcode == 0
    return outcomes, found


def test_exactly_one_of_racing_replacers_wins_and_keeps_its_block(block_name: str) -> None:
    for _ in range(TRIALS):
        outcomes, found = _trial(block_name, ["replace"] * 4)
        winners = [o for o in outcomes if o[0] == "won"]
        assert len(winners) == 1, f"{len(winners)} processes each believe they replaced the block"
        assert found == "kept"
        assert all("alive" in detail for kind, _, detail in outcomes if kind == "lost"), outcomes
        assert block_info(block_name) is None
    assert not lock_path(block_name).exists()  # lock files do not pile up in /dev/shm


@pytest.mark.parametrize("remover", ["clean", "rm"])
def test_clean_and_rm_never_remove_a_block_a_live_owner_just_replaced(block_name: str, remover: str) -> None:
    # Live bystanders listed after the stale block widen the gap between a remover's check and its
    # unlink, the gap a replacer used to slip into.
    bystanders = [Block.create(f"{block_name}-z{i:02d}", 1, np.int8) for i in range(100)]
    try:
        for _ in range(TRIALS):
            outcomes, found = _trial(block_name, ["replace", remover, remover])
            assert [o[0] for o in outcomes].count("won") == 1, outcomes
            assert found == "kept", "a remover unlinked the block its live owner had just made"
        assert all(block_info(b.name) is not None for b in bystanders)
    finally:
        for b in bystanders:
            b.close()
