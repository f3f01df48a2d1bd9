"""The store's engine: SQLite (WAL, write-locking transactions) or PostgreSQL, and the driver cursor.

Kept apart from :mod:`simbridge.jobs.store.db` so that the store's queries read on their own.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

READ_ONLY = "simbridge_read_only"  # execution option: a deferred (non-locking) SQLite transaction
# How long one SQLite statement waits for another process's write lock before it fails as
# "database is locked" (a passing fault: the dispatcher backs off and tries again). Short enough
# that a serve under a held lock still notices --max-seconds and SIGTERM in good time.
BUSY_TIMEOUT_S = 5.0
# PostgreSQL ends a session of ours that sits inside a transaction this long without a word: our
# transactions last milliseconds, so only a stopped or hung process (SIGSTOP, a debugger, a
# swapped-out VM) gets there, and its row locks must not hold back the serve that takes over its
# lease (they would, forever: the takeover's UPDATE waits on the row). It finds its session gone.
IDLE_IN_TRANSACTION_S = 10.0


def default_actor(role: str) -> str:
    """``role@host:pid`` — who wrote an event."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for an in-memory database or another dialect)."""
    if not url.startswith("sqlite"):
        return None
    path = sa.engine.make_url(url).database
    return Path(path) if path and path != ":memory:" else None


def make_engine(url: str, *, create: bool = True) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and write-locking transactions.

    SQLite connections open the file read-write but never create it (``mode=rw``): a database
    deleted under a running process must fail loudly, not come back empty. ``create`` makes the
    file (and its folder) first, if missing.
    """
    path = sqlite_path(url)
    if url.startswith("sqlite"):
        kwargs: dict[str, Any] = {}
        if path is not None:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
                sqlite3.connect(path).close()
            target = f"file:{urllib.parse.quote(str(path.resolve()))}?mode=rw"
            kwargs["creator"] = lambda: sqlite3.connect(
                target, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False
            )
        # A pool of connections (shared across threads, one at a time each): opening a SQLite
        # connection and setting its pragmas costs more than most of our transactions.
        engine = sa.create_engine(
            url,
            connect_args={"timeout": BUSY_TIMEOUT_S, "check_same_thread": False},
            poolclass=sa.QueuePool,
            pool_size=8,
            max_overflow=8,
            **kwargs,
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Driver-level autocommit so that we choose how each transaction begins (below).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Writers take the write lock up front (IMMEDIATE): a deferred read-then-write
            # transaction can fail with SQLITE_BUSY at once instead of waiting. Readers stay
            # deferred so that, in WAL mode, they never wait for a writer.
            if conn.get_execution_options().get(READ_ONLY):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    # connect_timeout: an unreachable server fails a connection in seconds rather than hanging
    # a step thread; pool_timeout likewise bounds the wait for a pooled connection.
    return sa.create_engine(
        url,
        pool_pre_ping=True,
        pool_size=8,
        max_overflow=8,
        pool_timeout=30,
        connect_args={
            "connect_timeout": 10,
            "options": f"-c idle_in_transaction_session_timeout={int(IDLE_IN_TRANSACTION_S * 1000)}",
        },
    )


# The compiled-statement cache of one store: (id of the statement, sizes of its list parameters)
# -> (the statement, kept alive so its id is never reused; SQL; positional names; default values).
Compiled = dict[tuple[int, tuple[int, ...]], tuple[object, str, tuple[str, ...] | None, dict[str, Any]]]


def _padded(values: list[Any]) -> list[Any]:
    """``values`` grown to the next power of two by repeating its last element.

    A list parameter only ever fills ``IN``/``NOT IN``, where a repeat changes nothing; padding
    keeps the compiled shapes to a handful (compiling costs about a millisecond each).
    """
    size = len(values)
    if size <= 2:
        return values
    return values + [values[-1]] * ((1 << (size - 1).bit_length()) - size)


class DriverCursor:
    """A DBAPI cursor running our prebuilt SQLAlchemy statements (in a transaction or a read).

    The hot statements (every transition, launch, close and per-tick read) skip SQLAlchemy's
    per-statement machinery, which costs several times what SQLite itself does: each statement is
    compiled once for the engine's dialect (once per length of each list parameter, for ``IN``)
    and run on the driver's cursor. All SQL still comes from SQLAlchemy and ``schema.py``.
    """

    def __init__(self, cursor: Any, compiled: Compiled, dialect: Any):
        self._cursor = cursor
        self._compiled = compiled
        self._dialect = dialect

    def _sql(
        self, stmt: sa.Executable, params: dict[str, Any]
    ) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        sizes = tuple(len(v) for v in params.values() if isinstance(v, list))
        found = self._compiled.get((id(stmt), sizes))
        if found is None or found[0] is not stmt:
            found = self._compile(stmt, params, sizes)
        return found[1], found[2], found[3]

    def _compile(
        self, stmt: sa.Executable, params: dict[str, Any], sizes: tuple[int, ...]
    ) -> tuple[object, str, tuple[str, ...] | None, dict[str, Any]]:
        compiled = plain = stmt.compile(dialect=self._dialect)  # type: ignore[attr-defined]
        if sizes:
            # Expanding IN: render one placeholder per element (named NAME_1, NAME_2, ...).
            shape = {k: [None] * len(v) if isinstance(v, list) else None for k, v in params.items()}
            compiled = stmt.params(shape).compile(  # type: ignore[attr-defined]
                dialect=self._dialect, compile_kwargs={"render_postcompile": True}
            )
        positions = tuple(compiled.positiontup) if compiled.positiontup is not None else None
        # Values SQLAlchemy bound itself (e.g. SQLite's OFFSET after a LIMIT), ours left out.
        defaults = {k: v for k, v in plain.params.items() if k not in params and v is not None}
        found = self._compiled[(id(stmt), sizes)] = (stmt, compiled.string, positions, defaults)
        return found

    @staticmethod
    def _flat(params: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
        flat = dict(defaults)
        for name, value in params.items():
            if isinstance(value, list):
                flat.update({f"{name}_{i}": item for i, item in enumerate(value, 1)})
            else:
                flat[name] = value
        return flat

    def run(self, stmt: sa.Executable, params: dict[str, Any]) -> Any:
        """Execute ``stmt`` with named ``params`` (a list value fills an expanding ``IN``); the
        cursor (for rows or rowcount)."""
        if list not in map(type, params.values()):
            # The common case, kept short: it runs for every statement of every beam (a tenth
            # of the orchestrator's CPU went to the general path's generator expressions).
            found = self._compiled.get((id(stmt), ()))
            if found is None or found[0] is not stmt:
                found = self._compile(stmt, params, ())
            _, text, positions, defaults = found
            if defaults:
                params = {**defaults, **params}
            self._cursor.execute(text, params if positions is None else [params[k] for k in positions])
            return self._cursor
        params = {k: _padded(v) if isinstance(v, list) else v for k, v in params.items()}
        text, positions, defaults = self._sql(stmt, params)
        flat = self._flat(params, defaults)
        self._cursor.execute(text, flat if positions is None else [flat[k] for k in positions])
        return self._cursor

    def run_many(self, stmt: sa.Executable, rows: Sequence[dict[str, Any]]) -> None:
        """Execute ``stmt`` once per parameter set (no list parameters)."""
        text, positions, _ = self._sql(stmt, rows[0])
        if positions is not None:
            self._cursor.executemany(text, [[r[k] for k in positions] for r in rows])
        else:
            self._cursor.executemany(text, rows)
