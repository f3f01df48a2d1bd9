"""What a demo run is given and what its live view shows: plain data, cheap to import (the CLI
imports this at start-up; the pipeline, WebSockets and pyarrow only when the demo runs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from simbridge.demos.orderbook.states import FeedState

_STATES = list(FeedState)


@dataclass(frozen=True)
class PipelineOptions:
    """What ``simbridge demo orderbook`` runs."""

    seconds: float = 10.0
    output: Path = Path("orderbook-run")
    rate_hz: float = 1000.0
    depth: int = 10  # levels per side in the OBI
    cpus: tuple[int | None, int | None, int | None] = (None, None, None)  # feed, book, recorder
    bad_checksum_after_s: float = 0.3  # when the replay server sends its wrong checksum
    drop_after_s: float = 0.6  # and when it drops the connection
    rotate_seconds: float = 1.0
    ring_capacity: int = 1 << 20
    seed: int = 0


@dataclass
class LiveStats:
    """One look at the running pipeline, for the live view."""

    elapsed_s: float = 0.0
    feed: dict[str, int] = field(default_factory=dict)
    book: dict[str, float] = field(default_factory=dict)

    @property
    def state(self) -> str:
        code = self.feed.get("state")
        return _STATES[code].value if code is not None and 0 <= code < len(_STATES) else "starting"
