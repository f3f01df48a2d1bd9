"""The jobs store: one SQLAlchemy engine, migrations on open, and every read and write of job state.

Each write is one short transaction; a state change and its event row commit together, guarded by
the state the caller saw (optimistic), so two processes never both move the same beam.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy.engine import Connection

from simbridge.jobs.errors import CaseRejectedError, NotFoundError, StaleStateError, StoreError
from simbridge.jobs.states import BeamState, check_transition
from simbridge.jobs.store import statements as sql
from simbridge.jobs.store.engine import READ_ONLY, DriverCursor, default_actor, make_engine
from simbridge.jobs.store.rows import (
    AttemptRow,
    BeamRow,
    CaseRow,
    EventRow,
    attempt_from_tuple,
    attempt_row,
    beam_from_tuple,
    beam_row,
)
from simbridge.jobs.store.schema import attempts, beams, cases, events
from simbridge.logs import get_logger

log = get_logger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
_PG_MIGRATE_LOCK = 0x5B1D6E  # advisory lock id: one migrator at a time on PostgreSQL


class Store:
    """Job state in SQLite or PostgreSQL. A context manager: closing disposes the engine's pool."""

    def __init__(self, *, url: str, actor: str | None = None, migrate: bool = True) -> None:
        self.url = url
        self.actor = actor or default_actor("simbridge")
        self._write_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if url.startswith("sqlite") else contextlib.nullcontext()
        )
        self._sqlite = url.startswith("sqlite")
        self._mark = "?" if self._sqlite else "%s"  # the driver's positional placeholder
        self._compiled: dict[int, tuple[object, str, tuple[str, ...] | None]] = {}
        self._writer: Any = None  # SQLite: the connection every fast_tx() writes on
        try:
            self.engine = make_engine(url)
            self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
            if migrate:
                self.migrate()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"cannot open the jobs database {self._safe_url()}: {exc}") from exc

    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release every pooled connection."""
        with self._write_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.engine.dispose()

    @contextlib.contextmanager
    def tx(self) -> Iterator[Connection]:
        """One write transaction; SQLAlchemy errors leave as :class:`StoreError`."""
        try:
            # SQLite has one writer at a time: queue our own threads on a Python lock (woken at
            # once) rather than on SQLite's busy handler, which sleeps in growing steps while
            # the holder may be waiting for the GIL.
            with self._write_lock, self.engine.begin() as conn:
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"jobs database {self._safe_url()}: {exc}") from exc

    @contextlib.contextmanager
    def fast_tx(self) -> Iterator[DriverCursor]:
        """One write transaction on the driver's cursor (see :class:`DriverCursor`); same guarantees as
        :meth:`tx`: all or nothing, committed when the block ends, errors as :class:`StoreError`.

        On SQLite every such write goes through one connection kept out of the pool (writes are
        one at a time anyway): no pool round per write, and its page cache stays valid.
        """
        try:
            with self._write_lock:
                dbapi_conn = self._writer or self.engine.raw_connection()
                keep = self._sqlite  # a connection that failed is never kept
                try:
                    cursor = dbapi_conn.cursor()
                    if self._sqlite:
                        cursor.execute("BEGIN IMMEDIATE")  # take the write lock up front, as in tx()
                    try:
                        yield DriverCursor(cursor, self._compiled, self.engine.dialect)
                    except BaseException as exc:
                        keep = keep and not isinstance(exc, self._dbapi_error)
                        dbapi_conn.rollback()
                        raise
                    dbapi_conn.commit()
                    cursor.close()
                except self._dbapi_error:
                    keep = False
                    raise
                finally:
                    if keep:
                        self._writer = dbapi_conn
                    else:
                        self._writer = None
                        dbapi_conn.close()  # back to the pool (which resets it)
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise StoreError(f"jobs database {self._safe_url()}: {exc}") from exc

    @contextlib.contextmanager
    def _fast_read(self) -> Iterator[Any]:
        """A driver cursor for the dispatcher's per-tick reads (each SELECT sees committed data)."""
        try:
            dbapi_conn = self.engine.raw_connection()
            try:
                cursor = dbapi_conn.cursor()
                try:
                    yield cursor
                finally:
                    cursor.close()
                    if not self._sqlite:
                        dbapi_conn.rollback()  # end the read transaction the driver began
            finally:
                dbapi_conn.close()
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise StoreError(f"jobs database {self._safe_url()}: {exc}") from exc

    def _marks(self, count: int) -> str:
        return ", ".join([self._mark] * count)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """One read-only transaction (never waits for writers on SQLite WAL)."""
        try:
            with (
                self.engine.connect().execution_options(**{READ_ONLY: True}) as conn,
                conn.begin(),
            ):
                yield conn
        except sa.exc.SQLAlchemyError as exc:
            raise StoreError(f"jobs database {self._safe_url()}: {exc}") from exc

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe when several processes start)."""
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    # ---- cases -------------------------------------------------------------------------------

    def add_case(
        self, *, key: str, name: str, source: str, root: str, beams_: Sequence[tuple[str, str, str]]
    ) -> int:
        """Insert a case and its beams (key, name, path) as PENDING, with one event each."""
        now = time.time()
        with self.tx() as conn:
            if conn.execute(sa.select(cases.c.id).where(cases.c.key == key)).first():
                raise CaseRejectedError(
                    f"case {key!r} was already taken; rename the folder, or use "
                    f"`simbridge retry {key}` to rerun it"
                )
            case_id = conn.execute(
                sa.insert(cases)
                .returning(cases.c.id)
                .values(key=key, name=name, source=source, root=root, created_at=now)
            ).scalar_one()
            conn.execute(
                sa.insert(events).values(
                    at=now, case_id=case_id, reason=f"case taken from {source}", actor=self.actor
                )
            )
            for bkey, bname, path in beams_:
                beam_id = conn.execute(
                    sa.insert(beams)
                    .returning(beams.c.id)
                    .values(
                        case_id=case_id,
                        key=bkey,
                        name=bname,
                        path=path,
                        state=BeamState.PENDING.value,
                        step_tries=0,
                        created_at=now,
                        updated_at=now,
                    )
                ).scalar_one()
                conn.execute(
                    sa.insert(events).values(
                        at=now,
                        case_id=case_id,
                        beam_id=beam_id,
                        to_state=BeamState.PENDING.value,
                        reason="beam found in case",
                        actor=self.actor,
                    )
                )
        return int(case_id)

    def case(self, ref: str | int) -> CaseRow:
        """A case by id or key; :class:`NotFoundError` says how to list them."""
        where = cases.c.id == ref if isinstance(ref, int) else cases.c.key == ref
        with self.read() as conn:
            row = conn.execute(sa.select(cases).where(where)).first()
        if row is None:
            raise NotFoundError(f"no case {ref!r}; `simbridge status` lists the cases")
        return CaseRow(**row._mapping)

    def has_case(self, key: str) -> bool:
        """Whether a case with this key was ever taken."""
        with self.read() as conn:
            return conn.execute(sa.select(cases.c.id).where(cases.c.key == key)).first() is not None

    def cases(self) -> list[CaseRow]:
        """Every case, oldest first."""
        with self.read() as conn:
            rows = conn.execute(sa.select(cases).order_by(cases.c.id)).all()
        return [CaseRow(**r._mapping) for r in rows]

    # ---- beams -------------------------------------------------------------------------------

    def beam(self, beam_id: int) -> BeamRow:
        """One beam by id."""
        with self.read() as conn:
            row = conn.execute(sql.BEAM_BY_ID, {"_id": beam_id}).first()
        if row is None:
            raise NotFoundError(f"no beam with id {beam_id}")
        return beam_row(row)

    def beams(
        self,
        *,
        case_id: int | None = None,
        states: Iterable[BeamState] | None = None,
        ids: Iterable[int] | None = None,
    ) -> list[BeamRow]:
        """Beams, optionally of one case, in some states, or with given ids; in id order."""
        if ids is not None and case_id is None and states is None:
            wanted = list(ids)
            if not wanted:
                return []
            marks = self._marks(len(wanted))
            query = f"SELECT {sql.BEAM_COLUMNS_SQL} FROM beams WHERE id IN ({marks}) ORDER BY id"
            with self._fast_read() as cursor:
                return [beam_from_tuple(r) for r in cursor.execute(query, wanted).fetchall()]
        q = sa.select(beams).order_by(beams.c.id)
        if ids is not None:
            q = q.where(beams.c.id.in_(list(ids)))
        if case_id is not None:
            q = q.where(beams.c.case_id == case_id)
        if states is not None:
            q = q.where(beams.c.state.in_([s.value for s in states]))
        with self.read() as conn:
            return [beam_row(r) for r in conn.execute(q).all()]

    def ready_ids(
        self, states: Iterable[BeamState], *, now: float, limit: int, skip: Iterable[int] = ()
    ) -> list[tuple[int, BeamState]]:
        """(id, state) of beams in ``states`` whose backoff has passed, oldest first, minus ``skip``."""
        wanted = [s.value for s in states]
        skipped = list(skip)
        query = (
            f"SELECT id, state FROM beams WHERE state IN ({self._marks(len(wanted))})"
            f" AND (not_before IS NULL OR not_before <= {self._mark})"
            + (f" AND id NOT IN ({self._marks(len(skipped))})" if skipped else "")
            + f" ORDER BY id LIMIT {self._mark}"
        )
        with self._fast_read() as cursor:
            rows = cursor.execute(query, [*wanted, now, *skipped, limit]).fetchall()
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
        columns, params = sql.beam_values(values)
        with self.fast_tx() as tx:
            done = tx.run(
                sql.update_beam(columns, guarded=True),
                {"_id": beam_id, "_expected": expected.value, **params},
            ).fetchall()
            if not done:
                raise StaleStateError(f"beam {beam_id} is no longer {expected}; nothing changed")
            if close is not None:
                ended = tx.run(
                    sql.CLOSE_ATTEMPT,
                    {"_id": close[0], "v_ended_at": now, "v_outcome": close[1], "v_exit_code": close[2]},
                )
                if not ended.rowcount:
                    # Someone else already judged this attempt: raising rolls the move back.
                    raise StaleStateError(f"attempt {close[0]} was already closed")
            tx.run(
                sql.INSERT_EVENT,
                {
                    "at": now,
                    "case_id": done[0][0],
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
        columns, params = sql.beam_values(values)
        with self.fast_tx() as tx:
            done = tx.run(
                sql.update_beam(columns, guarded=True),
                {"_id": beam_id, "_expected": first.value, **params},
            ).fetchall()
            if not done:
                raise StaleStateError(f"beam {beam_id} is no longer {first}; nothing changed")
            tx.run_many(
                sql.INSERT_EVENT,
                [
                    {
                        "at": now,
                        "case_id": done[0][0],
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
        with self.tx() as conn:
            res = conn.execute(
                sa.update(beams)
                .where(beams.c.id == beam_id, beams.c.state == expected.value)
                .values(updated_at=time.time(), **fields)
            )
            return bool(res.rowcount)

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
        with self.tx() as conn:
            conn.execute(
                sa.update(beams)
                .where(beams.c.id == beam_id, beams.c.step_tries > 0)
                .values(step_tries=beams.c.step_tries - 1)
            )

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
            return bool(res.rowcount)

    def open_attempts(self, *, beam_id: int | None = None) -> list[AttemptRow]:
        """Attempts launched (or about to be) that have not ended."""
        if beam_id is not None:
            q = sql.OPEN_ATTEMPTS.where(attempts.c.beam_id == beam_id)
            with self.read() as conn:
                return [attempt_row(r) for r in conn.execute(q).all()]
        query = f"SELECT {sql.ATTEMPT_COLUMNS_SQL} FROM attempts WHERE ended_at IS NULL ORDER BY id"
        with self._fast_read() as cursor:
            return [attempt_from_tuple(r) for r in cursor.execute(query).fetchall()]

    def attempts(self, beam_id: int) -> list[AttemptRow]:
        """Every attempt of a beam, first first."""
        q = sa.select(attempts).where(attempts.c.beam_id == beam_id).order_by(attempts.c.id)
        with self.read() as conn:
            return [attempt_row(r) for r in conn.execute(q).all()]

    def count_active(self) -> int:
        """How many beams are not in a terminal state."""
        terminal = [s.value for s in BeamState if s.terminal]
        q = sa.select(sa.func.count()).select_from(beams).where(beams.c.state.not_in(terminal))
        with self.read() as conn:
            return int(conn.execute(q).scalar_one())

    def count_attempts(self, *, step: BeamState | None = None) -> int:
        """How many attempts were ever opened (of one step, if given)."""
        q = sa.select(sa.func.count()).select_from(attempts)
        if step is not None:
            q = q.where(attempts.c.step == step.value)
        with self.read() as conn:
            return int(conn.execute(q).scalar_one())

    # ---- events ------------------------------------------------------------------------------

    def add_event(self, *, reason: str, case_id: int | None = None, beam_id: int | None = None) -> None:
        """Append a note that is not a transition (a rejected case, a kill sent)."""
        with self.tx() as conn:
            conn.execute(
                sa.insert(events).values(
                    at=time.time(),
                    case_id=case_id,
                    beam_id=beam_id,
                    reason=reason[:4000],
                    actor=self.actor,
                )
            )

    def events(self, *, beam_id: int | None = None, case_id: int | None = None) -> list[EventRow]:
        """The history, oldest first, optionally of one beam or case."""
        q = sa.select(events).order_by(events.c.id)
        if beam_id is not None:
            q = q.where(events.c.beam_id == beam_id)
        if case_id is not None:
            q = q.where(events.c.case_id == case_id)
        with self.read() as conn:
            return [EventRow(**r._mapping) for r in conn.execute(q).all()]
