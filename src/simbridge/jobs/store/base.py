"""The jobs store's connection side: opening (migrating or only checking the schema), transactions,
the orchestrator fence on every write, and the translation of database errors at this boundary.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import sqlalchemy as sa
from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

from simbridge.jobs.errors import LeaseLostError, StoreError, StoreLostError, StoreUnavailableError
from simbridge.jobs.store import statements as sql
from simbridge.jobs.store.engine import (
    READ_ONLY,
    Compiled,
    DriverCursor,
    default_actor,
    make_engine,
    sqlite_path,
)
from simbridge.jobs.store.faults import not_initialised, translate

MIGRATIONS = Path(__file__).with_name("migrations")
FILE_CHECK_S = 0.2  # how often transactions look whether the SQLite file is still ours
_PG_MIGRATE_LOCK = 0x5B1D6E  # advisory lock id: one migrator at a time on PostgreSQL


class Fence(Protocol):
    """What a fenced store checks before each write: whose lease it writes under, and whether the
    lease was renewed recently enough that no one else can have taken it over."""

    token: str

    def fresh(self) -> bool: ...

    def valid_until(self) -> float: ...

    def stale_reason(self) -> str: ...

    def lost_reason(self) -> str | None: ...


def alembic_config() -> AlembicConfig:
    """The Alembic configuration of the jobs migrations (run on a connection we hand in)."""
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str:
    """The newest migration's revision id."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


