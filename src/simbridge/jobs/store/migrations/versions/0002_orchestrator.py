"""The orchestrator lease: one row saying which `serve` may act on this database.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "orchestrator",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("holder", sa.String(64)),
        sa.Column("host", sa.String(255)),
        sa.Column("pid", sa.Integer),
        sa.Column("pid_start", sa.BigInteger),
        sa.Column("started_at", sa.Float),
        sa.Column("heartbeat_at", sa.Float),
        sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
    )
    # The single row exists from the start, so taking the lease is always an UPDATE of a row
    # that can be locked (two first serves never race on an INSERT).
    op.bulk_insert(table, [{"id": 1, "generation": 0}])


def downgrade() -> None:
    op.drop_table("orchestrator")
