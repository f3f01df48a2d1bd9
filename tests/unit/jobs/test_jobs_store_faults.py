"""The store's error boundary: every database error leaves as a StoreError subclass that says whether
it passes (locked, unreachable), means the database is gone, or was never initialised."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa

from simbridge.errors import SimbridgeError
from simbridge.jobs.errors import (
    StoreError,
    StoreLostError,
    StoreNotInitialisedError,
    StoreUnavailableError,
)
from simbridge.jobs.store import Store
from simbridge.jobs.store.faults import translate


def _wrapped(orig: Exception) -> sa.exc.DBAPIError:
    return sa.exc.DBAPIError.instance("SELECT 1", {}, orig, type(orig).__mro__[-2])


def test_a_locked_sqlite_database_is_a_passing_fault(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        other = sqlite3.connect(db, isolation_level=None, timeout=0)
        with pytest.raises(sqlite3.OperationalError) as caught:
            other.execute("BEGIN IMMEDIATE")
        other.close()
    finally:
        holder.close()
    err = translate(_wrapped(caught.value), where="sqlite:///x.db")
    assert isinstance(err, StoreUnavailableError) and isinstance(err, SimbridgeError)
    assert "database is locked" in str(err)


@pytest.mark.parametrize(
    ("orig", "kind"),
    [
        (psycopg.errors.SerializationFailure("could not serialize access"), StoreUnavailableError),
        (psycopg.errors.DeadlockDetected("deadlock detected"), StoreUnavailableError),
        (psycopg.errors.AdminShutdown("terminating connection"), StoreUnavailableError),
        (psycopg.OperationalError("connection refused"), StoreUnavailableError),
        (psycopg.errors.UndefinedTable('relation "beams" does not exist'), StoreLostError),
        (psycopg.errors.UniqueViolation("duplicate key"), StoreError),
    ],
)
def test_postgresql_errors_are_sorted_by_what_they_mean(orig: Exception, kind: type) -> None:
    err = translate(_wrapped(orig), where="postgresql+psycopg://db")
    assert type(err) is kind, err


def test_a_deleted_sqlite_file_is_a_lost_database_and_is_not_recreated(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    with Store(url=f"sqlite:///{db}") as store:
        store.add_event(reason="before")
        for path in tmp_path.iterdir():
            path.unlink()
        with pytest.raises(StoreLostError, match="was deleted while this process had it open"):
            store.check()
        with pytest.raises(StoreLostError, match="was deleted"):
            store.add_event(reason="after")
        with pytest.raises(StoreLostError):
            store.cases()  # a fresh connection: the file is not created again
    assert not db.exists()


def test_opening_without_migrating_never_creates_a_database(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "jobs.db"
    with pytest.raises(StoreNotInitialisedError, match="not initialised"):
        Store(url=f"sqlite:///{db}", migrate=False)
    assert not (tmp_path / "sub").exists()
