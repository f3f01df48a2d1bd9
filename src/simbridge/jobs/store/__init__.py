"""The durable jobs store: tables, Alembic migrations and the Store that reads and writes them."""

from simbridge.jobs.store.db import Store
from simbridge.jobs.store.engine import default_actor
from simbridge.jobs.store.rows import AttemptRow, BeamRow, CaseRow, EventRow

__all__ = ["AttemptRow", "BeamRow", "CaseRow", "EventRow", "Store", "default_actor"]
