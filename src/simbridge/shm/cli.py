"""``simbridge shm ...`` (list, inspect, remove, clean, diff recordings) and ``simbridge demo blocks``.

Every command ends in one line on stderr and a non-zero exit when it fails, never in a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import click
import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from simbridge.errors import SimbridgeError
from simbridge.shm import registry
from simbridge.shm.block import Block
from simbridge.shm.errors import Corrupted, PeerGone, Timeout
from simbridge.shm.layout import SHM_DIR
from simbridge.shm.recorder import diff as diff_recording
from simbridge.shm.ring import inspect_ring

app = typer.Typer(no_args_is_help=True, add_completion=False)
demo_app = typer.Typer(no_args_is_help=True, add_completion=False)


P = ParamSpec("P")
R = TypeVar("R")


def _fail(message: str, code: int = 1) -> typer.Exit:
    # One line whatever the message holds; backslashreplace keeps undecodable bytes printable.
    line = " ".join(message.split()).encode("utf-8", "backslashreplace").decode("utf-8")
    typer.echo(f"error: {line}", err=True)
    return typer.Exit(code)


def one_line_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn every error of ``command`` into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except SimbridgeError as exc:
            raise _fail(_describe(exc)) from exc
        except OSError as exc:
            raise _fail(f"{_describe(exc)}; check the path and its permissions") from exc
        except Exception as exc:  # a bug: still one line, with what to report
            raise _fail(
                f"unexpected {type(exc).__name__}: {exc}; this is a simbridge bug, please report it "
                "with the command line"
            ) from exc

    return run


def _describe(exc: Exception) -> str:
    # OSError-based errors show strerror and filename, not "[Errno n] ..."; a refusal says the way out.
    if not isinstance(exc, OSError) or not exc.strerror:
        return str(exc)
    text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    if isinstance(exc, PermissionError) and "root" not in text:
        text += "; run as the user who owns it, or as root"
    return text


def _printable(text: str) -> str:
    # A name read from /dev/shm may hold bytes that are not UTF-8 (kept as surrogates by Python).
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _shown(text: str) -> str:
    """``text`` from outside (a file name, a recording, a header) safe to print in a Rich table."""
    # Brackets would be read as Rich markup: hidden text, or a MarkupError for a stray "[/x]".
    return escape(_printable(text))


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
@one_line_errors
def list_command(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every block: owner pid and whether it is alive, dtype, shape, iteration, last publish, size."""
    infos = registry.list_blocks()
    if as_json:
        rows = [asdict(i) | {"name": _printable(i.name), "stale": i.stale} for i in infos]
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"simbridge blocks and rings in {SHM_DIR}")
    table.add_column("name", overflow="fold")
    for col in (
        "kind",
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
            _shown(i.name if i.error is None else f"{i.name} ({i.error})"),
            i.kind,
            str(i.owner_pid or "-"),
            "yes" if i.alive else "[red]no[/red]",
            i.state,
            i.dtype or "-",
            str(i.shape) if i.shape is not None else "-",
            str(i.iteration) if i.iteration is not None else (f"{i.commit} pushed" if i.ring else "-"),
            _age(i.last_publish),
            _size(i.size),
        )
    _console().print(table if infos else "no simbridge blocks")


@app.command("inspect")
@one_line_errors
def inspect_command(name: str) -> None:
    """Show a block's header and min/max/mean/NaN count of its latest iteration, or a ring's counters."""
    info = registry.block_info(name)
    if info is not None and info.kind == "ring":
        _inspect_ring(name)
        return
    if info is not None and info.state == "invalid":
        raise _fail(
            f"block {name!r} cannot be inspected: {info.error}; it is not a block of this simbridge "
            f"version, is damaged, or is not yours — `simbridge shm rm {name}` removes it if unneeded"
        )
    with Block.open(name, timeout=0) as block:
        header = block.header()
        table = Table(title=f"block {name}", show_header=False)
        for key, value in header.items():
            if key != "slots":
                table.add_row(key, hex(value) if key == "magic" else _shown(str(value)))
        table.add_row("writer alive", str(block.writer_alive()))
        for index, slot in enumerate(header["slots"]):
            table.add_row(f"slot {index}", ", ".join(f"{k}={v}" for k, v in slot.items()))
        problem = None
        try:
            snap = block.read(timeout=0)
        except Timeout:
            table.add_row("latest", "nothing published yet")
        except PeerGone as exc:  # closed or dead before its first publish
            table.add_row("latest", _shown(f"nothing published ({exc})"))
        except Corrupted as exc:
            table.add_row("latest", "[red]corrupted: its payload does not match its checksum[/red]")
            problem = exc
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
    if problem is not None:
        raise _fail(
            f"block {name!r}: the latest iteration is corrupted ({problem}); its writer or a peer "
            "wrote into the segment outside the protocol — restart the writer"
        )


def _inspect_ring(name: str) -> None:
    header = inspect_ring(name)
    table = Table(title=f"ring {name}", show_header=False)
    for key, raw in header.items():
        value = raw
        if key == "magic":
            value = hex(raw)
        elif key == "descr":
            value = raw.decode("ascii", "replace") or "-"
        table.add_row(key, _shown(str(value)))
    queued = (header["tail"] - header["head"]) % 2**64
    unit = "bytes" if header["mode"] == "variable" else "records"
    table.add_row("queued", f"{queued} of {header['capacity']} {unit}")
    _console().print(table)


