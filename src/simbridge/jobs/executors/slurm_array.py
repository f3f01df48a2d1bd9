"""Job arrays: many ready beams of one cluster submitted with one ``sbatch --array=0-N%T``.

One sbatch (and one scheduler RPC) per array instead of one per beam; an array larger than the
cluster's MaxArraySize (read once from ``scontrol show config``) is split. Each beam keeps its
element's ``{jobid}_{index}`` as its job id, and find/poll/cancel work per element. The manifest
(index -> beam folder, log files, environment, argv) is the array's job script itself
(slurm_script.array_script). Before sbatch every element's intent file names the array job's
unique name, its batch token (the Slurm comment) and the element's index, so a crash between
sbatch and the store's write is adopted element by element, never submitted again.
"""

from __future__ import annotations

import shlex
import uuid
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from simbridge.jobs.errors import LaunchError, RemotePathError
from simbridge.jobs.executors.base import Launched, LaunchSpec
from simbridge.jobs.executors.slurm_intent import Intent, write_intent
from simbridge.jobs.executors.slurm_script import RemoteAttempt, array_script, remote_attempt
from simbridge.logs import get_logger

if TYPE_CHECKING:
    from simbridge.jobs.executors.slurm import SlurmExecutor

log = get_logger(__name__)

ARRAYS_DIR = ".arrays"  # under remote_root: Slurm's own per-element output (its kill notices)


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
    good: list[tuple[int, RemoteAttempt, LaunchSpec]] = []
    for i, spec in enumerate(specs):
        try:
            good.append((i, remote_attempt(executor.root, spec), spec))
        except RemotePathError as exc:
            results[i] = LaunchError(str(exc))
    for part in chunks(len(good), executor.max_array_size):
        elements = [good[k] for k in part]
        try:
            launched = _array(executor, elements)
        except LaunchError as exc:
            for i, _, _ in elements:
                results[i] = exc
            continue
        for (i, _, _), one in zip(elements, launched, strict=True):
            results[i] = one
    return [r if r is not None else LaunchError("not submitted") for r in results]


def _one(executor: SlurmExecutor, spec: LaunchSpec) -> Launched | LaunchError:
    try:
        return executor.submit(spec)
    except LaunchError as exc:
        return exc


def _array(
    executor: SlurmExecutor, elements: Sequence[tuple[int, RemoteAttempt, LaunchSpec]]
) -> list[Launched]:
    """One sbatch for ``elements`` (at most MaxArraySize of them)."""
    batch = f"sb-array-{uuid.uuid4().hex}"
    name = f"simbridge_array_{batch[-16:]}"
    q = shlex.quote
    array_logs = executor.root / ARRAYS_DIR / name
    intents = []
    for index, (_, attempt, spec) in enumerate(elements):
        intent = Intent(
            name=name, comment=batch, cwd=str(attempt.cwd), prefix=str(attempt.prefix), index=index
        )
        write_intent(spec.log_prefix, intent)
        intents.append(intent)
    parallel = executor.settings.slurm.array_parallel
    span = f"0-{len(elements) - 1}" + (f"%{parallel}" if parallel else "")
    words = executor.sbatch_words(
        name=name,
        comment=batch,
        chdir=str(executor.root),
        output=str(array_logs / "%a.out"),
        error=str(array_logs / "%a.err"),
    )
    words.insert(2, f"--array={span}")
    folders = sorted({str(a.prefix.parent) for _, a, _ in elements} | {str(array_logs)})
    prepare = [
        "mkdir -p -- " + " ".join(q(f) for f in folders),
        "rm -f -- " + " ".join(q(str(a.exit_file)) for _, a, _ in elements),
    ]
    script = array_script([(a, s) for _, a, s in elements])
    array_id = executor.sbatch(words, script, prepare=prepare)
    launched = []
    for index, ((_, _, spec), intent) in enumerate(zip(elements, intents, strict=True)):
        job_id = f"{array_id}_{index}"
        executor.remember(spec, replace(intent, job_id=job_id))
        launched.append(Launched(job_id=job_id))
    log.info("slurm.array_submitted", cluster=executor.name, job_id=array_id, elements=len(elements))
    return launched
