"""The GPUs of plain SSH hosts, assigned by the store: each grant is one transaction, so no two
beams ever hold one remote GPU, whichever process or connection asks; waiters are served first come
first served; a beam's GPUs go back in the transaction that closes its attempt (db.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from simbridge.jobs.states import BeamState
from simbridge.jobs.store import statements as sql
from simbridge.jobs.store.base import StoreBase

# A waiter nobody asked for within this long (its serve stopped) no longer holds its place.
WAIT_STALE_S = 600.0


@dataclass(frozen=True)
class HostGpuRow:
    """One GPU of a plain host as stored: its id (as CUDA_VISIBLE_DEVICES takes it) and holder."""

    host: str
    gpu: str
    slot: int
    uuid: str | None
    beam_id: int | None
    held_at: float | None


class HostGpuStore(StoreBase):
    """The store's host-GPU methods (mixed into :class:`~simbridge.jobs.store.Store`)."""

    def set_host_gpus(self, host: str, gpus: Sequence[tuple[str, str | None]]) -> None:
        """Record the GPUs of ``host`` as ``(id, uuid)`` pairs, in order (idempotent).

        GPUs no longer listed are dropped once free; a held one stays until its attempt ends.
        """
        ids = [gpu for gpu, _ in gpus]
        if len(set(ids)) != len(ids):
            raise ValueError(f"host {host!r}: GPU ids repeat in {ids}")
        with self.fast_tx() as tx:
            known = {row[0] for row in tx.run(sql.HOST_GPUS_LOCKED, {"host": host}).fetchall()}
            for slot, (gpu, uuid) in enumerate(gpus):
                stmt = sql.UPDATE_HOST_GPU if gpu in known else sql.INSERT_HOST_GPU
                tx.run(stmt, {"host": host, "gpu": gpu, "slot": slot, "uuid": uuid})
            for gone in known - set(ids):
                tx.run(sql.DROP_FREE_HOST_GPU, {"host": host, "gpu": gone})

    def host_gpus(self, host: str) -> list[HostGpuRow]:
        """The GPUs of ``host`` in order, with their holders."""
        with self._fast_read() as cursor:
            rows = cursor.run(sql.HOST_GPUS, {"host": host}).fetchall()
        return [HostGpuRow(host, str(r[0]), int(r[1]), r[2], r[3], r[4]) for r in rows]

    def host_gpu_waiters(self, host: str) -> list[int]:
        """Beam ids waiting for GPUs of ``host``, first in line first."""
        with self._fast_read() as cursor:
            return [int(r[0]) for r in cursor.run(sql.WAITERS, {"host": host}).fetchall()]

    def acquire_host_gpus(
        self, host: str, *, beam_id: int, count: int, stale_s: float = WAIT_STALE_S
    ) -> tuple[str, ...] | None:
        """Give ``count`` free GPUs of ``host`` to the QUEUED beam ``beam_id``, or None: it waits.

        One transaction: the host's rows are locked (PostgreSQL FOR UPDATE; SQLite's write lock),
        leftovers of ended holders are swept, the beam joins the queue (keeping its place on
        later calls) and is served only when it is first in line and enough GPUs are free. A
        beam that already holds GPUs of the host gets the same ones again (a call repeated
        after a crash). Raises ValueError when the host has fewer GPUs than ``count``.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        now = time.time()
        queued = BeamState.QUEUED.value
        with self.fast_tx() as tx:
            rows = tx.run(sql.HOST_GPUS_LOCKED, {"host": host}).fetchall()
            if len(rows) < count:
                raise ValueError(f"host {host!r} has {len(rows)} GPU(s) recorded; a beam asks for {count}")
            tx.run(sql.SWEEP_HOST_GPUS, {"host": host, "queued": queued})
            rows = tx.run(sql.HOST_GPUS_LOCKED, {"host": host}).fetchall()
            mine = tuple(str(r[0]) for r in rows if r[3] == beam_id)
            if mine:
                tx.run(sql.DELETE_WAITER, {"host": host, "beam_id": beam_id})
                return mine
            tx.run(sql.PURGE_WAITERS, {"host": host, "queued": queued, "stale_before": now - stale_s})
            params = {"host": host, "beam_id": beam_id, "count": count, "now": now}
            if tx.run(sql.WAITER, params).fetchone() is None:
                tx.run(sql.INSERT_WAITER, params)
            else:
                tx.run(sql.SEEN_WAITER, params)
            first = tx.run(sql.FIRST_WAITER, {"host": host, "one": 1}).fetchone()
            if first is None or int(first[0]) != beam_id:
                return None  # someone asked before us: FIFO, no overtaking
            free = [str(r[0]) for r in rows if r[3] is None]
            if len(free) < count:
                return None
            chosen = free[:count]
            for gpu in chosen:
                take = {"host": host, "gpu": gpu, "v_beam_id": beam_id, "v_now": now}
                if tx.run(sql.TAKE_HOST_GPU, take).rowcount != 1:
                    # Cannot happen under the lock; never hand out a GPU we did not get (the
                    # raise rolls back what this transaction took).
                    raise RuntimeError(f"host {host!r}: GPU {gpu} was taken under our lock")
            tx.run(sql.DELETE_WAITER, {"host": host, "beam_id": beam_id})
        return tuple(chosen)

    def release_host_gpus(self, beam_id: int) -> int:
        """Give back every host GPU ``beam_id`` holds (a launch that failed before its attempt)."""
        with self.fast_tx() as tx:
            return int(tx.run(sql.RELEASE_HOST_GPUS_OF_BEAM, {"_beam": beam_id}).rowcount)
