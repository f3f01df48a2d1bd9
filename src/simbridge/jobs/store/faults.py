"""Which database errors are passing (locked, restarting, unreachable) and which mean the store is gone.

Every SQLAlchemy or driver error leaves the store as a :class:`StoreError` subclass chosen here, so
the dispatcher can wait out a passing fault without failing a beam and stop on a lost database.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable

import sqlalchemy as sa

from simbridge.jobs.errors import (
    StoreError,
    StoreLostError,
    StoreNotInitialisedError,
    StoreUnavailableError,
)
from simbridge.logs import get_logger

log = get_logger(__name__)

# SQLSTATE classes and codes of PostgreSQL errors that go away by themselves: connection
# exceptions (08), serialization failure and deadlock (40), lock not available (55P03),
# operator intervention: shutting down or starting up (57P01-57P03), too many connections (53300).
_PG_TRANSIENT_CLASSES = ("08", "40")
_PG_TRANSIENT_CODES = {"55P03", "57P01", "57P02", "57P03", "53300", "53400"}
# undefined table / database: the schema or the database itself was dropped under us.
_PG_LOST_CODES = {"42P01", "3D000"}
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "database is busy")


def _sqlstate(orig: BaseException | None) -> str | None:
    code = getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def translate(
    exc: BaseException,
    *,
    where: str,
    file_problem: Callable[[], str | None] | None = None,
) -> StoreError:
    """The :class:`StoreError` to raise ``from exc``; ``where`` names the database (no password).

    ``file_problem`` (SQLite) says why the database file is no longer the one opened, or None.
    """
    if isinstance(exc, StoreError):
        return exc
    if file_problem is not None:
        problem = file_problem()
        if problem is not None:
            return StoreLostError(f"jobs database {where}: {problem}")
    orig = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
    text = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    message = f"jobs database {where}: {text}"
    code = _sqlstate(orig)
    if code in _PG_LOST_CODES or (isinstance(orig, sqlite3.OperationalError) and "no such table" in text):
        return StoreLostError(f"{message} (the jobs tables are gone: was the database dropped or replaced?)")
    if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
        return StoreUnavailableError(message)
    if code is not None and (code[:2] in _PG_TRANSIENT_CLASSES or code in _PG_TRANSIENT_CODES):
        return StoreUnavailableError(message)
    if isinstance(orig, sqlite3.OperationalError):
        if any(marker in text for marker in _SQLITE_TRANSIENT):
            return StoreUnavailableError(message)
        return StoreError(message)
    if isinstance(exc, sa.exc.TimeoutError):  # no pooled connection came free
        return StoreUnavailableError(message)
    if isinstance(exc, sa.exc.OperationalError) or _is_operational(orig):
        # PostgreSQL unreachable (refused, reset, shut down): psycopg gives no SQLSTATE then.
        return StoreUnavailableError(message)
    return StoreError(message)


def _is_operational(orig: BaseException | None) -> bool:
    return type(orig).__name__ == "OperationalError" or any(
        cls.__name__ == "OperationalError" for cls in type(orig).__mro__
    )


def not_initialised(where: str) -> StoreNotInitialisedError:
    """The error of a read-only open that finds no jobs schema."""
    return StoreNotInitialisedError(
        f"jobs database {where} is not initialised; run `simbridge serve` (or `simbridge submit`) "
        "once to create it, or check jobs.database_url / jobs.work_root"
    )


# Backoff while the store fails (locked, restarting, unreachable): from 0.1 s, doubling, capped.
STORE_BACKOFF_MAX_S = 5.0


class StoreTrouble:
    """Whether the store is failing now; logs one line when that changes, never one per try.

    Shared by the loop and the step threads: a step that meets a passing store fault leaves its
    beam as it is (every step resumes), and the loop backs off until the store answers again.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: float | None = None
        self._last = ""
        self._tries = 0

    def failed(self, exc: StoreError) -> None:
        text = str(exc)
        with self._lock:
            self._tries += 1
            first = self._since is None
            if first:
                self._since = time.monotonic()
            # Numbers (seconds, ports, pids) change from try to try; the kind of fault does not.
            kind = re.sub(r"[0-9.]+", "#", f"{type(exc).__name__}: {text}")
            changed = first or kind != self._last
            self._last = kind
        if changed:
            log.warning("jobs.store_unavailable", error=text, backoff_max_s=STORE_BACKOFF_MAX_S)

    def ok(self) -> None:
        with self._lock:
            if self._since is None:
                return
            down_s, tries = time.monotonic() - self._since, self._tries
            self._since, self._last, self._tries = None, "", 0
        log.info("jobs.store_available", after_s=round(down_s, 1), failed_tries=tries)

    @property
    def failing(self) -> bool:
        return self._since is not None
