"""``simbridge gpus``: each GPU (or slot), its memory and utilisation where known, and who holds it.

Mounted by :mod:`simbridge.cli`; usable on its own as ``simbridge.gpus.cli.app``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from simbridge.config import load_settings
from simbridge.errors import SimbridgeError
from simbridge.gpus.discovery import GpuInfo
from simbridge.gpus.pool import GpuHolder, GpuPool
from simbridge.logs import enable_debug

app = typer.Typer(
    name="gpus",
    help="GPUs (or configured slots): memory, utilisation and the pid holding each.",
    invoke_without_command=True,
    add_completion=False,
)


@app.callback()
def show(
    ctx: typer.Context,
    lock_dir: Annotated[
        Path | None, typer.Option(help="Lock folder to read (default: gpus.lock_dir from config).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log discovery details.")] = False,
) -> None:
    """Show each GPU, its memory and utilisation where known, and which pid holds it."""
    if ctx.invoked_subcommand is not None:
        return
    if verbose:  # logging itself (to stderr, stdout stays the table) is set up by `simbridge`
        enable_debug()
    console = Console()
    errors = Console(stderr=True)
    try:
        settings = load_settings()
        if lock_dir is not None:
            settings = settings.model_copy(
                update={"gpus": settings.gpus.model_copy(update={"lock_dir": lock_dir})}
            )
        with GpuPool.from_settings(settings) as pool:
            gpus = pool.read_gpus()
            holders = pool.holders()
            waiting = pool.waiting()
            note = pool.source.note
            where = pool.lock_dir
    except (SimbridgeError, OSError) as exc:
        # One line whatever the message holds (a path may contain '[' or a newline) and however
        # narrow the terminal; every error of the gpus package is typed, OSError is a last guard.
        errors.print(f"[red]error:[/red] {escape(_one_line(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from exc
    if as_json:
        typer.echo(json.dumps(_as_json(gpus, holders, waiting), indent=2))
        return
    console.print(_table(gpus, holders, title=f"GPUs ({note})"))
    console.print(f"lock folder {where}; {waiting} lease(s) waiting")


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def _table(gpus: list[GpuInfo], holders: list[GpuHolder], *, title: str) -> Table:
    table = Table(title=title)
    for column in ("index", "name", "memory used / total", "utilisation", "holder pid", "since"):
        table.add_column(column, justify="right" if column != "name" else "left")
    by_index = {h.index: h for h in holders}
    now = datetime.now(tz=UTC)
    for gpu in gpus:
        holder = by_index.get(gpu.index)
        table.add_row(
            str(gpu.index),
            gpu.name,
            _memory(gpu),
            "-" if gpu.utilization is None else f"{gpu.utilization} %",
            _holder(holder),
            "-" if holder is None or holder.since is None else _ago(now, holder.since),
        )
    return table


def _memory(gpu: GpuInfo) -> str:
    if gpu.memory_total is None:
        return "-"
    used = gpu.memory_total - (gpu.memory_free or 0)
    return f"{used / 2**30:.1f} / {gpu.memory_total / 2**30:.1f} GiB"


def _holder(holder: GpuHolder | None) -> str:
    if holder is None or not holder.held:
        return "free"
    if holder.pid is None:
        return "held (pid unknown)"
    others = [p for p in holder.pids if p != holder.pid]
    return str(holder.pid) + (f" (+{', '.join(map(str, others))})" if others else "")


def _ago(now: datetime, since: datetime) -> str:
    seconds = max(0, int((now - since).total_seconds()))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s ago"


def _as_json(gpus: list[GpuInfo], holders: list[GpuHolder], waiting: int) -> dict[str, object]:
    by_index = {h.index: h for h in holders}
    rows = []
    for gpu in gpus:
        holder = by_index.get(gpu.index)
        rows.append(
            {
                "index": gpu.index,
                "name": gpu.name,
                "uuid": gpu.uuid,
                "memory_total": gpu.memory_total,
                "memory_free": gpu.memory_free,
                "utilization": gpu.utilization,
                "held": bool(holder and holder.held),
                "pid": holder.pid if holder else None,
                "pids": list(holder.pids) if holder else [],
                "since": holder.since.isoformat() if holder and holder.since else None,
            }
        )
    return {"gpus": rows, "waiting": waiting}
