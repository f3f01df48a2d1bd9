"""The local intent file of a Slurm attempt: what we told Slurm, written before ``sbatch``.

It sits next to the attempt's local log prefix and holds the job's unique name, the token sent
as its Slurm comment, its array index and its files on the cluster; the job id is added right
after sbatch. After a crash it is how a job is found again (by name + comment) and never
submitted twice. It is read back as untrusted bytes: every field is checked before use.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from simbridge.jobs.errors import RemotePathError, SchedulerError
from simbridge.jobs.executors.base import log_file
from simbridge.jobs.executors.runscript import AttemptFiles, confined

INTENT_SUFFIX = ".slurm"
ARRAYS_DIR = ".arrays"  # under remote_root: each array's manifest, script, claim and Slurm's own logs


@dataclass(frozen=True)
class Intent:
    """What we told Slurm about one attempt, kept locally so a restart can find the job."""

    name: str
    comment: str
    cwd: str
    prefix: str
    index: int | None = None
    job_id: str | None = None

    @property
    def remote(self) -> AttemptFiles:
        """The attempt's files on the cluster."""
        return AttemptFiles(PurePosixPath(self.prefix))


def array_folder(root: PurePosixPath, name: str) -> PurePosixPath:
    """The cluster folder of the job array named ``name``."""
    return confined(root, PurePosixPath(ARRAYS_DIR, name))


def submit_base(root: PurePosixPath, intent: Intent) -> PurePosixPath:
    """Where the attempt's submit claim lives on the cluster (slurm_submit.py): the attempt's own
    prefix for a single job, the array's folder for an element (one sbatch for all of them)."""
    if intent.index is None:
        return confined(root, PurePosixPath(intent.prefix))
    return array_folder(root, intent.name) / "submit"


def intent_file(log_prefix: Path) -> Path:
    """The local intent file of an attempt."""
    return log_file(log_prefix, INTENT_SUFFIX)


def write_intent(log_prefix: Path, intent: Intent) -> None:
    """Write the intent atomically (a crash leaves the old one or the new one, never half)."""
    path = intent_file(log_prefix)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(json.dumps(intent.__dict__))
    os.replace(tmp, path)


def read_intent(log_prefix: Path, root: PurePosixPath) -> Intent | None:
    """The attempt's intent; None if there is none. Every field is checked before use."""
    try:
        data: Any = json.loads(intent_file(log_prefix).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise SchedulerError(f"intent file of {log_prefix} is unreadable: {exc}") from exc
    try:
        intent = Intent(
            name=str(data["name"]),
            comment=str(data["comment"]),
            cwd=str(data["cwd"]),
            prefix=str(data["prefix"]),
            index=None if data.get("index") is None else int(data["index"]),
            job_id=None if data.get("job_id") is None else str(data["job_id"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise SchedulerError(f"intent file of {log_prefix} is malformed: {exc}") from exc
    try:
        confined(root, PurePosixPath(intent.cwd))
        confined(root, PurePosixPath(intent.prefix))
        submit_base(root, intent)
    except RemotePathError as exc:
        raise SchedulerError(f"intent file of {log_prefix}: {exc}") from exc
    if intent.index is not None and not 0 <= intent.index < 4_000_001:
        raise SchedulerError(f"intent file of {log_prefix}: array index {intent.index} out of range")
    return intent
