"""The orchestrator lease: at most one `serve` acts on a jobs database at a time.

The lease is the one row of the ``orchestrator`` table, taken in a guarded write and renewed by a
heartbeat thread. A second serve is refused with the holder's name; a holder that stopped renewing
(killed, host down) is replaced after the TTL, or at once when its pid is dead on this very host.
The holder's store is fenced with it: every write checks, in its own transaction, that the lease is
still ours, so a serve that lost it (paused past the TTL, partitioned) writes nothing more.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import uuid
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from simbridge.jobs.errors import LeaseLostError, OrchestratorBusyError, StoreError
from simbridge.jobs.store.base import StoreBase
from simbridge.jobs.store.schema import orchestrator
from simbridge.logs import get_logger
from simbridge.processes import proc_start_time

log = get_logger(__name__)

_ROW = orchestrator.c.id == 1


def _db_now(conn: Connection) -> float:
    """The database's clock (PostgreSQL), so that serves on several hosts compare one time."""
    if conn.dialect.name == "postgresql":
        return float(conn.execute(sa.text("SELECT extract(epoch from clock_timestamp())")).scalar_one())
    return time.time()  # SQLite: one machine, one clock


def _utc(at: float | None) -> str:
    return "?" if at is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def describe_holder(row: Any, now: float) -> str:
    """``host H pid P since T, last heartbeat Ns ago`` of an orchestrator row."""
    beat = "never" if row.heartbeat_at is None else f"{max(0.0, now - row.heartbeat_at):.1f}s ago"
    return f"host {row.host} pid {row.pid} since {_utc(row.started_at)}, last heartbeat {beat}"


class OrchestratorLease:
    """This process's hold on a store's orchestrator lease; the store's fence once taken.

    A context manager: entering takes the lease (or raises :class:`OrchestratorBusyError`) and starts
    the heartbeat; leaving stops it and frees the lease (if still ours). ``on_lost`` is called once,
    from the heartbeat thread, when the lease turns out to be someone else's.
    """

    def __init__(self, store: StoreBase, *, ttl_s: float, on_lost: Any = None) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.token = f"serve-{uuid.uuid4().hex}"
        self.generation = 0
        self.lost: str | None = None
        self._on_lost = on_lost
        self._renewed = -math.inf  # monotonic time at which the last renewal began
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    # ---- the fence's questions ---------------------------------------------------------------

    def fresh(self) -> bool:
        """Renewed recently enough that no one can have taken the lease over (half the TTL)."""
        return self.lost is None and time.monotonic() - self._renewed < self.ttl_s / 2

    def valid_until(self) -> float:
        """Epoch seconds until which :meth:`fresh` holds (no one can have taken the lease over)."""
        return time.time() + (self._renewed + self.ttl_s / 2 - time.monotonic())

    def lost_reason(self) -> str | None:
        """Why the lease is gone for good (taken over), or None."""
        return self.lost

    def stale_reason(self) -> str:
        """Why :meth:`fresh` is False, for the error that stops a write."""
        if self.lost is not None:
            return self.lost
        age = time.monotonic() - self._renewed
        return f"orchestrator lease not renewed for {age:.0f}s (database unreachable?); writing nothing"

    # ---- taking, renewing, freeing -----------------------------------------------------------

    def acquire(self) -> None:
        """Take the lease in one guarded transaction, or raise :class:`OrchestratorBusyError`."""
        host, pid = socket.gethostname(), os.getpid()
        started = proc_start_time(pid)
        with self.store.tx(fenced=False) as conn:
            # FOR UPDATE (PostgreSQL): waits for writes in flight under a previous holder's fence.
            row = conn.execute(sa.select(orchestrator).where(_ROW).with_for_update()).first()
            if row is None:  # the migration inserts it; a hand-emptied table gets it back
                conn.execute(sa.insert(orchestrator).values(id=1, generation=0))
                row = conn.execute(sa.select(orchestrator).where(_ROW).with_for_update()).one()
            # The clocks are read once the row is ours: a wait for the lock (a holder stopped
            # inside its transaction) must not make the new lease look stale from its start.
            began = time.monotonic()
            now = _db_now(conn)
            previous = None
            if row.holder is not None:
                previous = describe_holder(row, now)
                if not self._replaceable(row, now, host):
                    raise OrchestratorBusyError(
                        f"another `simbridge serve` holds the jobs database {self.store.where}: "
                        f"{previous}; stop it first (a holder that stops renewing is replaced "
                        f"after jobs.orchestrator_lease_s={self.ttl_s:g}s)"
                    )
            self.generation = int(row.generation) + 1
            conn.execute(
                sa.update(orchestrator)
                .where(_ROW)
                .values(
                    holder=self.token,
                    host=host,
                    pid=pid,
                    pid_start=None if started is None else started[0],
                    started_at=now,
                    heartbeat_at=now,
                    generation=self.generation,
                )
            )
        self._renewed = began
        if previous is not None:
            log.warning("jobs.lease_taken_over", previous=previous)

    def _replaceable(self, row: Any, now: float, host: str) -> bool:
        if row.heartbeat_at is None or now - row.heartbeat_at > self.ttl_s:
            return True
        if row.host == host and row.pid is not None:
            info = proc_start_time(int(row.pid))
            dead = info is None or info[1] in {"Z", "X"}
            reused = info is not None and row.pid_start is not None and info[0] != row.pid_start
            return dead or reused
        return False

    def renew(self) -> None:
        """Push the heartbeat; :class:`LeaseLostError` if the lease is no longer ours."""
        began = time.monotonic()
        with self.store.tx(fenced=False) as conn:
            now = _db_now(conn)
            done = conn.execute(
                sa.update(orchestrator)
                .where(_ROW, orchestrator.c.holder == self.token)
                .values(heartbeat_at=now)
            ).rowcount
            if not done:
                row = conn.execute(sa.select(orchestrator).where(_ROW)).first()
                who = "nobody" if row is None or row.holder is None else describe_holder(row, now)
                raise LeaseLostError(
                    f"this serve lost the orchestrator lease of {self.store.where} (now: {who}); "
                    "it was not renewed within jobs.orchestrator_lease_s and was taken over"
                )
        self._renewed = began

    def release(self) -> None:
        """Free the lease if it is still ours (best effort: a dead holder is replaced anyway)."""
        try:
            with self.store.tx(fenced=False) as conn:
                conn.execute(
                    sa.update(orchestrator)
                    .where(_ROW, orchestrator.c.holder == self.token)
                    .values(holder=None, heartbeat_at=None)
                )
        except StoreError as exc:
            log.warning("jobs.lease_release_failed", error=str(exc))

    # ---- the heartbeat -----------------------------------------------------------------------

    def start(self) -> None:
        """Start renewing in the background (every sixth of the TTL)."""
        self._thread = threading.Thread(target=self._beat, name="sb-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 6):
            try:
                self.renew()
            except LeaseLostError as exc:
                self.lost = str(exc)
                log.error("jobs.lease_lost", error=self.lost)
                if self._on_lost is not None:
                    self._on_lost(self.lost)
                return
            except StoreError as exc:
                if not self._failing:  # one line per change of state, not one per try
                    self._failing = True
                    log.warning("jobs.lease_renew_failing", error=str(exc))
                continue
            if self._failing:
                self._failing = False
                log.info("jobs.lease_renewed")

    def stop(self) -> None:
        """Stop the heartbeat (waits for a renewal in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def __enter__(self) -> OrchestratorLease:
        self.acquire()
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Heartbeat first: a renewal racing the release would do no harm, but would log.
        self.stop()
        if self.lost is None:
            self.release()