@app.command("rm")
@one_line_errors
def remove_command(
    name: str,
    force: Annotated[bool, typer.Option(help="Remove even if the owner is alive.")] = False,
) -> None:
    """Remove a block (its owner must be gone unless --force)."""
    registry.remove(name, force=force)
    _console().print(f"removed {name}")


@app.command("clean")
@one_line_errors
def clean_command(
    prefix: Annotated[str, typer.Option(help="Only blocks whose name starts with this.")] = "",
) -> None:
    """Remove stale blocks only: dead owner, previous boot, or abandoned while being created."""
    report = registry.clean(prefix=prefix)
    for info in report.removed:
        _console().print(f"removed {info.name} (owner pid {info.owner_pid}, {info.state})")
    _console().print(f"{len(report.removed)} stale block(s) removed")
    if report.failed:
        reasons = "; ".join(f"{_shown(name)}: {why}" for name, why in report.failed)
        raise _fail(f"{len(report.failed)} stale block(s) could not be removed: {reasons}")


@app.command("include")
@one_line_errors
def include_command() -> None:
    """Print the directory holding simbridge/shm.h, for `cc -I"$(simbridge shm include)" peer.c`."""
    from simbridge.shm.headers import get_include

    typer.echo(str(get_include()))


@app.command("diff")
@one_line_errors
def diff_command(folder: Annotated[str, typer.Argument(metavar="DIRECTORY")]) -> None:
    """Compare recorded sends and receives; exit 1 if any received checksum differs from the sent one."""
    # Taken as text, so that a NUL byte is this command's one-line error rather than a usage box.
    directory = Path(folder.replace("\x00", "\\x00"))
    if "\x00" in folder or not directory.is_dir():
        raise _fail(f"{directory} is not a directory; give the folder passed as record=", code=2)
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
                _shown(sent["name"]),
                str(sent["iteration"]),
                str(sent["commit"]),
                f"{sent['checksum']:08x}",
                f"{got['checksum']:08x}",
                _shown(sent["file"]),
                _shown(got["file"]),
            )
        _console().print(table)
        raise typer.Exit(1)


def _byte_size(text: str) -> int | None:
    """``64MiB``, ``500k``, ``1000000`` or ``none`` as bytes (None: no size limit)."""
    units = {
        "": 1,
        "b": 1,
        "k": 2**10,
        "kb": 10**3,
        "kib": 2**10,
        "m": 2**20,
        "mb": 10**6,
        "mib": 2**20,
        "g": 2**30,
        "gb": 10**9,
        "gib": 2**30,
    }
    cleaned = text.strip().lower()
    if cleaned in ("none", "0", ""):
        return None
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number) :]
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise _fail(f"--rotate-size {text!r} is not a size like 64MiB, 500k or 1000000", code=2) from None
    if not 1 <= value < 2**62:
        raise _fail(f"--rotate-size {text!r} must be at least one byte", code=2)
    return int(value)


@app.command("record")
@one_line_errors
def record_command(
    *,
    ring: Annotated[
        str, typer.Argument(metavar="RING", help="The ring to consume (this becomes its consumer).")
    ],
    directory: Annotated[Path, typer.Argument(metavar="DIR", help="Where the Parquet files go (created).")],
    rotate_size: Annotated[
        str, typer.Option(help="Start a new file past this size (e.g. 64MiB; none).")
    ] = "64MiB",
    rotate_seconds: Annotated[
        float, typer.Option(min=0, help="Start a new file after this long (0: never).")
    ] = 3600.0,
    compression: Annotated[str, typer.Option(help="zstd, snappy, gzip, lz4, brotli or none.")] = "zstd",
    prefix: Annotated[str, typer.Option(help="File names are PREFIX-NNNNNN.parquet.")] = "",
    flush_seconds: Annotated[
        float, typer.Option(min=0.01, help="Flush a row group at least this often.")
    ] = 0.5,
    flush_rows: Annotated[
        int, typer.Option(min=1, help="Flush a row group at most this many rows.")
    ] = 65_536,
    exchange_ts_offset: Annotated[
        int | None, typer.Option(min=0, help="Variable records: byte offset of an int64 exchange time (ns).")
    ] = None,
    open_timeout: Annotated[float, typer.Option(min=0, help="Wait this long for the ring to appear.")] = 0.0,
) -> None:
    """Record a ring into rotating, crash-safe Parquet files until Ctrl-C, SIGTERM or its producer ends."""
    import signal
    import threading

    from simbridge.shm.parquet import ParquetRecorder, open_ring

    rotate_bytes = _byte_size(rotate_size)  # a usage error before anything is opened
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with open_ring(ring, timeout=open_timeout) as source:
            recorder = ParquetRecorder(
                source,
                directory,
                prefix=prefix or _file_prefix(ring),
                rotate_bytes=rotate_bytes,
                rotate_seconds=rotate_seconds or None,
                compression=compression,
                flush_interval_s=flush_seconds,
                flush_rows=flush_rows,
                exchange_ts_offset=exchange_ts_offset,
            )
            for item in recorder.summary.recovered:
                _console().print(
                    f"recovered {item.path.name}: {item.action}, {item.rows} rows ({item.detail})"
                )
            summary = recorder.run(stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    typer.echo(
        f"recorded {summary.rows} rows into {len(summary.files)} file(s) in {directory} "
        f"(stopped: {summary.stopped_by})"
    )


def _file_prefix(ring: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in ring)[:100] or "stream"


@demo_app.command("blocks")
@one_line_errors
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
        raise _fail("some round trips returned a wrong result; see the table above")
