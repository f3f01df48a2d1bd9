"""The schema lives in schema.py and in the migrations; these tests fail the moment they drift apart
(on SQLite and on PostgreSQL), and when a row dataclass and its table disagree on the columns."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from tests.integration.jobs.jobs_fixtures import JobsEnv

from simbridge.jobs.errors import StoreNotInitialisedError
from simbridge.jobs.store import AttemptRow, BeamRow, CaseRow, EventRow, Store
from simbridge.jobs.store.base import head_revision
from simbridge.jobs.store.hostgpus import HostGpuRow
from simbridge.jobs.store.schema import attempts, beams, cases, events, host_gpus, metadata

pytestmark = pytest.mark.integration


def test_the_migrations_build_exactly_the_models(env: JobsEnv) -> None:
    with Store(url=env.db_url) as store, store.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, metadata)
    assert diff == [], f"schema.py and the migrations differ: {diff}"


@pytest.mark.parametrize(
    ("row", "table"),
    [
        (CaseRow, cases),
        (BeamRow, beams),
        (AttemptRow, attempts),
        (EventRow, events),
        (HostGpuRow, host_gpus),
    ],
)
def test_each_row_has_exactly_its_tables_columns(row: type, table: sa.Table) -> None:
    # Rows are built by column name (and driver rows by this same field order): a column
    # added to one side only would be lost or break every read.
    assert [f.name for f in dataclasses.fields(row)] == [c.name for c in table.columns]


def test_a_database_without_the_schema_is_not_initialised(env: JobsEnv) -> None:
    if env.db_url.startswith("sqlite"):
        (env.root / "work").mkdir(exist_ok=True)
        sa.create_engine(env.db_url).connect().close()  # an empty SQLite file
    with pytest.raises(StoreNotInitialisedError, match="not initialised; run `simbridge serve`"):
        Store(url=env.db_url, migrate=False)
    with Store(url=env.db_url) as store:
        assert store.revision() == head_revision()
    with Store(url=env.db_url, migrate=False) as store:  # now it opens without migrating
        assert store.cases() == []
