"""The pipeline's remote side: which cluster an attempt ran on, its marker and log tail there, the
launch of simulations on a cluster (one job, or one job array) and the cleanup after success.

Kept apart from pipeline.py and attempts.py (which call these) so the local steps read on their own.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from simbridge.jobs.clusters import LOCAL, Cluster, is_fatal
from simbridge.jobs.errors import (
    HostUnreachableError,
    JobsConfigError,
    LaunchError,
    RemoteError,
    SchedulerError,
    StaleStateError,
)
from simbridge.jobs.executors import JobRef, Launched, LaunchSpec
from simbridge.jobs.executors.ssh import SshExecutor
from simbridge.jobs.layout import render
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import AttemptRow, BeamRow
from simbridge.logs import get_logger
from simbridge.processes import log_tail

if TYPE_CHECKING:
    # The pipeline's layers these need (paths, fields, the store, fail); a Pipeline is one.
    from simbridge.jobs.attempts import Attempts

log = get_logger(__name__)


def remote_transient(exc: BaseException) -> bool:
    """A remote error that passes by itself (host unreachable, link dropped, controller away)."""
    if isinstance(exc, HostUnreachableError):
        return True
    if isinstance(exc, SchedulerError):
        return bool(getattr(exc, "transient", False))
    # The base class itself is what a dropped connection without a finer reason raises.
    return type(exc) is RemoteError


def remote_cause(exc: BaseException) -> RemoteError | None:
    """The remote error behind ``exc`` (itself, or one it was raised from), if any."""
    seen: BaseException | None = exc
    for _ in range(8):  # a cause chain is short; never loop on a cycle
        if seen is None:
            return None
        if isinstance(seen, RemoteError):
            return seen
        seen = seen.__cause__
    return None


def passing(exc: BaseException) -> bool:
    """Not the beam's fault: a passing outage (back off) or a refusal that stops serve, also when
    an executor wrapped it (a LaunchError raised from a dropped connection)."""
    if isinstance(exc, SchedulerError) and remote_transient(exc):
        return True
    cause = remote_cause(exc)
    return cause is not None and (remote_transient(cause) or is_fatal(cause))


def cluster_of(pipeline: Attempts, attempt: AttemptRow) -> Cluster | None:
    """The cluster an attempt ran on (None: this machine)."""
    if attempt.executor == LOCAL:
        return None
    if pipeline.cluster is not None and attempt.executor == pipeline.cluster.name:
        return pipeline.cluster
    if pipeline.clusters is None or not pipeline.clusters.known(attempt.executor):
        raise JobsConfigError(
            f"attempt {attempt.id} ran on cluster {attempt.executor!r}, which is not in the "
            "clusters section any more; put it back to finish or cancel its beams"
        )
    return pipeline.clusters.get(attempt.executor)


def marker_exists(pipeline: Attempts, attempt: AttemptRow, ref: JobRef) -> bool:
    """Whether the attempt's exit marker exists (asked of its cluster if it ran there)."""
    cluster = cluster_of(pipeline, attempt)
    if cluster is None:
        return ref.exit_file.exists()
    return cluster.exists(cluster.files(ref.log_prefix).exit_file)


def stderr_tail(pipeline: Attempts, attempt: AttemptRow, ref: JobRef) -> str:
    """The end of an attempt's stderr ('' if none), fetched from its cluster if remote."""
    cluster = cluster_of(pipeline, attempt)
    if cluster is None:
        return log_tail(ref.stderr)
    return cluster.tail(cluster.files(ref.log_prefix).stderr)


def cleanup(pipeline: Attempts, beam: BeamRow, remote: PurePosixPath) -> None:
    """Remove a beam's remote folder once its results are here, if the cluster asks for it.

    Called after the move out of COLLECTING: the results are ours, so this is best effort (a
    crash before it only leaves the folder behind, never loses a result).
    """
    cluster = pipeline.cluster
    if cluster is None or not cluster.settings.cleanup:
        return
    try:
        cluster.remove_tree(remote)
    except RemoteError as exc:
        log.warning("jobs.remote_cleanup_failed", beam=beam.id, cluster=cluster.name, error=str(exc))


def host_gpus(pipeline: Attempts, cluster: Cluster, beam: BeamRow) -> tuple[str, ...] | None:
    """GPUs of a plain host for a beam, assigned by the store ('()': none to assign, as on Slurm,
    where the scheduler assigns them; None: all busy, the beam waits its turn, first come first
    served). The host's GPUs are recorded in the store on first use."""
    executor = cluster.executor
    if cluster.slurm or cluster.settings.gpus is None or not isinstance(executor, SshExecutor):
        return ()
    with cluster.lock:
        if not cluster.gpus_registered:
            executor.register_gpus()
            cluster.gpus_registered = True
    held: tuple[str, ...] | None = executor.acquire_gpus(beam.id, pipeline.settings.gpus_per_beam)
    return held


