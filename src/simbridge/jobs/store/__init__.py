"""The durable jobs store: tables, Alembic migrations and the Store that reads and writes them."""

from simbridge.jobs.store.db import AttemptRow, BeamRow, CaseRow, EventRow, Store, default_actor

__all__ = ["AttemptRow", "BeamRow", "CaseRow", "EventRow", "Store", "default_actor"]
