"""Parsers of what Slurm's commands print: sbatch, squeue, sacct, scontrol.

Everything here is text from another program: each parser accepts exactly the shape it asked for
(the format strings below are the ones the executor passes) and raises
:class:`~simbridge.jobs.errors.SchedulerError` on anything else, never guessing a job id or a state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from simbridge.jobs.errors import SchedulerError

# `sbatch --parsable` prints ``jobid`` or ``jobid;cluster``.
_SBATCH = re.compile(r"^(\d{1,18})(?:;([A-Za-z0-9_.-]{1,128}))?$")
# A job id as squeue/sacct/scontrol print it for one job or one array element.
JOB_ID = re.compile(r"^\d{1,18}(?:_\d{1,9})?$")
_STATE = re.compile(r"^[A-Z_]{1,32}$")
# The formats the executor asks for, fields separated by '|' with the free text last.
SQUEUE_FORMAT = "%i|%T|%r"
SQUEUE_FIND_FORMAT = "%i|%T|%k"
SACCT_FIELDS = "JobID,State,ExitCode,Reason"
_MAX_LINES = 1_000_000

# Slurm job states that mean "not ended yet" (the job holds or waits for resources).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "STOPPED",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)
# Ended states with a name of their own: each is a failure reason people can act on.
NAMED_FAILURES = frozenset(
    {
        "TIMEOUT",
        "OUT_OF_MEMORY",
        "NODE_FAIL",
        "PREEMPTED",
        "CANCELLED",
        "FAILED",
        "BOOT_FAIL",
        "DEADLINE",
        "REVOKED",
    }
)
ENDED_STATES = NAMED_FAILURES | {"COMPLETED"}


@dataclass(frozen=True)
class SlurmJob:
    """One job (or array element) as the scheduler reports it."""

    job_id: str
    state: str
    reason: str = ""
    exit_code: int | None = None
    signal: int | None = None
    comment: str = ""

    @property
    def active(self) -> bool:
        """Still pending or running (or on its way out)."""
        return self.state in ACTIVE_STATES


def parse_sbatch(text: str) -> tuple[str, str | None]:
    """``(job_id, cluster)`` from ``sbatch --parsable``; anything else is a SchedulerError."""
    line = text.strip()
    match = _SBATCH.match(line)
    if match is None:
        raise SchedulerError(f"sbatch printed {line[:200]!r}, not a job id")
    return match.group(1), match.group(2)


def _state(word: str, line: str) -> str:
    # sacct prints "CANCELLED by 1000"; squeue/scontrol print the bare state.
    state = word.split(" ", 1)[0].rstrip("+")
    if not _STATE.match(state):
        raise SchedulerError(f"bad Slurm state {word[:40]!r} in {line[:200]!r}")
    return state


def _job_id(word: str, line: str) -> str:
    if not JOB_ID.match(word):
        raise SchedulerError(f"bad Slurm job id {word[:40]!r} in {line[:200]!r}")
    return word


def _lines(text: str) -> Iterable[str]:
    lines = text.splitlines()
    if len(lines) > _MAX_LINES:
        raise SchedulerError(f"Slurm printed {len(lines)} lines; more than {_MAX_LINES} is not believed")
    return (line for line in lines if line.strip())


def parse_squeue(text: str) -> dict[str, SlurmJob]:
    """Jobs by id from ``squeue --noheader --array -o '%i|%T|%r'``.

    A pending array that squeue did not expand (``123_[0-9%2]``) is kept under that id, so the
    caller can see it exists; its elements appear one per line once expanded.
    """
    jobs: dict[str, SlurmJob] = {}
    for line in _lines(text):
        parts = line.split("|", 2)
        if len(parts) != 3:
            raise SchedulerError(f"squeue line {line[:200]!r} is not id|state|reason")
        raw_id, state, reason = (p.strip() for p in parts)
        job_id = raw_id if re.match(r"^\d{1,18}_\[[0-9,%\-]{1,200}\]$", raw_id) else _job_id(raw_id, line)
        jobs[job_id] = SlurmJob(job_id, _state(state, line), "" if reason == "None" else reason)
    return jobs


def parse_squeue_find(text: str) -> list[SlurmJob]:
    """Jobs (with their comment) from ``squeue --noheader --array -o '%i|%T|%k'``."""
    found = []
    for line in _lines(text):
        parts = line.split("|", 2)
        if len(parts) != 3:
            raise SchedulerError(f"squeue line {line[:200]!r} is not id|state|comment")
        raw_id, state, comment = (p.strip() for p in parts)
        found.append(SlurmJob(_job_id(raw_id, line), _state(state, line), comment=comment))
    return found


def parse_exit_code(text: str, line: str = "") -> tuple[int, int]:
    """Slurm's ``code:signal`` pair."""
    match = re.match(r"^(\d{1,3}):(\d{1,3})$", text)
    if match is None:
        raise SchedulerError(f"bad Slurm exit code {text[:40]!r} in {line[:200] or text[:200]!r}")
    code, sig = int(match.group(1)), int(match.group(2))
    if code > 255 or sig > 127:
        raise SchedulerError(f"Slurm exit code {text!r} is out of range")
    return code, sig


