"""The feed's connection states and the only table of legal transitions between them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from simbridge.demos.orderbook.errors import IllegalTransition


class FeedState(Enum):
    """Where the feed connection is."""

    CONNECTING = "connecting"  # opening the WebSocket
    SUBSCRIBED = "subscribed"  # subscribe sent, waiting for the snapshot
    LIVE = "live"  # the book is whole and every update's checksum matched
    RESYNC = "resync"  # the book is wrong (checksum, gap): unsubscribed, resubscribing
    BACKOFF = "backoff"  # the connection dropped or failed: waiting before the next attempt
    CLOSED = "closed"  # stopped on request; terminal


TERMINAL = frozenset({FeedState.CLOSED})

TRANSITIONS: dict[FeedState, frozenset[FeedState]] = {
    FeedState.CONNECTING: frozenset({FeedState.SUBSCRIBED, FeedState.BACKOFF, FeedState.CLOSED}),
    FeedState.SUBSCRIBED: frozenset({FeedState.LIVE, FeedState.RESYNC, FeedState.BACKOFF, FeedState.CLOSED}),
    FeedState.LIVE: frozenset({FeedState.RESYNC, FeedState.BACKOFF, FeedState.CLOSED}),
    FeedState.RESYNC: frozenset({FeedState.SUBSCRIBED, FeedState.BACKOFF, FeedState.CLOSED}),
    FeedState.BACKOFF: frozenset({FeedState.CONNECTING, FeedState.CLOSED}),
    FeedState.CLOSED: frozenset(),
}


@dataclass(frozen=True)
class Transition:
    """One step taken, with why and when (monotonic seconds)."""

    source: FeedState
    target: FeedState
    reason: str
    at: float


@dataclass
class FeedStateMachine:
    """Holds the state; :meth:`transition_to` refuses what :data:`TRANSITIONS` does not list."""

    state: FeedState = FeedState.CONNECTING
    history: list[Transition] = field(default_factory=list)
    on_change: Callable[[Transition], None] | None = None

    def transition_to(self, target: FeedState, reason: str) -> None:
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransition(
                f"the feed cannot go from {self.state.value} to {target.value} ({reason}); "
                f"from {self.state.value} it may go to "
                f"{', '.join(sorted(s.value for s in TRANSITIONS[self.state])) or 'nowhere (terminal)'}"
            )
        step = Transition(self.state, target, reason, time.monotonic())
        self.state = target
        self.history.append(step)
        if self.on_change is not None:
            self.on_change(step)

    def count(self, target: FeedState) -> int:
        """How many times the machine entered ``target``."""
        return sum(1 for step in self.history if step.target is target)
