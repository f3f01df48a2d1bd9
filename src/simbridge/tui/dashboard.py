"""The live view of the pipeline: one row per beam, grouped by case, refreshed from the store.

Reads only; safe to run beside `simbridge serve` (SQLite WAL readers never block the writer long).
"""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from simbridge.jobs.control import CaseView, snapshot
from simbridge.jobs.store import Store

STYLE = {
    "PENDING": "dim",
    "PREPARING": "cyan",
    "UPLOADING": "cyan",
    "QUEUED": "yellow",
    "RUNNING": "bold blue",
    "COLLECTING": "cyan",
    "POSTPROCESSING": "cyan",
    "COMPLETED": "green",
    "FAILED": "bold red",
    "CANCELLED": "magenta",
    "PARTIAL": "yellow",
    "ACTIVE": "bold blue",
    "EMPTY": "dim",
}


def _elapsed(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def render(views: list[CaseView], *, title: str = "simbridge jobs") -> Group:
    """The dashboard for these cases (a Rich renderable)."""
    counts: dict[str, int] = {}
    for view in views:
        for beam in view.beams:
            counts[beam.state] = counts.get(beam.state, 0) + 1
    summary = Text(f"{title}: {len(views)} case(s), ")
    summary.append(
        ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no beams",
    )
    table = Table(show_lines=False)
    table.add_column("case", style="bold", no_wrap=True, min_width=8)
    table.add_column("beam", no_wrap=True, min_width=6)
    table.add_column("state", no_wrap=True, min_width=10)
    table.add_column("gpu", justify="right", no_wrap=True)
    table.add_column("job", justify="right", no_wrap=True)
    table.add_column("elapsed", justify="right", no_wrap=True)
    table.add_column("progress", width=12, no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("last error", overflow="ellipsis", no_wrap=True, min_width=10)
    for view in views:
        case_cell = Text(f"{view.case}\n", style="bold")
        case_cell.append(view.state, style=STYLE.get(view.state, ""))
        if not view.beams:
            table.add_row(case_cell, "-", "-", "-", "-", "-", "", "", "no beam folders")
        for i, beam in enumerate(view.beams):
            error = (beam.last_error or "").splitlines()
            table.add_row(
                case_cell if i == 0 else "",
                beam.beam,
                Text(beam.state, style=STYLE.get(beam.state, "")),
                beam.gpu or "-",
                beam.job_id or "-",
                _elapsed(beam.elapsed_s),
                ProgressBar(total=1.0, completed=beam.progress, width=10),
                str(beam.tries),
                error[0][:200] if error else "",
            )
        table.add_section()
    return Group(summary, table)


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
