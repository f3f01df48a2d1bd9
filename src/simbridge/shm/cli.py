"""``simbridge shm ...`` (list, inspect, remove, clean, diff recordings) and ``simbridge demo blocks``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from simbridge.shm import registry
from simbridge.shm.block import Block
from simbridge.shm.errors import ShmError, Timeout
from simbridge.shm.layout import SHM_DIR
from simbridge.shm.recorder import diff as diff_recording

app = typer.Typer(no_args_is_help=True, add_completion=False)
demo_app = typer.Typer(no_args_is_help=True, add_completion=False)


def _console() -> Console:
    # Made per command, so it sizes itself to the terminal the command runs in.
    return Console()


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _age(ts: float | None) -> str:
    if ts is None:
        return "never"
    return f"{max(0.0, time.time() - ts):.1f} s ago"


@app.command("ls")
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every block: owner pid and whether it is alive, dtype, shape, iteration, last publish, size."""
    infos = registry.list_blocks()
    if as_json:
        typer.echo(json.dumps([asdict(i) | {"stale": i.stale} for i in infos], indent=2))
        return
    table = Table(title=f"simbridge blocks in {SHM_DIR}")
    table.add_column("name", overflow="fold")
    for col in (
        "owner pid",
        "alive",
        "state",
        "dtype",
        "shape",
        "iteration",
        "last publish",
        "size",
    ):
        table.add_column(col)
    for i in infos:
        table.add_row(
            i.name,
            str(i.owner_pid or "-"),
            "yes" if i.alive else "[red]no[/red]",
            i.state,
            i.dtype or "-",
            str(i.shape) if i.shape is not None else "-",
            str(i.iteration) if i.iteration is not None else "-",
            _age(i.last_publish),
            _size(i.size),
        )
    _console().print(table if infos else "no simbridge blocks")


@app.command("inspect")
def inspect_command(name: str) -> None:
    """Show a block's header and min/max/mean/NaN count of its latest iteration."""
    try:
        block = Block.open(name, timeout=0)
    except ShmError as exc:
        _console().print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    with block:
        header = block.header()
        table = Table(title=f"block {name}", show_header=False)
        for key, value in header.items():
            if key != "slots":
                table.add_row(key, hex(value) if key == "magic" else str(value))
        table.add_row("writer alive", str(block.writer_alive()))
        for index, slot in enumerate(header["slots"]):
            table.add_row(f"slot {index}", ", ".join(f"{k}={v}" for k, v in slot.items()))
        try:
            snap = block.read(timeout=0)
        except Timeout:
            table.add_row("latest", "nothing published yet")
        else:
            data = snap.array
            if data.dtype.kind in "fc":
                nonfinite = int(data.size - np.count_nonzero(np.isfinite(data)))
                finite = data[np.isfinite(data)]
            else:
                nonfinite, finite = 0, data
            table.add_row("latest iteration", str(snap.iteration))
            table.add_row("NaN/Inf count", str(nonfinite))
            if finite.size and data.dtype.kind in "biuf":
                table.add_row(
                    "min / max / mean",
                    f"{finite.min():.6g} / {finite.max():.6g} / {finite.mean():.6g}",
                )
        _console().print(table)


@app.command("rm")
def remove_command(
    name: str,
    force: Annotated[bool, typer.Option(help="Remove even if the owner is alive.")] = False,
) -> None:
    """Remove a block (its owner must be gone unless --force)."""
    try:
        registry.remove(name, force=force)
    except (ShmError, ValueError) as exc:
        _console().print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    _console().print(f"removed {name}")


@app.command("clean")
def clean_command() -> None:
    """Remove stale blocks only: dead owner, previous boot, or abandoned while being created."""
    removed = registry.cleanup_stale()
    for info in removed:
        _console().print(f"removed {info.name} (owner pid {info.owner_pid}, {info.state})")
    _console().print(f"{len(removed)} stale block(s) removed")


@app.command("include")
def include_command() -> None:
    """Print the directory holding simbridge/shm.h, for `cc -I"$(simbridge shm include)" peer.c`."""
    from simbridge.shm.headers import get_include

    typer.echo(str(get_include()))


@app.command("diff")
def diff_command(directory: Path) -> None:
    """Compare recorded sends and receives; exit 1 if any received checksum differs from the sent one."""
    if not directory.is_dir():
        _console().print(f"[red]{directory} is not a directory[/red]")
        raise typer.Exit(2)
    report = diff_recording(directory)
    _console().print(
        f"{report.matched} transfer(s) matched, {len(report.mismatches)} mismatched, "
        f"{len(report.reads_without_publish)} read(s) without a recorded publish, "
        f"{len(report.publishes_never_read)} publish(es) never read"
    )
    if report.mismatches:
        table = Table(title="checksum mismatches")
        for col in (
            "block",
            "iteration",
            "commit",
            "sent crc",
            "received crc",
            "sent file",
            "received file",
        ):
            table.add_column(col)
        for sent, got in report.mismatches:
            table.add_row(
                sent["name"],
                str(sent["iteration"]),
                str(sent["commit"]),
                f"{sent['checksum']:08x}",
                f"{got['checksum']:08x}",
                sent["file"],
                got["file"],
            )
        _console().print(table)
        raise typer.Exit(1)


@demo_app.command("blocks")
def demo_blocks(iterations: Annotated[int, typer.Option(min=1, max=100_000)] = 20) -> None:
    """Two processes exchange arrays through Blocks (states out, observations back)."""
    from simbridge.shm.demo import OBSERVATIONS, STATES, run_driver

    _console().print(
        f"driver publishes states {STATES} float32; model process answers {OBSERVATIONS} float32"
    )
    rounds = run_driver(iterations)
    times = np.array([r.round_trip_s for r in rounds])
    table = Table(title="round trips (publish states -> model -> read observations)")
    table.add_column("iteration")
    table.add_column("round trip (ms)")
    table.add_column("result correct")
    for r in rounds:
        table.add_row(str(r.iteration), f"{r.round_trip_s * 1e3:.3f}", "yes" if r.checksum_ok else "NO")
    _console().print(table)
    _console().print(
        f"median round trip {np.median(times) * 1e3:.3f} ms over {len(rounds)} iterations "
        "(includes the model's matrix product)"
    )
    if not all(r.checksum_ok for r in rounds):
        raise typer.Exit(1)
