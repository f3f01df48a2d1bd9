"""The jobs store: every read and write of job state (connections and transactions: base.py).

Each write is one short transaction; a state change and its event row commit together, guarded by
the state the caller saw (optimistic), so two processes never both move the same beam.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

from simbridge.jobs.errors import CaseRejectedError, NotFoundError, StaleStateError
from simbridge.jobs.states import BeamState, check_transition
from simbridge.jobs.store import statements as sql
from simbridge.jobs.store.engine import DriverCursor
from simbridge.jobs.store.hostgpus import HostGpuStore
from simbridge.jobs.store.rows import (
    AttemptRow,
    BeamRow,
    CaseRow,
    EventRow,
    attempt_from_tuple,
    beam_from_tuple,
)
from simbridge.logs import get_logger

log = get_logger(__name__)


class Store(HostGpuStore):
    """Job state in SQLite or PostgreSQL. A context manager: closing disposes the engine's pool."""

    def __enter__(self) -> Store:
        return self

    # ---- cases -------------------------------------------------------------------------------

    def add_case(
        self, *, key: str, name: str, source: str, root: str, beams_: Sequence[tuple[str, str, str]]
    ) -> int:
        """Insert a case and its beams (key, name, path) as PENDING, with one event each."""
        now = time.time()
        event = {"at": now, "beam_id": None, "from_state": None, "to_state": None, "actor": self.actor}
        with self.fast_tx() as tx:
            if tx.run(sql.CASE_ID_BY_KEY, {"key": key}).fetchone() is not None:
                raise CaseRejectedError(
                    f"case {key!r} was already taken; rename the folder, or use "
                    f"`simbridge retry {key}` to rerun it"
                )
            values = {"key": key, "name": name, "source": source, "root": root, "created_at": now}
            case_id = tx.run(sql.INSERT_CASE, values).fetchall()[0][0]
            tx.run(sql.INSERT_EVENT, {**event, "case_id": case_id, "reason": f"case taken from {source}"})
            for bkey, bname, path in beams_:
                beam = {"case_id": case_id, "key": bkey, "name": bname, "path": path}
                pending = {"state": BeamState.PENDING.value, "step_tries": 0}
                beam_id = tx.run(
                    sql.INSERT_BEAM, {**beam, **pending, "created_at": now, "updated_at": now}
                ).fetchall()[0][0]
                tx.run(
                    sql.INSERT_EVENT,
                    {
                        **event,
                        "case_id": case_id,
                        "beam_id": beam_id,
                        "to_state": BeamState.PENDING.value,
                        "reason": "beam found in case",
                    },
                )
        return int(case_id)

    def case(self, ref: str | int) -> CaseRow:
        """A case by id or key; :class:`NotFoundError` says how to list them."""
        query, params = (
            (sql.CASE_BY_ID, {"_id": ref}) if isinstance(ref, int) else (sql.CASE_BY_KEY, {"key": ref})
        )
        with self._fast_read() as cursor:
            row = cursor.run(query, params).fetchone()
        if row is None:
            raise NotFoundError(f"no case {ref!r}; `simbridge status` lists the cases")
        return CaseRow(*row)

    def has_case(self, key: str) -> bool:
        """Whether a case with this key was ever taken."""
        with self._fast_read() as cursor:
            return cursor.run(sql.CASE_ID_BY_KEY, {"key": key}).fetchone() is not None

    def cases(self) -> list[CaseRow]:
        """Every case, oldest first."""
        with self._fast_read() as cursor:
            return [CaseRow(*r) for r in cursor.run(sql.ALL_CASES, {}).fetchall()]

    # ---- beams -------------------------------------------------------------------------------

    def beam(self, beam_id: int) -> BeamRow:
        """One beam by id."""
        with self._fast_read() as cursor:
            row = cursor.run(sql.BEAM_BY_ID, {"_id": beam_id}).fetchone()
        if row is None:
            raise NotFoundError(f"no beam with id {beam_id}")
        return beam_from_tuple(row)

    def beams(
        self,
        *,
        case_id: int | None = None,
        states: Iterable[BeamState] | None = None,
        ids: Iterable[int] | None = None,
    ) -> list[BeamRow]:
        """Beams, optionally of one case, in some states, or with given ids; in id order."""
        wanted = None if ids is None else list(ids)
        if wanted is not None and not wanted:
            return []
        with self._fast_read() as cursor:
            if wanted is not None:
                rows = cursor.run(sql.BEAMS_BY_IDS, {"ids": wanted}).fetchall()
            elif states is not None:
                chosen = [s.value for s in states]
                rows = cursor.run(sql.BEAMS_OF_IN, {"case_id": case_id, "states": chosen}).fetchall()
            else:
                rows = cursor.run(sql.BEAMS_OF, {"case_id": case_id}).fetchall()
        found = [beam_from_tuple(r) for r in rows]
        if wanted is not None and (case_id is not None or states is not None):
            # Rare (no caller today): the id list decides the query, the rest filters here.
            keep = None if states is None else set(states)
            found = [
                b
                for b in found
                if (case_id is None or b.case_id == case_id) and (keep is None or b.state in keep)
            ]
        return found

    def ready_ids(
        self, states: Iterable[BeamState], *, now: float, limit: int, skip: Iterable[int] = ()
    ) -> list[tuple[int, BeamState]]:
        """(id, state) of beams in ``states`` whose backoff has passed, oldest first, minus ``skip``."""
        params = {"states": [s.value for s in states], "now": now, "skip": list(skip), "limit": limit}
        with self._fast_read() as cursor:
            rows = cursor.run(sql.READY_IDS, params).fetchall()
        return [(int(r[0]), BeamState(r[1])) for r in rows]

    def transition(
        self,
        beam_id: int,
        expected: BeamState,
        target: BeamState,
        *,
        reason: str,
        actor: str | None = None,
        close: tuple[int, str, int | None] | None = None,
        **fields: Any,
    ) -> None:
        """Move a beam ``expected -> target`` with an event, or raise (illegal or stale).

        ``close=(attempt_id, outcome, exit_code)`` ends that attempt in the same transaction, so
        a crash can never leave an ended attempt with its beam not yet moved on (or vice versa).
        """
        check_transition(expected, target)
        now = time.time()
        values: dict[str, Any] = {"state": target.value, "updated_at": now, **fields}
        if target is not expected:
            values.setdefault("step_tries", 0)
        if target.terminal:
            values.setdefault("finished_at", now)
        with self.fast_tx() as tx:
            case_id = _update_if_in(tx, beam_id, expected, values)
            if case_id is None:
                raise StaleStateError(f"beam {beam_id} is no longer {expected}; nothing changed")
            if close is not None:
                ended = tx.run(
                    sql.CLOSE_ATTEMPT,
                    {"_id": close[0], "v_ended_at": now, "v_outcome": close[1], "v_exit_code": close[2]},
                )
                if not ended.rowcount:
                    # Someone else already judged this attempt: raising rolls the move back.
                    raise StaleStateError(f"attempt {close[0]} was already closed")
                tx.run(sql.RELEASE_HOST_GPUS_OF_ATTEMPT, {"_id": close[0]})
            tx.run(
                sql.INSERT_EVENT,
                {
                    "at": now,
                    "case_id": case_id,
                    "beam_id": beam_id,
                    "from_state": expected.value,
                    "to_state": target.value,
                    "reason": reason[:4000],
                    "actor": actor or self.actor,
                },
            )

    def path(self, beam_id: int, hops: Sequence[tuple[BeamState, BeamState, str]]) -> None:
        """Several legal moves in a row, in one transaction: one guarded update, one event each.

        For steps that ran back to back in process (each idempotent, so a crash before this
        commit only repeats them); raises like :meth:`transition`.
        """
        for (here, there, _), nxt in zip(hops, [*hops[1:], None], strict=True):
            check_transition(here, there)
            if nxt is not None and nxt[0] is not there:
                raise ValueError(f"hops do not chain: {there} then {nxt[0]}")
        first, last = hops[0][0], hops[-1][1]
        now = time.time()
        values: dict[str, Any] = {"state": last.value, "updated_at": now, "step_tries": 0}
        if last.terminal:
            values["finished_at"] = now
        with self.fast_tx() as tx:
            case_id = _update_if_in(tx, beam_id, first, values)
            if case_id is None:
                raise StaleStateError(f"beam {beam_id} is no longer {first}; nothing changed")
            tx.run_many(
                sql.INSERT_EVENT,
                [
                    {
                        "at": now,
                        "case_id": case_id,
                        "beam_id": beam_id,
                        "from_state": here.value,
                        "to_state": there.value,
                        "reason": reason[:4000],
                        "actor": self.actor,
                    }
                    for here, there, reason in hops
                ],
            )

    def update_beam(self, beam_id: int, expected: BeamState, **fields: Any) -> bool:
        """Set fields on a beam still in ``expected``; False if it moved meanwhile."""
        with self.fast_tx() as tx:
            return _update_if_in(tx, beam_id, expected, {"updated_at": time.time(), **fields}) is not None

    # ---- attempts ----------------------------------------------------------------------------

    def open_attempt(
        self,
        beam_id: int,
        *,
        expected: BeamState,
        target: BeamState,
        token: str,
        executor: str,
        work_dir: str,
        deadline: float,
        gpu_id: str | None = None,
    ) -> AttemptRow:
        """Write the intent to launch (before launching), moving ``expected -> target`` with it.

        Raises :class:`StaleStateError` if the beam is no longer in ``expected``.
        """
        if target is not expected:
            check_transition(expected, target)
        now = time.time()
        with self.fast_tx() as tx:
            found = tx.run(sql.LAUNCH_CHECK, {"_id": beam_id, "_expected": expected.value}).fetchall()
            if not found:
                raise StaleStateError(f"beam {beam_id} is no longer {expected}; not launching")
            case_id, step_tries = found[0]
            still_open = tx.run(sql.OPEN_OF_BEAM, {"_id": beam_id}).fetchone()
            if still_open is not None:
                # At most one live attempt per beam, whoever asks: never launch twice.
                raise StaleStateError(f"beam {beam_id} has attempt {still_open[0]} still open")
            number = tx.run(sql.COUNT_OF_BEAM, {"_id": beam_id}).fetchone()[0]
            attempt_id = tx.run(
                sql.INSERT_ATTEMPT,
                {
                    "beam_id": beam_id,
                    "step": target.value,
                    "number": number + 1,
                    "token": token,
                    "executor": executor,
                    "work_dir": work_dir,
                    "gpu_id": gpu_id,
                    "deadline": deadline,
                    "started_at": now,
                },
            ).fetchall()[0][0]
            values: dict[str, Any] = {
                "step_tries": step_tries + 1,
                "updated_at": now,
                "not_before": None,
                "state": target.value,
            }
            if gpu_id is not None:
                values.update(gpu_id=gpu_id, started_at=now)
            columns, params = sql.beam_values(values)
            tx.run(sql.update_beam(columns, guarded=False), {"_id": beam_id, **params}).fetchall()
            if target is not expected:
                tx.run(
                    sql.INSERT_EVENT,
                    {
                        "at": now,
                        "case_id": case_id,
                        "beam_id": beam_id,
                        "from_state": expected.value,
                        "to_state": target.value,
                        "reason": f"launching attempt {number + 1}" + (f" on GPU {gpu_id}" if gpu_id else ""),
                        "actor": self.actor,
                    },
                )
        return AttemptRow(
            id=int(attempt_id),
            beam_id=beam_id,
            step=target,
            number=number + 1,
            token=token,
            executor=executor,
            work_dir=work_dir,
            gpu_id=gpu_id,
            job_id=None,
            pid=None,
            pid_start=None,
            deadline=deadline,
            started_at=now,
            ended_at=None,
            exit_code=None,
            outcome=None,
        )

    def forget_try(self, beam_id: int) -> None:
        """Give back the try counted for an attempt that never started (killed before launch)."""
        with self.fast_tx() as tx:
            tx.run(sql.FORGET_TRY, {"_id": beam_id})

    def record_launch(
        self,
        attempt_id: int,
        *,
        beam_id: int,
        job_id: str,
        pid: int | None,
        pid_start: int | None,
        simulation: bool = True,
    ) -> None:
        """Note how to find a launched attempt again (its job id / pid and pid start time).

        A simulation's job id is also the beam's ``hpc_job_id`` (what people look up).
        """
        with self.fast_tx() as tx:
            tx.run(
                sql.RECORD_LAUNCH,
                {"_id": attempt_id, "v_job_id": job_id, "v_pid": pid, "v_pid_start": pid_start},
            )
            if simulation:
                tx.run(sql.SET_JOB_ID, {"_id": beam_id, "v_job_id": job_id})

    def record_scheduler(self, attempt_id: int, *, state: str, reason: str) -> None:
        """Note what the scheduler says of an attempt (state and reason), for status and the dashboard."""
        with self.fast_tx() as tx:
            tx.run(sql.RECORD_SCHEDULER, {"_id": attempt_id, "v_state": state[:32], "v_reason": reason[:500]})

    def close_attempt(self, attempt_id: int, *, outcome: str, exit_code: int | None) -> bool:
        """Mark an attempt ended (once; False if it was already closed)."""
        with self.fast_tx() as tx:
            res = tx.run(
                sql.CLOSE_ATTEMPT,
                {
                    "_id": attempt_id,
                    "v_ended_at": time.time(),
                    "v_outcome": outcome,
                    "v_exit_code": exit_code,
                },
            )
            if not res.rowcount:
                return False
            tx.run(sql.RELEASE_HOST_GPUS_OF_ATTEMPT, {"_id": attempt_id})
            return True

    def open_attempts(self, *, beam_id: int | None = None) -> list[AttemptRow]:
        """Attempts launched (or about to be) that have not ended."""
        with self._fast_read() as cursor:
            if beam_id is not None:
                rows = cursor.run(sql.OPEN_ATTEMPTS_OF, {"_id": beam_id}).fetchall()
            else:
                rows = cursor.run(sql.OPEN_ATTEMPTS, {}).fetchall()
        return [attempt_from_tuple(r) for r in rows]

    def attempts(self, beam_id: int) -> list[AttemptRow]:
        """Every attempt of a beam, first first."""
        with self._fast_read() as cursor:
            return [attempt_from_tuple(r) for r in cursor.run(sql.ATTEMPTS_OF, {"_id": beam_id}).fetchall()]

    def count_active(self) -> int:
        """How many beams are not in a terminal state."""
        terminal = [s.value for s in BeamState if s.terminal]
        with self._fast_read() as cursor:
            return int(cursor.run(sql.COUNT_NOT_IN, {"states": terminal}).fetchone()[0])

    def count_attempts(self, *, step: BeamState | None = None) -> int:
        """How many attempts were ever opened (of one step, if given)."""
        with self._fast_read() as cursor:
            if step is None:
                return int(cursor.run(sql.COUNT_ATTEMPTS, {}).fetchone()[0])
            return int(cursor.run(sql.COUNT_ATTEMPTS_OF, {"step": step.value}).fetchone()[0])

    def launches(self, *, step: BeamState, state: BeamState, case_id: int | None = None) -> dict[int, int]:
        """Beam id -> how often ``step`` was launched, for the beams now in ``state`` (of one case)."""
        params = {"case_id": case_id, "state": state.value, "step": step.value}
        with self._fast_read() as cursor:
            return {int(b): int(n) for b, n in cursor.run(sql.LAUNCHES_PER_BEAM, params).fetchall()}

    # ---- events ------------------------------------------------------------------------------

    def add_event(self, *, reason: str, case_id: int | None = None, beam_id: int | None = None) -> None:
        """Append a note that is not a transition (a rejected case, a kill sent)."""
        with self.fast_tx() as tx:
            tx.run(
                sql.INSERT_EVENT,
                {
                    "at": time.time(),
                    "case_id": case_id,
                    "beam_id": beam_id,
                    "from_state": None,
                    "to_state": None,
                    "reason": reason[:4000],
                    "actor": self.actor,
                },
            )

    def events(self, *, beam_id: int | None = None, case_id: int | None = None) -> list[EventRow]:
        """The history, oldest first, optionally of one beam or case."""
        with self._fast_read() as cursor:
            rows = cursor.run(sql.EVENTS_OF, {"beam_id": beam_id, "case_id": case_id}).fetchall()
        return [EventRow(*r) for r in rows]

    def case_notes(self, prefix: str) -> dict[int, list[str]]:
        """Case-level events whose reason starts with ``prefix`` (what intake left out), by case id."""
        out: dict[int, list[str]] = {}
        with self._fast_read() as cursor:
            for case_id, reason in cursor.run(sql.CASE_LEVEL_EVENTS, {}).fetchall():
                if case_id is not None and str(reason).startswith(prefix):
                    out.setdefault(int(case_id), []).append(str(reason))
        return out


def _update_if_in(tx: DriverCursor, beam_id: int, expected: BeamState, values: dict[str, Any]) -> int | None:
    """Set ``values`` on the beam if it is still in ``expected``: its case id, or None if it moved."""
    columns, params = sql.beam_values(values)
    done = tx.run(
        sql.update_beam(columns, guarded=True), {"_id": beam_id, "_expected": expected.value, **params}
    ).fetchall()
    return int(done[0][0]) if done else None
