"""states.py's tables agree with each other and with the legal moves (hypothesis over the machine).

Every fact about task states (what follows a step, where a relaunch or a retry resumes, which states
are in flight or scheduled) lives in states.py; the pipeline, dispatcher, control and dashboard read
these tables, so their consistency is the machine's."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given

from simbridge.jobs.states import (
    COMMAND_STEPS,
    IN_FLIGHT,
    LAUNCHED_FROM,
    LEGAL,
    NEXT,
    PIPELINE,
    RESTART,
    RESUMABLE,
    RESUME,
    SCHEDULABLE,
    TERMINAL,
    BeamState,
    progress,
    resume_state,
    retry_target,
)

states = st.sampled_from(list(BeamState))


def _reachable(start: BeamState, moves: dict[BeamState, frozenset[BeamState]]) -> set[BeamState]:
    seen, todo = {start}, [start]
    while todo:
        for there in moves[todo.pop()]:
            if there not in seen:
                seen.add(there)
                todo.append(there)
    return seen


def test_in_flight_and_terminal_split_the_states() -> None:
    assert set(IN_FLIGHT) | TERMINAL == set(BeamState)
    assert not set(IN_FLIGHT) & TERMINAL
    assert set(SCHEDULABLE) == set(IN_FLIGHT) - {BeamState.RUNNING}
    assert list(IN_FLIGHT) == [s for s in BeamState if s in IN_FLIGHT]  # a stable order


@given(states)
def test_every_state_in_flight_reaches_completed_forward_and_an_end_at_once(state: BeamState) -> None:
    if state.terminal:
        assert state not in NEXT
        return
    path = [state]
    while path[-1] in NEXT:
        assert NEXT[path[-1]] in LEGAL[path[-1]]
        path.append(NEXT[path[-1]])
    assert path[-1] is BeamState.COMPLETED and path == list(PIPELINE[PIPELINE.index(state) :])
    assert {BeamState.FAILED, BeamState.CANCELLED} <= LEGAL[state]  # any step may end at once
    assert TERMINAL & _reachable(state, LEGAL)


@given(st.sampled_from(sorted(COMMAND_STEPS)))
def test_relaunch_table_matches_the_moves(step: BeamState) -> None:
    start = LAUNCHED_FROM[step]
    assert step in IN_FLIGHT and start in SCHEDULABLE
    # A launch moves start -> step (or stays in it); a relaunch goes back to start.
    assert start is step or (step in LEGAL[start] and start in LEGAL[step])
    assert RESUME[step] is start  # a retried failed command resumes where its launch starts
    assert step in NEXT and NEXT[step] in LEGAL[step]


@given(states, st.one_of(st.none(), states))
def test_retry_targets_are_legal_moves(state: BeamState, failed_step: BeamState | None) -> None:
    target = retry_target(state, failed_step)
    if state in {BeamState.FAILED, BeamState.CANCELLED}:
        assert target is not None and target in LEGAL[state]
    else:
        assert target is None
    assert resume_state(failed_step) in RESUMABLE | {BeamState.PREPARING}


def test_resume_covers_every_step_in_flight() -> None:
    assert set(RESUME) == set(IN_FLIGHT)
    assert LEGAL[BeamState.FAILED] == RESUMABLE
    assert LEGAL[BeamState.CANCELLED] == {RESTART}
    # Moves beyond the forward path, ending and retrying are exactly the relaunches.
    extra = {
        (here, there)
        for here, targets in LEGAL.items()
        for there in targets
        if not here.terminal and there not in TERMINAL and NEXT.get(here) is not there
    }
    assert extra == {(s, LAUNCHED_FROM[s]) for s in COMMAND_STEPS if LAUNCHED_FROM[s] is not s}


@given(states, states)
def test_progress_grows_along_the_path(a: BeamState, b: BeamState) -> None:
    assert 0.0 <= progress(a) <= 1.0
    if a in PIPELINE and b in PIPELINE and PIPELINE.index(a) < PIPELINE.index(b):
        assert progress(a) < progress(b)
    if a.terminal:
        assert progress(a) == 1.0
