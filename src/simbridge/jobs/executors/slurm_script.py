"""What a Slurm job runs: the attempt's ``run.sh`` (runscript.py), and for a job array its manifest.

A single job's batch script is the attempt's rendered run.sh itself, sent to sbatch on stdin; it
writes the exit marker (``exit N`` / ``signal N``, via a temporary name and a rename), SUCCESS or
FAILED, and the host/start/exit record, the same protocol as the local executor. An array's
elements each get their run.sh written under the beam's attempts folder; the array's manifest
(one ``index<TAB>run.sh`` line per element) and its small batch script live in
``{remote_root}/.arrays/{name}/``, all written by one ``tar -x`` from stdin.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import RemotePathError, RunScriptError
from simbridge.jobs.executors.base import LaunchSpec
from simbridge.jobs.executors.runscript import (
    AttemptFiles,
    attempt_files,
    confined,
    load_template,
    render_run_script,
)

# Variables the cluster sets for the job itself: a local GPU lease's CUDA_VISIBLE_DEVICES must
# never override the GPUs Slurm gave the job.
_SCHEDULER_OWNED = re.compile(r"^(CUDA_VISIBLE_DEVICES|GPU_DEVICE_ORDINAL|ROCR_VISIBLE_DEVICES|SLURM_.*)$")

ARRAY_SCRIPT = """#!/bin/bash
# simbridge job array: element i runs the run.sh the manifest names for it, with its own logs.
set -u
i=${SLURM_ARRAY_TASK_ID:?not an array element}
script=$(awk -F '\\t' -v i="$i" '$1 == i { print $2; exit }' manifest)
if [ -z "$script" ]; then
    echo "simbridge: no manifest entry for index $i" >&2
    exit 2
fi
exec bash -- "$script" >>"${script%.sh}.out" 2>>"${script%.sh}.err"
"""


def job_env(settings: ClusterSettings, env: Mapping[str, str]) -> dict[str, str]:
    """The cluster's env, then the launch's, without what Slurm sets for the job itself."""
    merged = {**settings.env, **env}
    return {k: v for k, v in merged.items() if not _SCHEDULER_OWNED.match(k)}


def remote_files(root: PurePosixPath, spec: LaunchSpec) -> tuple[PurePosixPath, AttemptFiles]:
    """The beam's folder (confined to ``root``) and the attempt's files on the cluster."""
    cwd = confined(root, PurePosixPath(str(spec.cwd)))
    return cwd, attempt_files(root, spec.log_prefix)


def run_script(settings: ClusterSettings, spec: LaunchSpec, cwd: PurePosixPath, files: AttemptFiles) -> str:
    """The attempt's rendered run.sh (the template of ``run_template``, or the built-in one)."""

    return render_run_script(
        remote_root=settings.remote_root,
        files=files,
        token=spec.token,
        argv=spec.argv,
        workdir=cwd,
        env=job_env(settings, spec.env),
        template=load_template(settings.run_template),
    )


def array_bundle(
    settings: ClusterSettings,
    folder: PurePosixPath,
    elements: Sequence[tuple[LaunchSpec, PurePosixPath, AttemptFiles]],
) -> bytes:
    """A tar (paths relative to remote_root) of every element's run.sh, the manifest, the script."""
    root = settings.remote_root
    confined(root, folder)
    buffer = io.BytesIO()
    manifest = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for index, (spec, cwd, files) in enumerate(elements):
            text = run_script(settings, spec, cwd, files)
            _add(tar, root, files.script, text.encode(), 0o755)
            if "\t" in str(files.script) or "\n" in str(files.script):
                raise RemotePathError(f"remote path {str(files.script)!r} holds a tab or newline")
            manifest.append(f"{index}\t{files.script}\n")
        _add(tar, root, folder / "manifest", "".join(manifest).encode(), 0o644)
        _add(tar, root, folder / "array.sh", ARRAY_SCRIPT.encode(), 0o755)
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, root: PurePosixPath, path: PurePosixPath, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(str(confined(root, path).relative_to(root)))
    info.size, info.mode = len(data), mode
    tar.addfile(info, io.BytesIO(data))


__all__ = ["ARRAY_SCRIPT", "RunScriptError", "array_bundle", "job_env", "remote_files", "run_script"]
