"""What a scheduler says of an attempt: its state (Slurm's PENDING, RUNNING, TIMEOUT...) and reason.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a table beyond ADD COLUMN; nullable columns need no default.
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("scheduler_state", sa.String(32)))
        batch.add_column(sa.Column("scheduler_reason", sa.Text))


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("scheduler_reason")
        batch.drop_column("scheduler_state")
