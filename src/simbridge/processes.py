"""What is known of a process: its /proc record (start time, state, group), and the words people are
told about it (how it ended, the tail of its log, how long it ran).

One home for these (the jobs pipeline and its lease, the GPU locks, the CLI, the dashboard and the
demos use them); a leaf that imports nothing else of simbridge.
"""

from __future__ import annotations

import signal
from pathlib import Path

LOG_TAIL_LINES = 20


def proc_stat(pid: int) -> tuple[int, str, int, int] | None:
    """(start time in clock ticks since boot, state letter, parent pid, process group) of a pid,
    or None when there is no such process (or no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ')': split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[19]), fields[0], int(fields[1]), int(fields[2])


def proc_start_time(pid: int) -> tuple[int, str] | None:
    """(start time in clock ticks since boot, state letter) of a pid, or None."""
    info = proc_stat(pid)
    return None if info is None else (info[0], info[1])


# Read at most this much of a log's end: a tail must stay cheap however large the log grew.
_TAIL_BYTES = 16384


def signal_name(signum: int) -> str:
    """``SIGKILL`` for 9; ``signal 77`` for a number no signal has."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def end_text(code: int | None) -> str:
    """How a process ended, from a return code where a negative one is a signal (``-9``).

    The Popen convention, kept in the jobs store too: exit codes are 0..255, so a signal death
    never reads as an exit code (no 137 for a SIGKILL).
    """
    if code is None:
        return "ended without an exit code"
    if code < 0:
        return f"killed by {signal_name(-code)}"
    return f"exited {code}"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` non-blank-trailing lines of a log file ('' if there is none)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - _TAIL_BYTES))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def last_line(text: str, width: int = 200) -> str:
    """The last non-blank line of ``text``, cut to ``width`` characters ('' if none)."""
    for raw in reversed(text.splitlines()):
        line = raw.strip()
        if line:
            return line if len(line) <= width else line[: width - 1] + "…"
    return ""


def elapsed_text(seconds: float | None) -> str:
    """A duration for a table cell: ``4.2s``, ``3m07s``, ``2h05m`` (``-`` when unknown)."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
