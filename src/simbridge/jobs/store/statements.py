"""Every query of the jobs store: SQLAlchemy Core statements over schema.py, built once with bind
parameters. Building a statement costs more than running it on SQLite: the store compiles each
one once per dialect and runs it on the driver's cursor (engine.DriverCursor); no SQL by hand.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

from simbridge.jobs.store.schema import attempts, beams, cases, events, orchestrator

B = sa.bindparam


def _in(name: str) -> sa.BindParameter[object]:
    """A list parameter: ``IN (:name)`` gets one placeholder per element."""
    return B(name, expanding=True)


BEAM_BY_ID = sa.select(beams).where(beams.c.id == B("_id"))
# The per-tick reads (rows come back in the table's column order: rows.py matches it).
OPEN_ATTEMPTS = sa.select(attempts).where(attempts.c.ended_at.is_(None)).order_by(attempts.c.id)
BEAMS_BY_IDS = sa.select(beams).where(beams.c.id.in_(_in("ids"))).order_by(beams.c.id)
READY_IDS = (
    sa.select(beams.c.id, beams.c.state)
    .where(
        beams.c.state.in_(_in("states")),
        sa.or_(beams.c.not_before.is_(None), beams.c.not_before <= B("now")),
        beams.c.id.not_in(_in("skip")),
    )
    .order_by(beams.c.id)
    .limit(B("limit", type_=sa.Integer))
)
# The orchestrator fence, first in every write of a serve (FOR KEY SHARE on PostgreSQL: a
# takeover's FOR UPDATE waits for the writes in flight; heartbeats, no key change, do not).
FENCE = sa.select(orchestrator.c.holder, orchestrator.c.host, orchestrator.c.pid).where(
    orchestrator.c.id == 1
)
FENCE_LOCKED = FENCE.with_for_update(read=True, key_share=True)
EVENT_COLUMNS = ("at", "case_id", "beam_id", "from_state", "to_state", "reason", "actor")
INSERT_EVENT = sa.insert(events).values({name: B(name) for name in EVENT_COLUMNS})
ATTEMPT_COLUMNS = (
    "beam_id",
    "step",
    "number",
    "token",
    "executor",
    "work_dir",
    "gpu_id",
    "deadline",
    "started_at",
)
INSERT_ATTEMPT = (
    sa.insert(attempts).values({name: B(name) for name in ATTEMPT_COLUMNS}).returning(attempts.c.id)
)
CLOSE_ATTEMPT = (
    sa.update(attempts)
    .where(attempts.c.id == B("_id"), attempts.c.ended_at.is_(None))
    .values(ended_at=B("v_ended_at"), outcome=B("v_outcome"), exit_code=B("v_exit_code"))
)
# FOR UPDATE (PostgreSQL; SQLite's write lock already serialises): the beam row stays locked
# until the attempt is written, so two launchers of one beam never both pass the checks below.
LAUNCH_CHECK = (
    sa.select(beams.c.case_id, beams.c.step_tries)
    .where(beams.c.id == B("_id"), beams.c.state == B("_expected"))
    .with_for_update()
)
OPEN_OF_BEAM = sa.select(attempts.c.id).where(attempts.c.beam_id == B("_id"), attempts.c.ended_at.is_(None))
COUNT_OF_BEAM = sa.select(sa.func.count()).select_from(attempts).where(attempts.c.beam_id == B("_id"))
RECORD_LAUNCH = (
    sa.update(attempts)
    .where(attempts.c.id == B("_id"))
    .values(job_id=B("v_job_id"), pid=B("v_pid"), pid_start=B("v_pid_start"))
)
SET_JOB_ID = sa.update(beams).where(beams.c.id == B("_id")).values(hpc_job_id=B("v_job_id"))


@functools.cache
def update_beam(columns: tuple[str, ...], *, guarded: bool) -> sa.Update:
    """UPDATE beams SET <columns> WHERE id = :_id [AND state = :_expected] RETURNING case_id."""
    stmt = sa.update(beams).where(beams.c.id == B("_id"))
    if guarded:
        stmt = stmt.where(beams.c.state == B("_expected"))
    return stmt.values({name: B(f"v_{name}") for name in columns}).returning(beams.c.case_id)


def beam_values(values: dict[str, object]) -> tuple[tuple[str, ...], dict[str, object]]:
    """The column tuple and the bind parameters for :func:`update_beam`."""
    columns = tuple(sorted(values))
    return columns, {f"v_{name}": values[name] for name in columns}


def _maybe(column: sa.Column[int], name: str) -> sa.ColumnElement[bool]:
    """``column = :name``, or true when :name is NULL (an optional filter in one statement)."""
    param = B(name, type_=sa.Integer)
    return sa.or_(param.is_(None), column == param)


# ---- cases (the cold path: the same statements, the same driver cursor) ---------------------
CASE_ID_BY_KEY = sa.select(cases.c.id).where(cases.c.key == B("key"))
CASE_BY_ID = sa.select(cases).where(cases.c.id == B("_id"))
CASE_BY_KEY = sa.select(cases).where(cases.c.key == B("key"))
ALL_CASES = sa.select(cases).order_by(cases.c.id)
INSERT_CASE = (
    sa.insert(cases)
    .values({name: B(name) for name in ("key", "name", "source", "root", "created_at")})
    .returning(cases.c.id)
)
BEAM_COLUMNS = ("case_id", "key", "name", "path", "state", "step_tries", "created_at", "updated_at")
INSERT_BEAM = sa.insert(beams).values({name: B(name) for name in BEAM_COLUMNS}).returning(beams.c.id)

# ---- beams, attempts, events ----------------------------------------------------------------
BEAMS_OF = sa.select(beams).where(_maybe(beams.c.case_id, "case_id")).order_by(beams.c.id)
BEAMS_OF_IN = (
    sa.select(beams)
    .where(_maybe(beams.c.case_id, "case_id"), beams.c.state.in_(_in("states")))
    .order_by(beams.c.id)
)
FORGET_TRY = (
    sa.update(beams)
    .where(beams.c.id == B("_id"), beams.c.step_tries > 0)
    .values(step_tries=beams.c.step_tries - 1)
)
COUNT_NOT_IN = sa.select(sa.func.count()).select_from(beams).where(beams.c.state.not_in(_in("states")))
OPEN_ATTEMPTS_OF = (
    sa.select(attempts)
    .where(attempts.c.ended_at.is_(None), attempts.c.beam_id == B("_id"))
    .order_by(attempts.c.id)
)
ATTEMPTS_OF = sa.select(attempts).where(attempts.c.beam_id == B("_id")).order_by(attempts.c.id)
COUNT_ATTEMPTS = sa.select(sa.func.count()).select_from(attempts)
COUNT_ATTEMPTS_OF = COUNT_ATTEMPTS.where(attempts.c.step == B("step"))
EVENTS_OF = (
    sa.select(events)
    .where(_maybe(events.c.beam_id, "beam_id"), _maybe(events.c.case_id, "case_id"))
    .order_by(events.c.id)
)

# Case-level events (no beam), oldest first: what intake noted about a case.
CASE_LEVEL_EVENTS = (
    sa.select(events.c.case_id, events.c.reason).where(events.c.beam_id.is_(None)).order_by(events.c.id)
)
