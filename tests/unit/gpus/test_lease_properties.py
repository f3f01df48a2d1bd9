"""Property tests: any sequence of leases and releases keeps GPUs exclusive and accounted for."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from simbridge.gpus import GpuLease, GpuPool, InvalidLeaseRequest, LeaseTimeout

SLOTS = 4


class LeaseMachine(RuleBasedStateMachine):
    """Two pool objects on one lock folder stand for two processes sharing the GPUs."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self._tmp = tempfile.TemporaryDirectory()
        folder = Path(self._tmp.name)
        self.pools = [GpuPool(slots=SLOTS, lock_dir=folder), GpuPool(slots=SLOTS, lock_dir=folder)]
        self.held: dict[int, GpuLease] = {}

    @rule(target=leases, which=st.integers(0, 1), count=st.integers(-1, SLOTS + 1))
    def lease(self, which: int, count: int) -> GpuLease | None:
        free = SLOTS - len(self.held)
        try:
            lease = self.pools[which].lease(count, timeout=0)
        except InvalidLeaseRequest:
            assert not 1 <= count <= SLOTS
            return None
        except LeaseTimeout:
            assert 1 <= count <= SLOTS
            assert count > free, "refused although enough GPUs were free"
            return None
        assert len(lease.indices) == count
        assert count <= free
        for index in lease.indices:
            assert index not in self.held, f"GPU {index} handed out twice"
            self.held[index] = lease
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease: GpuLease | None) -> None:
        if lease is None:
            return
        lease.release()
        for index in lease.indices:
            del self.held[index]

    @invariant()
    def holders_match_the_model(self) -> None:
        for pool in self.pools:
            held = {h.index for h in pool.holders() if h.held}
            assert held == set(self.held)
        assert self.pools[0].waiting() == 0

    def teardown(self) -> None:
        for lease in set(self.held.values()):
            lease.release()
        self._tmp.cleanup()


LeaseMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestLeases = LeaseMachine.TestCase


@settings(max_examples=12, deadline=None)
@given(counts=st.lists(st.integers(1, SLOTS), min_size=1, max_size=5))
def test_waiters_are_served_in_arrival_order_whatever_they_ask(counts: list[int]) -> None:
    # Leases are ordered by when they were granted (CLOCK_MONOTONIC): a later small request
    # must never be granted before an earlier big one.
    with tempfile.TemporaryDirectory() as folder:
        pool = GpuPool(slots=SLOTS, lock_dir=Path(folder), poll_interval=0.002)
        served: list[tuple[int, int]] = []
        blocker = pool.lease(SLOTS)
        threads = []
        for position, count in enumerate(counts):
            thread = threading.Thread(target=_serve, args=(pool, position, count, served))
            thread.start()
            threads.append(thread)
            deadline = time.monotonic() + 30
            while pool.waiting() < position + 1:
                assert time.monotonic() < deadline, "a waiter never joined the line"
                time.sleep(0.002)
        blocker.release()
        for thread in threads:
            thread.join(timeout=60)
        assert [position for _, position in sorted(served)] == list(range(len(counts)))


def _serve(pool: GpuPool, position: int, count: int, served: list[tuple[int, int]]) -> None:
    with pool.lease(count, timeout=60) as lease:
        served.append((lease.granted_ns, position))
