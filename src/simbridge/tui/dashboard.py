"""The live view of the pipeline: one row per beam, grouped by case, refreshed from the store.

Reads only; safe to run beside `simbridge serve` (SQLite WAL readers never block the writer long).
"""

from __future__ import annotations

import time

from rich import box
from rich.console import Console, ConsoleOptions, JustifyMethod, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from simbridge.jobs.control import BeamView, CaseView, snapshot
from simbridge.jobs.states import IN_FLIGHT, BeamState, CaseState
from simbridge.jobs.store import Store
from simbridge.processes import elapsed_text

# Styles of the states people most look for; any other step in flight is cyan.
STYLE: dict[str, str] = {
    BeamState.PENDING: "dim",
    BeamState.QUEUED: "yellow",
    BeamState.RUNNING: "bold blue",
    BeamState.COMPLETED: "green",
    BeamState.FAILED: "bold red",
    BeamState.CANCELLED: "magenta",
    CaseState.EMPTY: "dim",
    CaseState.ACTIVE: "bold blue",
    CaseState.PARTIAL: "yellow",
}
_IN_FLIGHT = {s.value for s in IN_FLIGHT}


def style(state: str) -> str:
    """The Rich style of a beam or case state."""
    return STYLE.get(state, "cyan" if state in _IN_FLIGHT else "")


# Columns that never shrink: (name, width at least, justify). Their content is short and bounded.
_FIXED: tuple[tuple[str, int, JustifyMethod], ...] = (
    ("state", max(len(s) for s in BeamState), "left"),
    ("gpu", 3, "right"),
    ("job", 3, "right"),
    ("time", 6, "right"),
    ("tries", 5, "right"),
)
_BAR = 5
_MIN_BEAM, _MIN_WHY = 8, 8


class Dashboard:
    """The dashboard for some cases, laid out for the console's width (fits 80 columns).

    Each case is a row of its own (its name in the beam column, its state in the state column),
    so no column is spent repeating it. State, gpu, job, time and tries keep their full width;
    the beam name and the error share what is left, each cut with an ellipsis.
    """

    def __init__(self, views: list[CaseView], *, title: str = "simbridge jobs") -> None:
        self.views = views
        self.title = title

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        counts: dict[str, int] = {}
        for view in self.views:
            for beam in view.beams:
                counts[beam.state] = counts.get(beam.state, 0) + 1
        summary = Text(f"{self.title}: {len(self.views)} case(s), ")
        summary.append(", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no beams")
        yield summary
        yield self._table(options.max_width)

    def _table(self, width: int) -> Table:
        beams = [b for v in self.views for b in v.beams]
        fixed = []
        for name, least, justify in _FIXED:
            cells = [_cell(name, b) for b in beams]
            fixed.append((name, max([least, len(name), *map(len, cells)]), justify))
        # The box draws a blank divider between columns and a blank edge on each side.
        free = width - 2 - sum(w for _, w, _ in fixed) - _BAR - (len(fixed) + 3 - 1)
        longest = max([len("beam"), *(len(b.beam) + 1 for b in beams), *(len(v.case) for v in self.views)])
        # The error is what people read: it gets two thirds of the room (up to 60), the name the rest.
        beam_w = max(_MIN_BEAM, min(longest, free - max(_MIN_WHY, min(60, free * 2 // 3))))
        why_w = max(_MIN_WHY, free - beam_w)
        table = Table(box=box.SIMPLE_HEAD, padding=0)
        table.add_column("beam", width=beam_w, no_wrap=True, overflow="ellipsis")
        for name, col_w, justify in fixed:
            table.add_column(name, width=col_w, no_wrap=True, justify=justify)
        table.add_column("done", width=_BAR, no_wrap=True)
        table.add_column("why", width=why_w, no_wrap=True, overflow="ellipsis")
        for view in self.views:
            note = "" if view.beams else "no beam folders"
            case_cell = Text(view.case, style="bold", overflow="ellipsis", no_wrap=True)
            table.add_row(case_cell, Text(view.state, style=style(view.state)), *[""] * 5, note)
            for beam in view.beams:
                error = (beam.last_error or "").splitlines()
                table.add_row(
                    Text(f" {beam.beam}", overflow="ellipsis", no_wrap=True),
                    Text(beam.state, style=style(beam.state)),
                    *[_cell(name, beam) for name, _, _ in _FIXED[1:]],
                    ProgressBar(total=1.0, completed=beam.progress, width=_BAR),
                    Text(error[0][:200] if error else "", overflow="ellipsis", no_wrap=True),
                )
            table.add_section()
        return table


def _cell(column: str, beam: BeamView) -> str:
    if column == "gpu":
        return beam.gpu or "-"
    if column == "job":
        job = beam.job_id or "-"
        return f"{job} {beam.scheduler}" if beam.scheduler else job
    if column == "time":
        return elapsed_text(beam.elapsed_s)
    if column == "tries":
        return str(beam.tries)
    return beam.state


def render(views: list[CaseView], *, title: str = "simbridge jobs") -> Dashboard:
    """The dashboard for these cases (a Rich renderable that fits the console's width)."""
    return Dashboard(views, title=title)


def run_dashboard(
    store: Store,
    *,
    refresh_s: float = 1.0,
    once: bool = False,
    max_s: float | None = None,
    console: Console | None = None,
) -> None:
    """Show the dashboard, refreshed every ``refresh_s`` until Ctrl-C (or ``max_s``)."""
    console = console or Console()
    if once:
        console.print(render(snapshot(store)))
        return
    deadline = None if max_s is None else time.monotonic() + max_s
    with Live(render(snapshot(store)), console=console, refresh_per_second=4) as live:
        try:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(refresh_s)
                live.update(render(snapshot(store)))
        except KeyboardInterrupt:
            pass
