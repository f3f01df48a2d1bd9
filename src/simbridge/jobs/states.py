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

# What a step that ended well leads to: the forward path as a table.
NEXT: dict[BeamState, BeamState] = dict(itertools.pairwise(PIPELINE))

# The steps that run a command (an attempt), each with the state its launch starts from: a
# relaunch (a transient failure, a launch that never started) goes back there. RUNNING waits in
# QUEUED, since a new run needs a new GPU lease; the other commands relaunch in place.
LAUNCHED_FROM: dict[BeamState, BeamState] = {
    BeamState.PREPARING: BeamState.PREPARING,
    BeamState.RUNNING: BeamState.QUEUED,
    BeamState.POSTPROCESSING: BeamState.POSTPROCESSING,
}
COMMAND_STEPS = frozenset(LAUNCHED_FROM)

# Where a failed beam resumes when retried, by the state it failed in: the step that failed,
# except that a failed command resumes where its launch starts from.
RESUME: dict[BeamState, BeamState] = {
    BeamState.PENDING: BeamState.PREPARING,
    BeamState.PREPARING: BeamState.PREPARING,
    BeamState.UPLOADING: BeamState.UPLOADING,
    BeamState.QUEUED: BeamState.QUEUED,
    BeamState.RUNNING: LAUNCHED_FROM[BeamState.RUNNING],
    BeamState.COLLECTING: BeamState.COLLECTING,
    BeamState.POSTPROCESSING: BeamState.POSTPROCESSING,
}
RESUMABLE = frozenset(RESUME.values())
# A cancelled beam, when retried, starts over.
RESTART = BeamState.PENDING

# Not ended: the beam still needs the orchestrator (or a running command) to move on. Tuples in
# declaration order, so a query built from them reads the same in every process.
IN_FLIGHT = tuple(s for s in BeamState if s not in TERMINAL)
# In flight and moved on by the scheduler; a RUNNING beam waits on its command (the watcher's).
SCHEDULABLE = tuple(s for s in IN_FLIGHT if s is not BeamState.RUNNING)


def _legal() -> dict[BeamState, frozenset[BeamState]]:
    moves: dict[BeamState, set[BeamState]] = {s: set() for s in BeamState}
    for here, there in itertools.pairwise(PIPELINE):
        moves[here].add(there)
    for state in BeamState:
        if not state.terminal:
            moves[state] |= {BeamState.FAILED, BeamState.CANCELLED}
    # A command that must launch again goes back to where its launch starts from (a run gives
    # the GPU back and waits for a new lease).
    for step, start in LAUNCHED_FROM.items():
        if start is not step:
            moves[step].add(start)
    # retry: a failed beam resumes at the step that failed; a cancelled one starts over.
    moves[BeamState.FAILED] |= RESUMABLE
    moves[BeamState.CANCELLED].add(RESTART)
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
    if failed_step is None:
        return BeamState.PREPARING
    return RESUME.get(failed_step, BeamState.PREPARING)


def retry_target(state: BeamState, failed_step: BeamState | None) -> BeamState | None:
    """Where a person's retry puts a beam in ``state`` (None: a retry does not apply to it)."""
    if state is BeamState.FAILED:
        return resume_state(failed_step)
    if state is BeamState.CANCELLED:
        return RESTART
    return None


def progress(state: BeamState) -> float:
    """How far along the forward path a beam is, 0..1 (an ended beam is at 1)."""
    if state.terminal:
        return 1.0
    return PIPELINE.index(state) / (len(PIPELINE) - 1)


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
