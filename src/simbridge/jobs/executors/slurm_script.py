"""The batch script of a Slurm job (one beam) or job array (many), and where its files live.

The script follows the local executor's marker protocol: it runs the argv (each word quoted,
never re-parsed), then writes ``exit N`` or ``signal N`` to the attempt's exit marker through a
temporary name and a rename, so a reader never sees a torn marker. It also records the host and
start time in the job's stdout. An array's script carries its manifest inline, one ``case`` arm
per index (the beam folder, log files, token, environment and argv of that element): sbatch
stores the script with the job, so the manifest can never be torn, lost or out of step with it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from simbridge.jobs.errors import RemotePathError
from simbridge.jobs.executors.base import TOKEN_ENV, LaunchSpec

# Variables the cluster sets for the job itself: a local GPU lease's CUDA_VISIBLE_DEVICES must
# never override the GPUs Slurm gave the job.
_SCHEDULER_OWNED = re.compile(r"^(CUDA_VISIBLE_DEVICES|GPU_DEVICE_ORDINAL|ROCR_VISIBLE_DEVICES|SLURM_.*)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LOGS_DIR = ".logs"  # beside the beam folders of a case; no case or beam key starts with '.'


@dataclass(frozen=True)
class RemoteAttempt:
    """Where one attempt's files live on the cluster."""

    cwd: PurePosixPath
    prefix: PurePosixPath

    @property
    def stdout(self) -> PurePosixPath:
        """The job's standard output."""
        return self.prefix.with_name(self.prefix.name + ".out")

    @property
    def stderr(self) -> PurePosixPath:
        """The job's standard error."""
        return self.prefix.with_name(self.prefix.name + ".err")

    @property
    def exit_file(self) -> PurePosixPath:
        """The exit marker (``exit N`` / ``signal N``)."""
        return self.prefix.with_name(self.prefix.name + ".exit")


def confined(root: PurePosixPath, path: PurePosixPath, what: str) -> PurePosixPath:
    """``path`` if it lies strictly below ``root`` (lexically, no ``..``), else RemotePathError."""
    if not path.is_absolute() or ".." in path.parts or "." in path.parts:
        raise RemotePathError(f"{what} {str(path)!r} is not an absolute path without '..'")
    try:
        rel = path.relative_to(root)
    except ValueError:
        raise RemotePathError(f"{what} {str(path)!r} is outside remote_root {str(root)!r}") from None
    if not rel.parts:
        raise RemotePathError(f"{what} {str(path)!r} is remote_root itself, not a folder below it")
    return path


def remote_attempt(root: PurePosixPath, spec: LaunchSpec) -> RemoteAttempt:
    """The cluster-side files of ``spec``: ``{case}/.logs/{beam}/{step}-{n}.{out,err,exit}``.

    The logs sit beside the beam folder, not in it: output patterns and cleanup of the beam
    folder never touch them.
    """
    cwd = confined(root, PurePosixPath(str(spec.cwd)), "beam folder")
    logs = root / LOGS_DIR / cwd.name if cwd.parent == root else cwd.parent / LOGS_DIR / cwd.name
    name = spec.log_prefix.name
    if not name or name in {".", ".."} or "/" in name:
        raise RemotePathError(f"log prefix {name!r} is not a plain file name")
    return RemoteAttempt(cwd=cwd, prefix=confined(root, logs / name, "log prefix"))


def _env_words(env: Mapping[str, str], token: str) -> list[str]:
    words = [f"{TOKEN_ENV}={token}"]
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise RemotePathError(f"environment name {key!r} is not a shell variable name")
        if not _SCHEDULER_OWNED.match(key):
            words.append(f"{key}={value}")
    return words


_PRELUDE = """#!/bin/bash
# simbridge job script: run one beam's command, then write its exit marker atomically.
set -u
"""

_RUN = """
mark() {
    part="$exit_file.part.${SLURM_JOB_ID:-0}"
    printf '%s\\n' "$1" > "$part" && mv -f -- "$part" "$exit_file"
}
printf 'simbridge: host %s start %s job %s\\n' "$(hostname)" "$(date +%s)" "${SLURM_JOB_ID:-?}"
if ! cd -- "$cwd"; then
    mark "exit 127"
    exit 127
fi
export "${envs[@]}"
"${argv[@]}" </dev/null
rc=$?
# bash reports a child killed by signal N as 128+N; the marker says which it was.
if [ "$rc" -gt 128 ] && [ "$rc" -le 192 ]; then
    mark "signal $((rc - 128))"
else
    mark "exit $rc"
fi
printf 'simbridge: end %s rc %s\\n' "$(date +%s)" "$rc"
exit "$rc"
"""


def _arm(attempt: RemoteAttempt, spec: LaunchSpec) -> str:
    """The shell assignments of one element: folder, marker, logs, environment, argv."""
    q = shlex.quote
    if not spec.argv:
        raise RemotePathError("empty command: nothing to run")
    return (
        f"cwd={q(str(attempt.cwd))}; exit_file={q(str(attempt.exit_file))}; "
        f"out={q(str(attempt.stdout))}; err={q(str(attempt.stderr))}\n"
        f"    envs=({' '.join(q(w) for w in _env_words(spec.env, spec.token))})\n"
        f"    argv=({' '.join(q(w) for w in spec.argv)})"
    )


def single_script(attempt: RemoteAttempt, spec: LaunchSpec) -> str:
    """The script of one job (sbatch sends its output to the attempt's files itself)."""
    return _PRELUDE + _arm(attempt, spec).replace("\n    ", "\n") + "\n" + _RUN


def array_script(elements: Sequence[tuple[RemoteAttempt, LaunchSpec]]) -> str:
    """The script of a job array: the manifest (one arm per index), then the common run."""
    arms = [f"{i})\n    {_arm(attempt, spec)}\n    ;;" for i, (attempt, spec) in enumerate(elements)]
    return (
        _PRELUDE
        + 'case "${SLURM_ARRAY_TASK_ID:-}" in\n'
        + "\n".join(arms)
        + '\n*)\n    echo "simbridge: no manifest entry for index ${SLURM_ARRAY_TASK_ID:-?}" >&2\n'
        + "    exit 2\n    ;;\nesac\n"
        # Each element writes into its own beam's log files, not the array's.
        + 'exec >>"$out" 2>>"$err"\n'
        + _RUN
    )