def remote_spec(
    pipeline: Attempts, beam: BeamRow, attempt: AttemptRow, gpus: tuple[str, ...] = ()
) -> LaunchSpec:
    """What runs on the cluster for one attempt: the simulate command in the beam's folder.

    ``log_prefix`` stays the local one: the executor derives the remote script, logs and exit
    marker from it (runscript.attempt_files), so a ref finds them again after a crash.
    """
    template = pipeline.settings.steps.simulate
    assert template is not None  # checked when the dispatcher starts
    cluster = pipeline.cluster
    assert cluster is not None
    remote = pipeline.remote_dir(beam)
    case = pipeline.case_of(beam)
    spec = LaunchSpec(
        token=attempt.token,
        argv=render(template, pipeline.fields(beam, remote)),
        cwd=Path(str(remote)),  # a POSIX path on the cluster
        log_prefix=pipeline.ref(attempt, beam).log_prefix,
        # The plain host's run.sh sets it (Slurm sets it itself from --gres/--gpus).
        env={"CUDA_VISIBLE_DEVICES": ",".join(gpus)} if gpus else {},
    )
    names = {"case": case.key, "beam": beam.key, "beam_id": beam.key, "attempt": str(attempt.number)}
    if "fields" in {f.name for f in dataclasses.fields(LaunchSpec)}:
        # The job-name template's fields (moqui_{beam_id}), if the executors take them.
        spec = dataclasses.replace(spec, fields=names)  # type: ignore[call-arg,unused-ignore]
    return spec


def submit_many(pipeline: Attempts, beams: list[BeamRow]) -> list[AttemptRow]:
    """QUEUED -> RUNNING on the cluster for these beams (one job array when there are several).

    Every intent is written before the submit call; a dropped link during it leaves the attempts
    open without a job id, and the watcher finds the jobs again by name (never submitting twice)
    or, if nothing was submitted, puts the beams back in line.
    """
    cluster = pipeline.cluster
    assert cluster is not None
    timeout_s = pipeline.settings.timeouts.simulate_s
    opened: list[tuple[BeamRow, AttemptRow]] = []
    gpus: dict[int, tuple[str, ...]] = {}
    for beam in beams:
        held = host_gpus(pipeline, cluster, beam)
        if held is None:
            continue  # a plain host's GPUs are all busy: the beam keeps its place in line
        try:
            attempt = pipeline.store.open_attempt(
                beam.id,
                expected=BeamState.QUEUED,
                target=BeamState.RUNNING,
                token=f"sb-{uuid.uuid4().hex}",
                executor=cluster.name,
                work_dir=str(pipeline.remote_dir(beam)),
                deadline=time.time() + timeout_s,
                gpu_id=",".join(held) if held else None,
            )
        except StaleStateError:
            if held:
                pipeline.store.release_host_gpus(beam.id)
            continue
        gpus[beam.id] = held
        opened.append((beam, attempt))
    if not opened:
        return []
    specs = [remote_spec(pipeline, beam, attempt, gpus.get(beam.id, ())) for beam, attempt in opened]
    many = getattr(cluster.executor, "submit_many", None)
    results: list[Launched | BaseException] = []
    if len(specs) > 1 and callable(many):
        try:
            results = list(many(specs))
        except (LaunchError, SchedulerError, OSError) as exc:
            results = [exc] * len(specs)
    else:
        for spec in specs:
            try:
                results.append(cluster.executor.submit(spec))
            except (LaunchError, SchedulerError, OSError) as exc:
                results.append(exc)
    done = []
    later: BaseException | None = None
    for (beam, attempt), got in zip(opened, results, strict=True):
        if isinstance(got, Launched):
            _record(pipeline, beam, attempt, got)
            done.append(attempt)
        elif passing(got):
            # The attempt stays open without a job id: the watcher finds the job by its name
            # (adopts it, never submitting twice) or, if it never reached the cluster, puts the
            # beam back in line. The dispatcher backs off (or stops, for a refusal).
            later = later or got
        else:
            current = pipeline.store.beam(beam.id)
            pipeline.fail(current, BeamState.RUNNING, f"submit: {got}", close=(attempt.id, "failed", None))
    if later is not None:
        raise later
    return done


def _record(pipeline: Attempts, beam: BeamRow, attempt: AttemptRow, got: Launched) -> None:
    pipeline.store.record_launch(
        attempt.id, beam_id=beam.id, job_id=got.job_id, pid=got.pid, pid_start=got.pid_start
    )
    log.debug("jobs.launched", beam=beam.id, step=BeamState.RUNNING, job_id=got.job_id)
