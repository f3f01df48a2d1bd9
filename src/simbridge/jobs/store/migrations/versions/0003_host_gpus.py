"""The GPUs of plain SSH hosts and the beams waiting for them (assigned by the store).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_gpus",
        sa.Column("host", sa.String(128), primary_key=True),
        sa.Column("gpu", sa.String(64), primary_key=True),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("uuid", sa.String(128)),
        sa.Column("beam_id", sa.Integer, sa.ForeignKey("beams.id")),
        sa.Column("held_at", sa.Float),
    )
    op.create_index("ix_host_gpus_beam", "host_gpus", ["beam_id"])
    op.create_table(
        "host_gpu_waits",
        sa.Column("host", sa.String(128), primary_key=True),
        sa.Column("beam_id", sa.Integer, sa.ForeignKey("beams.id"), primary_key=True, autoincrement=False),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("seen_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("host_gpu_waits")
    op.drop_index("ix_host_gpus_beam", table_name="host_gpus")
    op.drop_table("host_gpus")
