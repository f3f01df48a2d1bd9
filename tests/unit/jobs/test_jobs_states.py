"""The state machine: legal moves only, terminal states, derived case state, and a stateful
property test (hypothesis) through the real store: no illegal path is ever reachable."""

from __future__ import annotations

import itertools
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from simbridge.jobs.errors import IllegalTransitionError, JobsError, StaleStateError
from simbridge.jobs.states import (
    LEGAL,
    PIPELINE,
    TERMINAL,
    BeamState,
    CaseState,
    case_state,
    check_transition,
    resume_state,
)
from simbridge.jobs.store import Store


def test_forward_path_is_legal() -> None:
    for here, there in itertools.pairwise(PIPELINE):
        check_transition(here, there)


def test_terminal_states_only_leave_by_retry() -> None:
    assert {BeamState.COMPLETED, BeamState.FAILED, BeamState.CANCELLED} == TERMINAL
    assert LEGAL[BeamState.COMPLETED] == frozenset()
    for target in LEGAL[BeamState.FAILED]:
        assert target in {
            BeamState.PREPARING,
            BeamState.UPLOADING,
            BeamState.QUEUED,
            BeamState.COLLECTING,
            BeamState.POSTPROCESSING,
        }
    assert LEGAL[BeamState.CANCELLED] == {BeamState.PENDING}


def test_illegal_move_raises_with_the_allowed_ones() -> None:
    with pytest.raises(IllegalTransitionError, match="PENDING -> RUNNING") as info:
        check_transition(BeamState.PENDING, BeamState.RUNNING)
    assert isinstance(info.value, JobsError) and isinstance(info.value, ValueError)
    assert "PREPARING" in str(info.value)


def test_no_skipping_the_gpu_queue() -> None:
    # A simulation only starts from QUEUED (where the GPU lease is taken).
    starts = {s for s, targets in LEGAL.items() if BeamState.RUNNING in targets}
    assert starts == {BeamState.QUEUED}


def test_resume_state() -> None:
    assert resume_state(BeamState.RUNNING) is BeamState.QUEUED
    assert resume_state(BeamState.COLLECTING) is BeamState.COLLECTING
    assert resume_state(None) is BeamState.PREPARING
    assert resume_state(BeamState.PENDING) is BeamState.PREPARING


@pytest.mark.parametrize(
    ("beams", "expected"),
    [
        ([], CaseState.EMPTY),
        ([BeamState.PENDING, BeamState.PENDING], CaseState.PENDING),
        ([BeamState.RUNNING, BeamState.COMPLETED], CaseState.ACTIVE),
        ([BeamState.COMPLETED] * 3, CaseState.COMPLETED),
        ([BeamState.COMPLETED, BeamState.FAILED], CaseState.PARTIAL),
        ([BeamState.FAILED, BeamState.CANCELLED], CaseState.FAILED),
        ([BeamState.CANCELLED] * 2, CaseState.CANCELLED),
    ],
)
def test_case_state_is_derived(beams: list[BeamState], expected: CaseState) -> None:
    assert case_state(beams) is expected


class BeamMachine(RuleBasedStateMachine):
    """Random transition requests against a beam in a real (SQLite) store.

    Only legal requests may take effect; the append-only events log must always spell a legal
    path that ends in the stored state.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.store = Store(url=f"sqlite:///{self.dir.name}/jobs.db")
        self.store.add_case(key="c", name="c", source="/c", root="/c", beams_=[("b", "b", "/c/b")])
        self.beam_id = self.store.beams()[0].id
        self.state = BeamState.PENDING

    def teardown(self) -> None:
        self.store.close()
        self.dir.cleanup()

    @rule(to=st.sampled_from(list(BeamState)))
    def request(self, to: BeamState) -> None:
        legal = to in LEGAL[self.state]
        try:
            self.store.transition(self.beam_id, self.state, to, reason="property test")
        except IllegalTransitionError:
            assert not legal
            return
        assert legal
        self.state = to

    @rule(to=st.sampled_from(list(BeamState)), seen=st.sampled_from(list(BeamState)))
    def stale_request(self, to: BeamState, seen: BeamState) -> None:
        # A caller acting on an outdated view must never move the beam.
        if seen is self.state:
            return
        with pytest.raises((IllegalTransitionError, StaleStateError)):
            self.store.transition(self.beam_id, seen, to, reason="stale")

    @invariant()
    def log_spells_a_legal_path(self) -> None:
        stored = self.store.beam(self.beam_id).state
        assert stored is self.state
        moves = [e for e in self.store.events(beam_id=self.beam_id) if e.from_state]
        path = [BeamState.PENDING] + [BeamState(e.to_state) for e in moves]
        for (here, there), event in zip(itertools.pairwise(path), moves, strict=True):
            assert event.from_state == here.value
            assert there in LEGAL[here]
            if there is BeamState.RUNNING:
                assert here is BeamState.QUEUED
        assert path[-1] is stored


TestBeamMachine = BeamMachine.TestCase
TestBeamMachine.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