class StoreBase:
    """Engine, transactions and error translation; :class:`~simbridge.jobs.store.Store` adds queries.

    ``migrate=True`` (serve, submit) creates the database if needed and brings it to the newest
    schema, taking the write lock only when there is something to change. ``migrate=False`` (status,
    retry, cancel) never creates or changes the schema: no database, or none of
    ours, is :class:`~simbridge.jobs.errors.StoreNotInitialisedError`.
    """

    def __init__(self, *, url: str, actor: str | None = None, migrate: bool = True) -> None:
        self.url = url
        self.actor = actor or default_actor("simbridge")
        self._sqlite = url.startswith("sqlite")
        self._path = sqlite_path(url)
        self._write_lock: contextlib.AbstractContextManager[object] = (
            threading.Lock() if self._sqlite else contextlib.nullcontext()
        )
        self._compiled: Compiled = {}
        self._writer: Any = None  # SQLite: the connection every fast_tx() writes on
        self._fence: Fence | None = None
        self._file_id: tuple[int, int] | None = None
        self._file_checked = -math.inf  # monotonic time of the last look at the file
        self._lost: str | None = None  # why the file is no longer ours, once seen
        where = self._safe_url()
        if not migrate and self._path is not None and not self._path.exists():
            raise not_initialised(where)
        try:
            self.engine = make_engine(url, create=migrate)
            self._dbapi_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
            self._remember_file()
            if migrate:
                self.migrate()
            else:
                self.check_schema()
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            with contextlib.suppress(Exception):
                self.engine.dispose()
            raise translate(exc, where=f"{where} (opening)") from exc
        except BaseException:
            with contextlib.suppress(Exception):
                self.engine.dispose()
            raise

    def _safe_url(self) -> str:
        return sa.engine.make_url(self.url).render_as_string(hide_password=True)

    @property
    def where(self) -> str:
        """The database URL without its password, for messages."""
        return self._safe_url()

    def __enter__(self) -> StoreBase:
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
                with contextlib.suppress(Exception):  # a connection to a vanished file
                    self._writer.close()
                self._writer = None
        self.engine.dispose()

    # ---- the database file and the fence -----------------------------------------------------

    def _remember_file(self) -> None:
        if self._path is not None:
            st = os.stat(self._path)
            self._file_id = (st.st_dev, st.st_ino)

    def _file_problem(self) -> str | None:
        """Why the SQLite file is no longer the one we opened (deleted, replaced), or None."""
        if self._path is None or self._file_id is None:
            return None
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return f"the database file {self._path} was deleted while this process had it open"
        except OSError as exc:
            return f"the database file {self._path} cannot be checked: {exc.strerror}"
        if (st.st_dev, st.st_ino) != self._file_id:
            return f"the database file {self._path} was replaced while this process had it open"
        return None

    def check(self, *, every: float = 0.0) -> None:
        """Raise :class:`~simbridge.jobs.errors.StoreLostError` if the database file is gone or replaced.

        ``every``: look at the file at most this often (seconds), else only repeat a known loss.
        """
        now = time.monotonic()
        if self._lost is None and now - self._file_checked < every:
            return
        self._file_checked = now
        problem = self._lost or self._file_problem()
        if problem is not None:
            self._lost = problem  # once lost, always lost: no later write may reach the old file
            raise StoreLostError(f"jobs database {self.where}: {problem}")

    def fence(self, fence: Fence | None) -> None:
        """From now on every write first checks that ``fence`` still holds the orchestrator lease."""
        self._fence = fence

    def check_lease(self) -> float | None:
        """Prove, right before acting, that this serve still holds the orchestrator lease.

        :class:`LeaseLostError` if the lease row names someone else, :class:`StoreUnavailableError`
        if it was not renewed lately (it may be taken over any moment). Passing it, the lease stays
        ours for at least half its TTL more (fresh means renewed within half of it, and a holder
        is replaced only once its heartbeat is a whole TTL old): a serve paused between writing a
        launch intent and launching, replaced meanwhile (the intent judged "never started" and
        relaunched), is stopped here instead of running the step twice. A plain read, not a locked
        one: a row lock would cost a commit (an fsync on PostgreSQL) on every launch, and the
        freshness rule, not the lock, is what keeps a successor out. Unfenced stores (no serve)
        have nothing to prove.

        Returns the epoch time until which the lease stays ours by that rule (None: unfenced),
        for the launch wrapper to check right before it starts the command: a pause after this
        check (before the fork, or of the wrapper itself) then cannot start a step twice.
        """
        fence = self._fence
        if fence is None:
            return None
        self._check_fresh()
        with self._fast_read() as cursor:
            self._check_fence(lambda _locked: cursor.run(sql.FENCE, {}).fetchone())
        self._check_fresh()  # the read itself may have waited: still fresh after it?
        return fence.valid_until()

    def _check_fresh(self) -> None:
        # Before any lock is taken: a lease not renewed lately may be taken over any moment, so
        # write nothing until it is renewed (a passing fault: the heartbeat keeps trying).
        fence = self._fence
        if fence is not None and not fence.fresh():
            if fence.lost_reason() is not None:
                raise LeaseLostError(fence.stale_reason())
            raise StoreUnavailableError(f"jobs database {self.where}: {fence.stale_reason()}")

    def _check_fence(self, fetch: Callable[[sa.Select[Any]], Any]) -> None:
        fence = self._fence
        if fence is None:
            return
        row = fetch(sql.FENCE_LOCKED)
        if row is None or row[0] != fence.token:
            now = "nobody" if row is None or row[0] is None else f"{row[1]} pid {row[2]}"
            raise LeaseLostError(
                f"this serve no longer holds the orchestrator lease of {self.where} (now held by "
                f"{now}); it stopped without writing"
            )

    def _error(self, exc: BaseException, *, where: str | None = None) -> StoreError:
        return translate(exc, where=where or self.where, file_problem=self._file_problem)

    # ---- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def tx(self, *, fenced: bool = True) -> Iterator[Connection]:
        """One write transaction; database errors leave as :class:`StoreError` subclasses."""
        if fenced:
            self._check_fresh()
        try:
            # SQLite has one writer at a time: queue our own threads on a Python lock (woken at
            # once) rather than on SQLite's busy handler, which sleeps in growing steps while
            # the holder may be waiting for the GIL.
            with self._write_lock, self.engine.begin() as conn:
                self._check_file_in_tx()
                if fenced:
                    self._check_fence(lambda q: conn.execute(q).first())
                yield conn
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._error(exc) from exc

    def _check_file_in_tx(self) -> None:
        # A write to a deleted file is a write into the void; but a stat() per transaction
        # hands the GIL to the step threads each time, which the hot path cannot afford. So
        # at most every FILE_CHECK_S: a write after the file vanished is refused within that
        # long, and once the loss is known every later one at once.
        if self._path is not None:
            self.check(every=FILE_CHECK_S)

    @contextlib.contextmanager
    def fast_tx(self) -> Iterator[DriverCursor]:
        """One write transaction on the driver's cursor (see :class:`DriverCursor`); same guarantees as
        :meth:`tx`: all or nothing, committed when the block ends, fenced, errors as :class:`StoreError`.

        On SQLite every such write goes through one connection kept out of the pool (writes are
        one at a time anyway): no pool round per write, and its page cache stays valid.
        """
        self._check_fresh()
        try:
            with self._write_lock:
                dbapi_conn = self._writer or self.engine.raw_connection()
                keep = self._sqlite  # a connection that failed is never kept
                try:
                    cursor = dbapi_conn.cursor()
                    if self._sqlite:
                        cursor.execute("BEGIN IMMEDIATE")  # take the write lock up front, as in tx()
                    try:
                        self._check_file_in_tx()
                        driver = DriverCursor(cursor, self._compiled, self.engine.dialect)
                        self._check_fence(lambda q: driver.run(q, {}).fetchone())
                        yield driver
                    except BaseException as exc:
                        keep = keep and not isinstance(exc, (self._dbapi_error, StoreError))
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
                        with contextlib.suppress(Exception):
                            dbapi_conn.close()  # back to the pool (which resets it)
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._error(exc) from exc

    @contextlib.contextmanager
    def _fast_read(self) -> Iterator[DriverCursor]:
        """A driver cursor for the store's reads (each SELECT sees committed data)."""
        self._check_file_in_tx()  # a pooled connection would read a deleted file on
        try:
            dbapi_conn = self.engine.raw_connection()
            try:
                cursor = dbapi_conn.cursor()
                try:
                    yield DriverCursor(cursor, self._compiled, self.engine.dialect)
                finally:
                    cursor.close()
                    if not self._sqlite:
                        dbapi_conn.rollback()  # end the read transaction the driver began
            finally:
                dbapi_conn.close()
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._error(exc) from exc

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """One read-only transaction (never waits for writers on SQLite WAL)."""
        try:
            with (
                self.engine.connect().execution_options(**{READ_ONLY: True}) as conn,
                conn.begin(),
            ):
                self._check_file_in_tx()  # a pooled connection would read the deleted file on
                yield conn
        except (sa.exc.SQLAlchemyError, self._dbapi_error) as exc:
            raise self._error(exc) from exc

    # ---- schema ------------------------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema revision stored in the database (None: no jobs schema there)."""
        with self.engine.connect().execution_options(**{READ_ONLY: True}) as conn, conn.begin():
            return MigrationContext.configure(conn).get_current_revision()

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe when several processes start).

        A database already at the head is only read: opening never needs the write lock then.
        """
        head = head_revision()
        if self.revision() == head:
            return
        cfg = alembic_config()
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def check_schema(self) -> None:
        """Raise unless the database holds the newest jobs schema (opening without migrating)."""
        found, head = self.revision(), head_revision()
        if found is None:
            raise not_initialised(self.where)
        if found != head:
            raise StoreError(
                f"jobs database {self.where} has schema revision {found} but this simbridge needs "
                f"{head}; run `simbridge serve` once to upgrade it (or use the matching simbridge)"
            )