def _job(
    job_id: str, state: str, exit_code: str | None, reason: str, line: str, *, comment: str = ""
) -> SlurmJob:
    code = sig = None
    if exit_code:
        code, sig = parse_exit_code(exit_code, line)
    return SlurmJob(
        job_id,
        state,
        "" if reason in {"None", "(null)"} else reason,
        code,
        sig or None,
        comment,
    )


def parse_sacct(text: str) -> dict[str, SlurmJob]:
    """Jobs by id from ``sacct --noheader --parsable2 -X -o JobID,State,ExitCode,Reason``.

    A job requeued has several records; the last one is the one in force.
    """
    jobs: dict[str, SlurmJob] = {}
    for line in _lines(text):
        parts = line.split("|", 3)
        if len(parts) != 4:
            raise SchedulerError(f"sacct line {line[:200]!r} is not JobID|State|ExitCode|Reason")
        raw_id, state, exit_code, reason = parts
        job_id = _job_id(raw_id.strip(), line)
        jobs[job_id] = _job(job_id, _state(state.strip(), line), exit_code.strip(), reason.strip(), line)
    return jobs


_KEY = re.compile(r"(?:^|\s)(JobId|ArrayJobId|ArrayTaskId|JobState|Reason|ExitCode|Comment)=(\S*)")


def parse_scontrol_jobs(text: str) -> dict[str, SlurmJob]:
    """Jobs by id (``123`` or ``123_4``) from ``scontrol --oneliner show job``.

    The first occurrence of each key counts: a key only appears once in a record, and the job
    name (free text, before every key read here but JobId) is ours.
    """
    jobs: dict[str, SlurmJob] = {}
    for line in _lines(text):
        if line.startswith("No jobs in the system"):
            continue
        found: dict[str, str] = {}
        for match in _KEY.finditer(line):
            found.setdefault(match.group(1), match.group(2))
        if "JobId" not in found or "JobState" not in found:
            raise SchedulerError(f"scontrol line {line[:200]!r} has no JobId/JobState")
        job_id = _job_id(found["JobId"], line)
        array, task = found.get("ArrayJobId"), found.get("ArrayTaskId")
        if array and task and task.isdigit():
            job_id = f"{_job_id(array, line)}_{task}"
        jobs[job_id] = _job(
            job_id,
            _state(found["JobState"], line),
            found.get("ExitCode"),
            found.get("Reason", ""),
            line,
            comment=found.get("Comment", ""),
        )
    return jobs


def parse_config(text: str) -> dict[str, str]:
    """``Key = value`` lines of ``scontrol show config``."""
    config: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and " " not in key.strip():
            config[key.strip()] = value.strip()
    return config


def max_array_size(config: Mapping[str, str]) -> int:
    """The cluster's MaxArraySize (the highest index is one less); Slurm's default 1001."""
    raw = config.get("MaxArraySize", "1001")
    if not raw.isdigit() or not 1 <= int(raw) <= 4_000_001:
        raise SchedulerError(f"scontrol show config: MaxArraySize={raw[:40]!r} is not a size")
    return int(raw)


def has_accounting(config: Mapping[str, str]) -> bool:
    """Whether sacct can answer (an accounting storage other than none)."""
    kind = config.get("AccountingStorageType", "accounting_storage/none")
    return kind not in {"", "accounting_storage/none", "(null)"}


def parse_marker(data: bytes) -> tuple[str, int] | None:
    """``('exit', N)`` or ``('signal', N)`` from an exit marker; None if missing, torn or garbage."""
    if not data.endswith(b"\n") or len(data) > 64:
        return None
    kind, _, number = data.strip().partition(b" ")
    if not number:
        kind, number = b"exit", kind
    if not number.isdigit() or len(number) > 3:
        return None
    value = int(number)
    if kind == b"exit" and value <= 255:
        return "exit", value
    if kind == b"signal" and 1 <= value <= 127:
        return "signal", value
    return None
