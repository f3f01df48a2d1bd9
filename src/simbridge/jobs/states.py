"""The beam (task) state machine: the only place that knows states and legal transitions.

A case's state is derived from its beams by :func:`case_state`; it is never stored.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable

from simbridge.jobs.errors import IllegalTransitionError


class BeamState(enum.StrEnum):
    """Where one beam is in the pipeline."""

    PENDING = "PENDING"
    PREPARING = "PREPARING"
    UPLOADING = "UPLOADING"
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COLLECTING = "COLLECTING"
    POSTPROCESSING = "POSTPROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        """True when nothing more happens to the beam without a person's retry."""
        return self in TERMINAL


TERMINAL = frozenset({BeamState.COMPLETED, BeamState.FAILED, BeamState.CANCELLED})

# The forward path; each step may also fail or be cancelled.
PIPELINE = (
    BeamState.PENDING,
    BeamState.PREPARING,
    BeamState.UPLOADING,
    BeamState.QUEUED,
    BeamState.RUNNING,
    BeamState.COLLECTING,
    BeamState.POSTPROCESSING,
    BeamState.COMPLETED,
)

# States a failed beam may be retried from: the step that failed (RUNNING resumes at QUEUED,
# since a new run needs a new GPU lease).
RESUMABLE = frozenset(
    {
        BeamState.PREPARING,
        BeamState.UPLOADING,
        BeamState.QUEUED,
        BeamState.COLLECTING,
        BeamState.POSTPROCESSING,
    }
)


def _legal() -> dict[BeamState, frozenset[BeamState]]:
    moves: dict[BeamState, set[BeamState]] = {s: set() for s in BeamState}
    for here, there in itertools.pairwise(PIPELINE):
        moves[here].add(there)
    for state in BeamState:
        if not state.terminal:
            moves[state] |= {BeamState.FAILED, BeamState.CANCELLED}
    # A transient failure of a run gives the GPU back and waits for a new lease.
    moves[BeamState.RUNNING].add(BeamState.QUEUED)
    # retry: a failed beam resumes at the step that failed; a cancelled one starts over.
    moves[BeamState.FAILED] |= RESUMABLE
    moves[BeamState.CANCELLED].add(BeamState.PENDING)
    return {state: frozenset(targets) for state, targets in moves.items()}


LEGAL: dict[BeamState, frozenset[BeamState]] = _legal()


def check_transition(current: BeamState, target: BeamState) -> None:
    """Raise :class:`IllegalTransitionError` unless ``current -> target`` is a legal move."""
    if target not in LEGAL[current]:
        allowed = ", ".join(sorted(LEGAL[current])) or "none (terminal)"
        msg = f"beam cannot go {current} -> {target}; from {current}: {allowed}"
        raise IllegalTransitionError(msg)


def resume_state(failed_step: BeamState | None) -> BeamState:
    """The state a failed beam restarts in when retried, given the state it failed in."""
    if failed_step is BeamState.RUNNING:
        return BeamState.QUEUED
    if failed_step in RESUMABLE:
        return failed_step
    return BeamState.PREPARING


class CaseState(enum.StrEnum):
    """A case's state, derived from its beams (never stored)."""

    EMPTY = "EMPTY"
    PENDING = "PENDING"
    ACTIVE = "ACTIVE"
    COMPLETED = "COMPLETED"
    PARTIAL = "PARTIAL"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


def case_state(beams: Iterable[BeamState]) -> CaseState:
    """Derive a case's state: ACTIVE while any beam is in flight, else how the beams ended."""
    states = list(beams)
    if not states:
        return CaseState.EMPTY
    if all(s is BeamState.PENDING for s in states):
        return CaseState.PENDING
    if any(not s.terminal for s in states):
        return CaseState.ACTIVE
    done = sum(s is BeamState.COMPLETED for s in states)
    if done == len(states):
        return CaseState.COMPLETED
    if done:
        return CaseState.PARTIAL
    if all(s is BeamState.CANCELLED for s in states):
        return CaseState.CANCELLED
    return CaseState.FAILED
