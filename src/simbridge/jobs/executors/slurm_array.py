"""Job arrays: many ready beams of one cluster submitted with one ``sbatch --array=0-N%T``.

One sbatch (and one scheduler RPC) per array instead of one per beam; an array larger than the
cluster's MaxArraySize (read once from ``scontrol show config``) is split. Each beam keeps its
element's ``{jobid}_{index}`` as its job id, and find/poll/cancel work per element. The manifest
(index -> the element's run.sh, which holds its beam folder, argv and environment) is written
with every run.sh in the same command as sbatch (slurm_script.array_bundle). Before sbatch each
element's intent file names the array's unique name, its batch token (the Slurm comment) and
the element's index: a crash between sbatch and the store's write is adopted element by element.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from simbridge.jobs.errors import LaunchError, RemotePathError, RunScriptError
from simbridge.jobs.executors.base import Launched, LaunchSpec
from simbridge.jobs.executors.runscript import AttemptFiles
from simbridge.jobs.executors.slurm_intent import Intent, array_folder, write_intent
from simbridge.jobs.executors.slurm_script import array_bundle, remote_files
from simbridge.logs import get_logger

if TYPE_CHECKING:
    from simbridge.jobs.executors.slurm import SlurmExecutor

log = get_logger(__name__)


def chunks(count: int, size: int) -> list[range]:
    """Index ranges of at most ``size`` elements covering ``range(count)``."""
    if size < 1:
        raise ValueError(f"array size {size} < 1")
    return [range(start, min(count, start + size)) for start in range(0, count, size)]


def submit_many(executor: SlurmExecutor, specs: Sequence[LaunchSpec]) -> list[Launched | LaunchError]:
    """Submit ``specs``; one result per spec, in order: its Launched, or why it failed.

    Below ``slurm.array_min`` beams (or with ``slurm.arrays`` off) each is its own job.
    """
    settings = executor.settings.slurm
    if not specs:
        return []
    if not settings.arrays or len(specs) < settings.array_min:
        return [_one(executor, spec) for spec in specs]
    results: list[Launched | LaunchError | None] = [None] * len(specs)
    good: list[tuple[int, LaunchSpec, PurePosixPath, AttemptFiles]] = []
    for i, spec in enumerate(specs):
        try:
            cwd, files = remote_files(executor.root, spec)
        except (RemotePathError, RunScriptError) as exc:
            results[i] = LaunchError(str(exc))
            continue
        good.append((i, spec, cwd, files))
    for part in chunks(len(good), executor.max_array_size):
        elements = [good[k] for k in part]
        try:
            launched = _array(executor, [(spec, cwd, files) for _, spec, cwd, files in elements])
        except LaunchError as exc:
            for i, *_ in elements:
                results[i] = exc
            continue
        for (i, *_), one in zip(elements, launched, strict=True):
            results[i] = one
    return [r if r is not None else LaunchError("not submitted") for r in results]


def _one(executor: SlurmExecutor, spec: LaunchSpec) -> Launched | LaunchError:
    try:
        return executor.submit(spec)
    except LaunchError as exc:
        return exc


def _array(
    executor: SlurmExecutor, elements: Sequence[tuple[LaunchSpec, PurePosixPath, AttemptFiles]]
) -> list[Launched]:
    """One sbatch for ``elements`` (at most MaxArraySize of them)."""
    batch = f"sb-array-{uuid.uuid4().hex}"
    name = f"simbridge_array_{batch[-16:]}"
    q = shlex.quote
    root = executor.root
    try:
        folder = array_folder(root, name)
        bundle = array_bundle(executor.settings, folder, elements)
    except (RemotePathError, RunScriptError) as exc:
        raise LaunchError(str(exc)) from exc
    intents = []
    for index, (spec, cwd, files) in enumerate(elements):
        intent = Intent(name=name, comment=batch, cwd=str(cwd), prefix=str(files.prefix), index=index)
        write_intent(spec.log_prefix, intent)
        intents.append(intent)
    parallel = executor.settings.slurm.array_parallel
    span = f"0-{len(elements) - 1}" + (f"%{parallel}" if parallel else "")
    words = executor.sbatch_words(
        name=name,
        comment=batch,
        chdir=str(folder),
        output=str(folder / "%a.out"),
        error=str(folder / "%a.err"),
    )
    words[2:2] = [f"--array={span}"]
    words.append(str(folder / "array.sh"))
    folders = sorted({str(files.folder) for _, _, files in elements} | {str(folder)})
    prepare = [
        "mkdir -p -- " + " ".join(q(f) for f in folders),
        "rm -f -- " + " ".join(q(str(files.exit_file)) for _, _, files in elements),
        f"tar -x --no-same-owner -f - -C {q(str(root))}",
    ]
    array_id = executor.sbatch(words, bundle, base=folder / "submit", prepare=prepare)
    launched = []
    for index, ((spec, _, _), intent) in enumerate(zip(elements, intents, strict=True)):
        job_id = f"{array_id}_{index}"
        executor.remember(spec, replace(intent, job_id=job_id))
        launched.append(Launched(job_id=job_id))
    log.info("slurm.array_submitted", cluster=executor.name, job_id=array_id, elements=len(elements))
    return launched
