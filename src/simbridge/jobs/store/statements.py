"""Every query of the jobs store: SQLAlchemy Core statements over schema.py, built once with bind
parameters. Building a statement costs more than running it on SQLite: the store compiles each
one once per dialect and runs it on the driver's cursor (engine.DriverCursor); no SQL by hand.
"""

from __future__ import annotations

import functools

import sqlalchemy as sa

from simbridge.jobs.store.schema import (
    attempts,
    beams,
    cases,
    events,
    host_gpu_waits,
    host_gpus,
    orchestrator,
)

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
RECORD_SCHEDULER = (
    sa.update(attempts)
    .where(attempts.c.id == B("_id"))
    .values(scheduler_state=B("v_state"), scheduler_reason=B("v_reason"))
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
# Per beam in a state (of one case, or all): its launches of a step; one that never started
# (closed 'unlaunched', its try given back) is not a launch.
LAUNCHES_PER_BEAM = (
    sa.select(attempts.c.beam_id, sa.func.count())
    .select_from(attempts.join(beams, beams.c.id == attempts.c.beam_id))
    .where(
        _maybe(beams.c.case_id, "case_id"),
        beams.c.state == B("state"),
        attempts.c.step == B("step"),
        sa.or_(attempts.c.outcome.is_(None), attempts.c.outcome != "unlaunched"),
    )
    .group_by(attempts.c.beam_id)
)
EVENTS_OF = (
    sa.select(events)
    .where(_maybe(events.c.beam_id, "beam_id"), _maybe(events.c.case_id, "case_id"))
    .order_by(events.c.id)
)

# Case-level events (no beam), oldest first: what intake noted about a case.
CASE_LEVEL_EVENTS = (
    sa.select(events.c.case_id, events.c.reason).where(events.c.beam_id.is_(None)).order_by(events.c.id)
)

# ---- GPUs of plain SSH hosts (store/hostgpus.py) ---------------------------------------------
# FOR UPDATE on PostgreSQL: every acquirer of a host locks all its rows first, so two store
# connections racing for the last GPU are served one after the other (SQLite: BEGIN IMMEDIATE).
HOST_GPUS_LOCKED = (
    sa.select(host_gpus.c.gpu, host_gpus.c.slot, host_gpus.c.uuid, host_gpus.c.beam_id)
    .where(host_gpus.c.host == B("host"))
    .order_by(host_gpus.c.slot)
    .with_for_update()
)
HOST_GPUS = (
    sa.select(host_gpus.c.gpu, host_gpus.c.slot, host_gpus.c.uuid, host_gpus.c.beam_id, host_gpus.c.held_at)
    .where(host_gpus.c.host == B("host"))
    .order_by(host_gpus.c.slot)
)
INSERT_HOST_GPU = sa.insert(host_gpus).values(host=B("host"), gpu=B("gpu"), slot=B("slot"), uuid=B("uuid"))
UPDATE_HOST_GPU = (
    sa.update(host_gpus)
    .where(host_gpus.c.host == B("host"), host_gpus.c.gpu == B("gpu"))
    .values(slot=B("slot"), uuid=B("uuid"))
)
# One GPU per statement: the driver-cursor path expands IN lists for SELECTs only.
DROP_FREE_HOST_GPU = sa.delete(host_gpus).where(
    host_gpus.c.host == B("host"), host_gpus.c.gpu == B("gpu"), host_gpus.c.beam_id.is_(None)
)
_open_attempt_of_holder = (
    sa.select(attempts.c.id)
    .where(attempts.c.beam_id == host_gpus.c.beam_id, attempts.c.ended_at.is_(None))
    .exists()
)
_holder_queued = (
    sa.select(beams.c.id).where(beams.c.id == host_gpus.c.beam_id, beams.c.state == B("queued")).exists()
)
# A holder with no open attempt that is no longer QUEUED (cancelled while waiting, or a crash
# between the grant and the launch that recovery then moved on) holds nothing any more.
SWEEP_HOST_GPUS = (
    sa.update(host_gpus)
    .where(
        host_gpus.c.host == B("host"),
        host_gpus.c.beam_id.is_not(None),
        ~_open_attempt_of_holder,
        ~_holder_queued,
    )
    .values(beam_id=sa.null(), held_at=sa.null())
)
TAKE_HOST_GPU = (
    sa.update(host_gpus)
    .where(host_gpus.c.host == B("host"), host_gpus.c.gpu == B("gpu"), host_gpus.c.beam_id.is_(None))
    .values(beam_id=B("v_beam_id"), held_at=B("v_now"))
)
RELEASE_HOST_GPUS_OF_BEAM = (
    sa.update(host_gpus).where(host_gpus.c.beam_id == B("_beam")).values(beam_id=sa.null(), held_at=sa.null())
)
# In the same transaction as CLOSE_ATTEMPT: the GPUs go back the moment their attempt ends.
RELEASE_HOST_GPUS_OF_ATTEMPT = (
    sa.update(host_gpus)
    .where(
        host_gpus.c.beam_id.is_not(None),
        host_gpus.c.beam_id
        == sa.select(attempts.c.beam_id).where(attempts.c.id == B("_id")).scalar_subquery(),
    )
    .values(beam_id=sa.null(), held_at=sa.null())
)
WAITER = sa.select(host_gpu_waits.c.since).where(
    host_gpu_waits.c.host == B("host"), host_gpu_waits.c.beam_id == B("beam_id")
)
INSERT_WAITER = sa.insert(host_gpu_waits).values(
    host=B("host"), beam_id=B("beam_id"), count=B("count"), since=B("now"), seen_at=B("now")
)
SEEN_WAITER = (
    sa.update(host_gpu_waits)
    .where(host_gpu_waits.c.host == B("host"), host_gpu_waits.c.beam_id == B("beam_id"))
    .values(seen_at=B("now"), count=B("count"))
)
_waiter_queued = (
    sa.select(beams.c.id).where(beams.c.id == host_gpu_waits.c.beam_id, beams.c.state == B("queued")).exists()
)
# Waiters that stopped waiting: their beam left QUEUED (cancelled, failed) or nobody asked for
# them within the staleness limit (a serve that stopped): they must not block the queue.
PURGE_WAITERS = sa.delete(host_gpu_waits).where(
    host_gpu_waits.c.host == B("host"),
    sa.or_(~_waiter_queued, host_gpu_waits.c.seen_at < B("stale_before")),
)
FIRST_WAITER = (
    sa.select(host_gpu_waits.c.beam_id)
    .where(host_gpu_waits.c.host == B("host"))
    .order_by(host_gpu_waits.c.since, host_gpu_waits.c.beam_id)
    .limit(B("one", type_=sa.Integer))
)
DELETE_WAITER = sa.delete(host_gpu_waits).where(
    host_gpu_waits.c.host == B("host"), host_gpu_waits.c.beam_id == B("beam_id")
)
WAITERS = (
    sa.select(host_gpu_waits.c.beam_id)
    .where(host_gpu_waits.c.host == B("host"))
    .order_by(host_gpu_waits.c.since, host_gpu_waits.c.beam_id)
)
