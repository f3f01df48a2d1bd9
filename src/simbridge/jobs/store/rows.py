"""The rows the jobs store hands out: plain frozen dataclasses, never live ORM objects.

Callers can keep them across transactions and threads; a fresh read is a new row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from simbridge.jobs.states import BeamState


@dataclass(frozen=True)
class CaseRow:
    """One case as stored."""

    id: int
    key: str
    name: str
    source: str
    root: str
    created_at: float


@dataclass(frozen=True)
class BeamRow:
    """One beam (task) as stored."""

    id: int
    case_id: int
    key: str
    name: str
    path: str
    state: BeamState
    failed_step: BeamState | None
    step_tries: int
    not_before: float | None
    gpu_id: str | None
    hpc_job_id: str | None
    exit_code: int | None
    last_error: str | None
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None


@dataclass(frozen=True)
class AttemptRow:
    """One launch of a step's command (the unit that is found again after a crash)."""

    id: int
    beam_id: int
    step: BeamState
    number: int
    token: str
    executor: str
    work_dir: str
    gpu_id: str | None
    job_id: str | None
    pid: int | None
    pid_start: int | None
    deadline: float
    started_at: float
    ended_at: float | None
    exit_code: int | None
    outcome: str | None
    scheduler_state: str | None = None
    scheduler_reason: str | None = None


@dataclass(frozen=True)
class EventRow:
    """One line of the append-only history."""

    id: int
    at: float
    case_id: int | None
    beam_id: int | None
    from_state: str | None
    to_state: str | None
    reason: str
    actor: str


# Rows are built positionally from ``SELECT <table>``: the fields are the table's columns, in
# order (tests/integration/jobs/test_jobs_schema_drift.py holds them together).
BEAM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(BeamRow))
ATTEMPT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AttemptRow))
_STATE = BEAM_FIELDS.index("state")
_FAILED_STEP = BEAM_FIELDS.index("failed_step")
_STEP = ATTEMPT_FIELDS.index("step")


def beam_from_tuple(values: Sequence[Any]) -> BeamRow:
    """A beam from a driver row of ``SELECT beams`` (columns in :data:`BEAM_FIELDS` order)."""
    v = list(values)
    v[_STATE] = BeamState(v[_STATE])
    v[_FAILED_STEP] = BeamState(v[_FAILED_STEP]) if v[_FAILED_STEP] else None
    return BeamRow(*v)


def attempt_from_tuple(values: Sequence[Any]) -> AttemptRow:
    """An attempt from a driver row of ``SELECT attempts`` (columns in :data:`ATTEMPT_FIELDS` order)."""
    v = list(values)
    v[_STEP] = BeamState(v[_STEP])
    return AttemptRow(*v)
