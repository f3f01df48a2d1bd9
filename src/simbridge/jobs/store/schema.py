"""The jobs tables (SQLAlchemy 2 Core): cases, beams, attempts and the append-only events log.

Times are UNIX seconds (float) so SQLite and PostgreSQL compare them the same way. The schema is
created and changed only by the Alembic migrations in ``migrations/``; this module mirrors the head.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

cases = sa.Table(
    "cases",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("key", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("source", sa.Text, nullable=False),
    sa.Column("root", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

beams = sa.Table(
    "beams",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id"), nullable=False),
    sa.Column("key", sa.String(64), nullable=False),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("failed_step", sa.String(16)),
    sa.Column("step_tries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("not_before", sa.Float),
    sa.Column("gpu_id", sa.String(64)),
    sa.Column("hpc_job_id", sa.String(128)),
    sa.Column("exit_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float),
    sa.Column("finished_at", sa.Float),
    sa.UniqueConstraint("case_id", "key", name="uq_beams_case_key"),
    sa.Index("ix_beams_state", "state"),
)

attempts = sa.Table(
    "attempts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("beam_id", sa.Integer, sa.ForeignKey("beams.id"), nullable=False),
    sa.Column("step", sa.String(16), nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("token", sa.String(64), nullable=False, unique=True),
    sa.Column("executor", sa.String(32), nullable=False),
    sa.Column("work_dir", sa.Text, nullable=False),
    sa.Column("gpu_id", sa.String(64)),
    sa.Column("job_id", sa.String(128)),
    sa.Column("pid", sa.Integer),
    sa.Column("pid_start", sa.BigInteger),
    sa.Column("deadline", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("ended_at", sa.Float),
    sa.Column("exit_code", sa.Integer),
    sa.Column("outcome", sa.String(16)),
    # What the scheduler last said (Slurm: PENDING + Priority, RUNNING, TIMEOUT...); revision 0004.
    sa.Column("scheduler_state", sa.String(32)),
    sa.Column("scheduler_reason", sa.Text),
    sa.Index("ix_attempts_open", "ended_at"),
)

events = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("case_id", sa.Integer, sa.ForeignKey("cases.id")),
    sa.Column("beam_id", sa.Integer, sa.ForeignKey("beams.id")),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16)),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Index("ix_events_beam", "beam_id"),
)

# One row (id 1): who runs the orchestrator (`serve`) on this database. A serve takes it in a
# guarded write and renews heartbeat_at; another may take it over only when the heartbeat is
# older than jobs.orchestrator_lease_s, or at once when the holder's pid is dead on this host.
# Every write of the holder checks ``holder`` in its own transaction (the fence).
orchestrator = sa.Table(
    "orchestrator",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("holder", sa.String(64)),
    sa.Column("host", sa.String(255)),
    sa.Column("pid", sa.Integer),
    sa.Column("pid_start", sa.BigInteger),
    sa.Column("started_at", sa.Float),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("generation", sa.Integer, nullable=False, server_default="0"),
)

# The GPUs of plain SSH hosts (scheduler: none), one row each: the store assigns them, so no two
# beams ever run on one remote GPU. ``beam_id`` is the holder (NULL: free); a beam holds its GPUs
# from its grant (still QUEUED) until its attempt closes (same transaction).
host_gpus = sa.Table(
    "host_gpus",
    metadata,
    sa.Column("host", sa.String(128), primary_key=True),
    sa.Column("gpu", sa.String(64), primary_key=True),
    sa.Column("slot", sa.Integer, nullable=False),
    sa.Column("uuid", sa.String(128)),
    sa.Column("beam_id", sa.Integer, sa.ForeignKey("beams.id")),
    sa.Column("held_at", sa.Float),
    sa.Index("ix_host_gpus_beam", "beam_id"),
)

# Beams waiting for GPUs of a host, served first come first served (``since``, then beam id).
host_gpu_waits = sa.Table(
    "host_gpu_waits",
    metadata,
    sa.Column("host", sa.String(128), primary_key=True),
    sa.Column("beam_id", sa.Integer, sa.ForeignKey("beams.id"), primary_key=True, autoincrement=False),
    sa.Column("count", sa.Integer, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("seen_at", sa.Float, nullable=False),
)
