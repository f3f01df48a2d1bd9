"""The feed's state machine: the table of legal transitions, property-tested."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simbridge.demos.orderbook.errors import IllegalTransition
from simbridge.demos.orderbook.states import TERMINAL, TRANSITIONS, FeedState, FeedStateMachine


def test_the_normal_life_of_a_connection() -> None:
    machine = FeedStateMachine()
    for target in (
        FeedState.SUBSCRIBED,
        FeedState.LIVE,
        FeedState.RESYNC,
        FeedState.SUBSCRIBED,
        FeedState.LIVE,
        FeedState.BACKOFF,
        FeedState.CONNECTING,
        FeedState.SUBSCRIBED,
        FeedState.LIVE,
        FeedState.CLOSED,
    ):
        machine.transition_to(target, "test")
    assert machine.count(FeedState.LIVE) == 3 and machine.count(FeedState.RESYNC) == 1


def test_an_illegal_step_says_where_it_may_go() -> None:
    machine = FeedStateMachine()
    with pytest.raises(IllegalTransition, match=r"connecting to live.*may go to backoff, closed, subscribed"):
        machine.transition_to(FeedState.LIVE, "no snapshot yet")
    assert machine.state is FeedState.CONNECTING and machine.history == []


@given(st.lists(st.sampled_from(list(FeedState)), max_size=40))
def test_any_sequence_follows_the_table_and_terminal_states_stay(targets: list[FeedState]) -> None:
    machine = FeedStateMachine()
    for target in targets:
        before = machine.state
        if target in TRANSITIONS[before]:
            machine.transition_to(target, "property")
            assert machine.state is target
        else:
            with pytest.raises(IllegalTransition):
                machine.transition_to(target, "property")
            assert machine.state is before
    assert all(not TRANSITIONS[state] for state in TERMINAL)
    assert all(step.target in TRANSITIONS[step.source] for step in machine.history)
