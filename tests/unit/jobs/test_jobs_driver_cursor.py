"""The store's driver cursor runs each prebuilt statement as SQLAlchemy itself would.

Its short path (no list parameter: most statements of every beam) and its expanding path (``IN``
lists, padded) must give the same rows as SQLAlchemy Core on the same data.
"""

from __future__ import annotations

import sqlite3

import pytest
import sqlalchemy as sa

from simbridge.jobs.store.engine import DriverCursor

meta = sa.MetaData()
items = sa.Table("items", meta, sa.Column("id", sa.Integer, primary_key=True), sa.Column("tag", sa.String))
BY_ID = sa.select(items.c.id, items.c.tag).where(items.c.id == sa.bindparam("_id"))
BY_IDS = sa.select(items.c.id).where(items.c.id.in_(sa.bindparam("ids", expanding=True))).order_by(items.c.id)
# SQLAlchemy binds OFFSET itself on SQLite (a default the caller never passes).
PAGE = sa.select(items.c.id).order_by(items.c.id).limit(sa.bindparam("n")).offset(2)
BY_TAG_NOT_IN = (
    sa.select(items.c.id)
    .where(items.c.tag == sa.bindparam("tag"), items.c.id.not_in(sa.bindparam("skip", expanding=True)))
    .order_by(items.c.id)
)


@pytest.fixture
def db() -> tuple[sa.Engine, sqlite3.Connection]:
    engine = sa.create_engine("sqlite://")
    raw = engine.raw_connection()
    dbapi = raw.driver_connection
    assert isinstance(dbapi, sqlite3.Connection)
    meta.create_all(engine)  # the same in-memory database: the pool holds this one connection
    with engine.begin() as conn:
        conn.execute(
            sa.insert(items), [{"id": i, "tag": "even" if i % 2 == 0 else "odd"} for i in range(1, 21)]
        )
    return engine, dbapi


def _core(
    engine: sa.Engine, stmt: sa.Select[tuple[int, ...]], params: dict[str, object]
) -> list[tuple[object, ...]]:
    with engine.connect() as conn:
        return [tuple(row) for row in conn.execute(stmt, params)]


@pytest.mark.parametrize(
    ("stmt", "params"),
    [
        (BY_ID, {"_id": 7}),
        (PAGE, {"n": 3}),
        (BY_IDS, {"ids": [3]}),
        (BY_IDS, {"ids": [3, 5, 11]}),  # padded to four
        (BY_IDS, {"ids": [1, 2, 3, 4, 5]}),  # padded to eight
        (BY_TAG_NOT_IN, {"tag": "odd", "skip": [1, 3, 19]}),
    ],
)
def test_driver_cursor_matches_sqlalchemy(
    db: tuple[sa.Engine, sqlite3.Connection], stmt: sa.Select[tuple[int, ...]], params: dict[str, object]
) -> None:
    engine, dbapi = db
    driver = DriverCursor(dbapi.cursor(), {}, engine.dialect)
    assert [tuple(r) for r in driver.run(stmt, dict(params)).fetchall()] == _core(engine, stmt, params)


def test_one_cache_serves_both_paths_and_repeats(db: tuple[sa.Engine, sqlite3.Connection]) -> None:
    engine, dbapi = db
    cache: dict = {}  # type: ignore[type-arg]
    driver = DriverCursor(dbapi.cursor(), cache, engine.dialect)
    for _ in range(3):
        assert driver.run(BY_ID, {"_id": 4}).fetchall() == [(4, "even")]
        assert driver.run(PAGE, {"n": 2}).fetchall() == [(3,), (4,)]
        assert driver.run(BY_IDS, {"ids": [2, 9, 4]}).fetchall() == [(2,), (4,), (9,)]
    # One compiled shape per statement and list length class, however often it ran.
    assert len(cache) == 3
