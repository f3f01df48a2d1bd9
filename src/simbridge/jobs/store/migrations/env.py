"""Alembic environment of the jobs store: runs on a connection handed in by Store.migrate."""

from __future__ import annotations

from alembic import context

from simbridge.jobs.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - only Store.migrate runs these migrations
    raise RuntimeError("run jobs migrations through simbridge.jobs.store.Store, not the alembic CLI")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
