"""Property tests: any sequence of leases and releases keeps GPUs exclusive and accounted for."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import settings
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
