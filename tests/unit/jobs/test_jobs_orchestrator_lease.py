"""The orchestrator lease on a real SQLite store: one holder, a clear refusal, takeover of a dead or
silent holder, and the fence that stops every write of a holder that lost it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from simbridge.jobs.errors import LeaseLostError, OrchestratorBusyError, StoreUnavailableError
from simbridge.jobs.store import Store
from simbridge.jobs.store.lease import OrchestratorLease
from simbridge.jobs.store.schema import orchestrator


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'jobs.db'}"


def _forge(store: Store, **values: object) -> None:
    with store.tx() as conn:
        conn.execute(sa.update(orchestrator).where(orchestrator.c.id == 1).values(**values))


def test_a_second_holder_is_refused_by_name_until_the_first_lets_go(url: str) -> None:
    with Store(url=url) as a, Store(url=url) as b:
        with OrchestratorLease(a, ttl_s=30):
            with pytest.raises(OrchestratorBusyError) as caught:
                OrchestratorLease(b, ttl_s=30).acquire()
            message = str(caught.value)
            assert f"host {socket.gethostname()} pid {os.getpid()} since" in message
            assert "jobs.orchestrator_lease_s=30s" in message
        second = OrchestratorLease(b, ttl_s=30)
        second.acquire()  # freed on exit: taken at once
        assert second.generation == 2


def test_a_holder_whose_pid_is_dead_on_this_host_is_replaced_at_once(url: str) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait(timeout=30)
    with Store(url=url) as store:
        now = time.time()
        _forge(
            store,
            holder="serve-dead",
            host=socket.gethostname(),
            pid=gone.pid,
            heartbeat_at=now,
            started_at=now,
        )
        OrchestratorLease(store, ttl_s=3600).acquire()


def test_a_silent_holder_elsewhere_is_replaced_only_after_the_ttl(url: str) -> None:
    with Store(url=url) as store:
        now = time.time()
        _forge(store, holder="serve-far", host="node-9", pid=1, heartbeat_at=now, started_at=now)
        with pytest.raises(OrchestratorBusyError, match="host node-9 pid 1 since"):
            OrchestratorLease(store, ttl_s=60).acquire()
        _forge(store, heartbeat_at=now - 61)
        OrchestratorLease(store, ttl_s=60).acquire()


def test_a_fenced_store_writes_nothing_once_the_lease_is_taken_over(url: str) -> None:
    with Store(url=url) as store, Store(url=url) as other:
        lease = OrchestratorLease(store, ttl_s=30)
        lease.acquire()
        store.fence(lease)
        store.add_event(reason="while holding")
        _forge(other, holder="serve-new", host="node-2", pid=7)
        with pytest.raises(LeaseLostError, match="now held by node-2 pid 7"):
            store.add_event(reason="after the takeover")
        with pytest.raises(LeaseLostError, match="now: host node-2 pid 7"):
            lease.renew()
        assert [e.reason for e in other.events()] == ["while holding"]


def test_a_lease_not_renewed_for_half_its_ttl_holds_every_write(url: str) -> None:
    with Store(url=url) as store:
        lease = OrchestratorLease(store, ttl_s=30)
        lease.acquire()
        store.fence(lease)
        lease._renewed -= 16  # as if the heartbeat had not got through for 16 s
        with pytest.raises(StoreUnavailableError, match="not renewed for 16s"):
            store.add_event(reason="stale")
        lease.renew()
        store.add_event(reason="renewed")
        assert [e.reason for e in store.events()] == ["renewed"]


def test_check_lease_proves_the_lease_right_before_a_launch(url: str) -> None:
    with Store(url=url) as store, Store(url=url) as other:
        assert store.check_lease() is None  # no fence (no serve): nothing to prove, no deadline
        lease = OrchestratorLease(store, ttl_s=30)
        lease.acquire()
        store.fence(lease)
        before = time.time()
        not_after = store.check_lease()
        # The launch wrapper's deadline: the end of the freshness window (half the TTL from the
        # renewal), never later.
        assert not_after is not None and before < not_after <= time.time() + 15
        lease._renewed -= 16  # paused: the lease may be taken over any moment
        with pytest.raises(StoreUnavailableError, match="not renewed for 16s"):
            store.check_lease()
        lease.renew()
        _forge(other, holder="serve-new", host="node-2", pid=7)
        with pytest.raises(LeaseLostError, match="now held by node-2 pid 7"):
            store.check_lease()
