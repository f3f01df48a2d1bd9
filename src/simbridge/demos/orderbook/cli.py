"""``simbridge demo orderbook``: the pipeline against a local replay server, a Rich live view, a PNG.

Mounted on the ``demo`` group by ``simbridge.cli``; this module only defines the command function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from simbridge.demos.orderbook.errors import OrderBookError
from simbridge.demos.orderbook.options import LiveStats, PipelineOptions
from simbridge.errors import SimbridgeError

_DEFAULTS = PipelineOptions()


def live_table(stats: LiveStats) -> Table:
    """The live view: feed state, top of book, OBI, rate and latency."""
    feed, book = stats.feed, stats.book
    table = Table(title=f"order book, {stats.elapsed_s:.1f} s", show_header=False, min_width=48)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("feed state", stats.state)
    table.add_row(
        "best bid / ask",
        f"{book.get('best_bid', float('nan')):.2f} / {book.get('best_ask', float('nan')):.2f}",
    )
    table.add_row("OBI (top levels)", f"{book.get('obi', 0.0):+.3f}")
    table.add_row("messages/s", f"{book.get('events_per_s', 0.0):,.0f}")
    table.add_row(
        "latency p50 / p99 (local - exchange)",
        f"{book.get('p50_us', 0) / 1e3:.2f} / {book.get('p99_us', 0) / 1e3:.2f} ms",
    )
    table.add_row("events through the book", f"{int(book.get('events', 0)):,}")
    table.add_row(
        "snapshots / checksum failures / reconnects",
        f"{feed.get('snapshots', 0)} / {feed.get('checksum_failures', 0)} / "
        f"{max(0, feed.get('connects', 0) - 1)}",
    )
    table.add_row("TCP_NODELAY", "yes" if feed.get("nodelay") else "no")
    return table


def _cpus(text: str) -> tuple[int | None, int | None, int | None]:
    if not text:
        return (None, None, None)
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() or p in ("", "-") for p in parts):
        raise typer.BadParameter("give three CPUs for feed,book,recorder, e.g. 0,1,1 (or - for any)")
    a, b, c = (int(p) if p.isdigit() else None for p in parts)
    return (a, b, c)


def orderbook_command(
    *,
    seconds: Annotated[float, typer.Option(min=0.5, max=86_400, help="How long to run.")] = _DEFAULTS.seconds,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for parquet/ and orderbook.png.")
    ] = _DEFAULTS.output,
    rate: Annotated[
        float, typer.Option(min=1, max=1e6, help="Updates per second the replay server sends.")
    ] = _DEFAULTS.rate_hz,
    depth: Annotated[int, typer.Option(min=1, max=400, help="Levels per side in the OBI.")] = _DEFAULTS.depth,
    cpus: Annotated[str, typer.Option(help="Pin feed,book,recorder to these CPUs, e.g. 0,1,1.")] = "",
    live: Annotated[bool, typer.Option(help="Show the Rich live view while running.")] = True,
    plot: Annotated[bool, typer.Option(help="Write orderbook.png (needs matplotlib).")] = True,
) -> None:
    """An exchange order-book feed through shared-memory rings into Parquet, against a local replay server."""
    # Imported here: WebSockets and pyarrow (the streams extra) are needed to run the demo, not to
    # start the `simbridge` command.
    from simbridge.demos.orderbook.pipeline import load_run, run_pipeline

    console = Console()
    options = PipelineOptions(seconds=seconds, output=output, rate_hz=rate, depth=depth, cpus=_cpus(cpus))
    try:
        if live:
            with Live(live_table(LiveStats()), console=console, refresh_per_second=4) as view:
                result = run_pipeline(options, on_tick=lambda s: view.update(live_table(s)))
        else:
            result = run_pipeline(options)
        console.print(live_table(result.last))
        columns = load_run(result.parquet_files)
        rows = len(columns.get("seq", []))
        console.print(
            f"recorded {rows:,} rows in {len(result.parquet_files)} Parquet file(s) "
            f"under {output / 'parquet'}",
            soft_wrap=True,  # a path split over lines cannot be copied
            highlight=False,
        )
        if plot and rows:
            from simbridge.demos.orderbook.plot import plot_run

            console.print(
                f"plot: {plot_run(columns, output / 'orderbook.png')}", soft_wrap=True, highlight=False
            )
    except (OrderBookError, SimbridgeError, OSError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
