"""The Slurm executor: each simulation is one Slurm job (or one element of a job array).

Submitting writes, before ``sbatch``, a small intent file next to the attempt's local log prefix
(the job's unique name, its token as the Slurm comment, its array index and its cluster-side
files), and the job id into it right after. After a crash the job is found again by that name in
``squeue`` (matched on the comment, so an earlier attempt of the same beam is never adopted) and
adopted: never submitted twice. Status comes from the cluster's watcher (slurm_watch.py): one
``squeue`` per interval for all jobs, the history for jobs that left the queue, the exit markers
as the final word. Every word that reaches the cluster's shell is quoted with ``shlex.quote``
and every cluster path is confined to ``remote_root``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import PurePosixPath
from typing import Any

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import LaunchError, RemoteError, RemotePathError, RunScriptError, SchedulerError
from simbridge.jobs.executors.base import Executor, JobInfo, JobRef, JobStatus, Launched, LaunchSpec
from simbridge.jobs.executors.runscript import lock_wait_s
from simbridge.jobs.executors.slurm_array import submit_many
from simbridge.jobs.executors.slurm_intent import Intent, intent_file, read_intent, submit_base, write_intent
from simbridge.jobs.executors.slurm_parse import (
    ACTIVE_STATES,
    JOB_ID,
    SQUEUE_FIND_FORMAT,
    has_accounting,
    max_array_size,
    parse_config,
    parse_sbatch,
    parse_squeue_find,
)
from simbridge.jobs.executors.slurm_script import remote_files, run_script
from simbridge.jobs.executors.slurm_submit import Claim, claim_command, parse_claim, submit_command
from simbridge.jobs.executors.slurm_watch import (
    QueueWatcher,
    checked,
    ended_jobs,
    marker_info,
    read_endings,
    read_many,
    scheduler_info,
)
from simbridge.jobs.transport.base import CommandRunner
from simbridge.logs import get_logger

log = get_logger(__name__)

# A job just submitted may be missing from squeue for a moment; this long it is not a failure.
MISSING_GRACE_S = 30.0
CANCEL_WAIT_S = 10.0
# Running jobs whose marker is read each interval too: the marker is the final word, and a
# controller that is slow to learn of an end (restarting, slurmd retrying) must not delay it.
MARKED_STATES = frozenset({"RUNNING", "COMPLETING"})


def _active(queue: dict[str, Any], job_id: str | None) -> bool:
    job = queue.get(job_id) if job_id else None
    return job is not None and bool(job.active)


class SlurmExecutor(Executor):
    """Submits, finds, watches and cancels Slurm jobs on one cluster through ``runner``."""

    def __init__(
        self,
        *,
        name: str,
        settings: ClusterSettings,
        runner: CommandRunner,
        missing_grace_s: float = MISSING_GRACE_S,
    ) -> None:
        self.name = name
        self.settings = settings
        self.runner = runner
        self.root = settings.remote_root
        self._timeout = settings.command_timeout_s
        self._grace = missing_grace_s
        self._requeue = frozenset(settings.slurm.requeue)
        self.watcher = QueueWatcher(runner=runner, interval_s=settings.poll_s, timeout_s=self._timeout)
        self._lock = threading.Lock()
        self._submit_lock = threading.Lock()
        self._config_lock = threading.Lock()
        self._next_submit = 0.0
        self._config: dict[str, str] | None = None
        self._intents: dict[str, Intent] = {}
        self._first_seen: dict[str, float] = {}
        self._last: dict[str, JobInfo] = {}
        self.sbatch_calls = 0

    # ---- cluster facts -----------------------------------------------------------------------

    def cluster_config(self) -> dict[str, str]:
        """``scontrol show config``, read once (MaxArraySize, accounting)."""
        with self._config_lock:  # not self._lock: polls must not wait behind a remote command
            if self._config is None:
                try:
                    text = checked(
                        self.runner.run("scontrol show config", timeout_s=self._timeout), "scontrol"
                    )
                    self._config = parse_config(text)
                except (SchedulerError, RemoteError) as exc:
                    log.warning("slurm.config_unread", cluster=self.name, error=str(exc)[:300])
                    return {}
            return self._config

    @property
    def max_array_size(self) -> int:
        """The cluster's MaxArraySize (elements per array)."""
        return max_array_size(self.cluster_config())

    @property
    def accounting(self) -> bool:
        """Whether the cluster keeps accounting (sacct answers)."""
        return has_accounting(self.cluster_config())

    # ---- submit ------------------------------------------------------------------------------

    def job_name(self, spec: LaunchSpec) -> str:
        """The job's name from the template: {beam_id} {beam} {case} {attempt}.

        Unique per beam (the default ``moqui_{beam_id}``); the attempt's token, sent as the job's
        comment, tells two attempts of one beam apart.
        """
        # The log prefix is .../{case}/{beam}/{step}-{n} (the pipeline's layout; runscript's too).
        beam, case = spec.log_prefix.parent.name, spec.log_prefix.parent.parent.name
        fields = {
            "beam_id": beam,
            "beam": beam,
            "case": case,
            "attempt": spec.log_prefix.name.rpartition("-")[2],
        }
        try:
            name = self.settings.slurm.job_name.format_map(fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise LaunchError(f"clusters.{self.name}.slurm.job_name: bad template field {exc}") from exc
        if not name or "\n" in name or len(name) > 200:
            raise LaunchError(f"job name {name[:80]!r} is empty, too long or holds a newline")
        return name

    def sbatch_words(self, *, name: str, comment: str, chdir: str, output: str, error: str) -> list[str]:
        """The sbatch command line: our fields, then the cluster's configured resources."""
        s = self.settings.slurm
        words = [
            "sbatch",
            "--parsable",
            f"--job-name={name}",
            f"--comment={comment}",
            f"--chdir={chdir}",
            f"--output={output}",
            f"--error={error}",
        ]
        for flag, value in (
            ("--partition", s.partition),
            ("--account", s.account),
            ("--qos", s.qos),
            ("--time", s.time),
            ("--gres", s.gres),
            ("--gpus", None if s.gpus is None else str(s.gpus)),
        ):
            if value is not None:
                words.append(f"{flag}={value}")
        words.extend(s.extra_args)
        return words

    def throttle(self) -> None:
        """Keep sbatch calls under ``submit_per_s`` (a site limit; the wait is the rate itself)."""
        with self._submit_lock:
            now = time.monotonic()
            wait = self._next_submit - now
            if wait > 0:
                time.sleep(wait)
            self._next_submit = max(now, self._next_submit) + 1.0 / self.settings.slurm.submit_per_s

    def sbatch(
        self,
        words: Sequence[str],
        stdin: bytes,
        *,
        base: PurePosixPath,
        script: PurePosixPath | None = None,
        prepare: Sequence[str] = (),
    ) -> str:
        """Run ``prepare`` commands then sbatch, once for ``base`` (slurm_submit.py), in one call;
        the job id. ``stdin`` goes to the command: written to ``script`` if given, else read by
        ``prepare``."""
        size = len(stdin) if script is not None else 0
        command = " && ".join([*prepare, submit_command(base, words, script=script, size=size)])
        self.throttle()
        with self._lock:
            self.sbatch_calls += 1
        try:
            result = self.runner.run(command, timeout_s=self._timeout, stdin=stdin)
            job_id, _cluster = parse_sbatch(checked(result, "sbatch"))
        except (SchedulerError, RemoteError) as exc:
            raise LaunchError(f"{self.name}: {exc}") from exc
        self.watcher.invalidate()
        return job_id

    def submit(self, spec: LaunchSpec) -> Launched:
        """Submit one job; its intent is on disk before sbatch, its job id right after."""
        try:
            cwd, files = remote_files(self.root, spec)
            script = run_script(self.settings, spec, cwd, files)
        except (RemotePathError, RunScriptError) as exc:
            raise LaunchError(str(exc)) from exc
        name = self.job_name(spec)
        intent = Intent(name=name, comment=spec.token, cwd=str(cwd), prefix=str(files.prefix))
        write_intent(spec.log_prefix, intent)
        q = shlex.quote
        words = self.sbatch_words(
            name=name, comment=spec.token, chdir=str(cwd), output=str(files.stdout), error=str(files.stderr)
        )
        words.append(str(files.script))
        prepare = [f"mkdir -p -- {q(str(files.folder))}", f"rm -f -- {q(str(files.exit_file))}"]
        job_id = self.sbatch(words, script.encode(), base=files.prefix, script=files.script, prepare=prepare)
        self.remember(spec, replace(intent, job_id=job_id))
        log.debug("slurm.submitted", cluster=self.name, job_id=job_id, name=name)
        return Launched(job_id=job_id)

    def remember(self, spec: LaunchSpec, intent: Intent) -> None:
        """Record a submitted job's id in its intent file and in memory."""
        try:
            write_intent(spec.log_prefix, intent)
        except OSError as exc:
            # The job runs; the store gets its id from our return. find() would still find it by name.
            log.warning("slurm.intent_unwritten", job_id=intent.job_id, error=str(exc))
        with self._lock:
            self._intents[spec.token] = intent
            self._first_seen[spec.token] = time.monotonic()

    def submit_many(self, specs: Sequence[LaunchSpec]) -> list[Launched | LaunchError]:
        """Submit many beams at once: job arrays (see slurm_array.py), else one job each.

        One result per spec, in order: its :class:`Launched` (job id ``{jobid}_{index}`` for an
        array element), or the :class:`LaunchError` that kept it from Slurm.
        """
        return submit_many(self, specs)

    # ---- find --------------------------------------------------------------------------------

    def intent(self, ref: JobRef) -> Intent | None:
        """The attempt's intent (cached once read)."""
        with self._lock:
            found = self._intents.get(ref.token)
        if found is None:
            found = read_intent(ref.log_prefix, self.root)
            if found is not None:
                with self._lock:
                    self._intents[ref.token] = found
        return found

    def find(self, ref: JobRef) -> Launched | None:
        """Find the job again after a crash; None when it never reached Slurm and never will.

        The attempt's submit claim on the cluster (slurm_submit.py) answers first: the job sbatch
        made, "still submitting" (SchedulerError: ask again next tick) or "given up" (from then on
        no sbatch of this attempt can run). After a given-up claim the queue (by unique name and
        token) and the exit marker are asked too, for an sbatch that failed yet queued its job; a
        marker found is mirrored locally, so the caller collects it instead of submitting again.
        Raises SchedulerError when the cluster cannot be asked now: "unknown" must never be taken
        for "never started" (that would submit it twice).
        """
        intent = self.intent(ref)
        if intent is None:
            return None  # no intent: sbatch never ran for this attempt
        if intent.job_id is not None:
            return Launched(job_id=intent.job_id)
        claim = self._claim(intent)
        if claim.job_id is not None:
            job_id = claim.job_id if intent.index is None else f"{claim.job_id}_{intent.index}"
            return self._adopt(ref, intent, job_id)
        # Nothing of this attempt can reach Slurm any more. Its sbatch may have run and failed
        # after all (a timeout that still queued the job), or an older simbridge submitted it
        # without the claim: the queue (by name and token) and its exit marker have the last word.
        command = (
            f"squeue --me --noheader --array --states=all --name={shlex.quote(intent.name)} "
            f"--format={shlex.quote(SQUEUE_FIND_FORMAT)}"
        )
        try:
            jobs = parse_squeue_find(checked(self.runner.run(command, timeout_s=self._timeout), "squeue"))
        except (SchedulerError, RemoteError) as exc:
            # Unknown now is not "never started": answering None would submit it twice.
            raise SchedulerError(f"{self.name}: cannot look for job {intent.name!r}: {exc}") from exc
        for job in jobs:
            if job.comment != intent.comment:
                continue
            if intent.index is not None:
                _base, _, index = job.job_id.partition("_")
                if index != str(intent.index):
                    continue
            return self._adopt(ref, intent, job.job_id)
        markers = read_many(self.runner, [str(intent.remote.exit_file)], limit=64, timeout_s=self._timeout)
        if marker_info(markers[0]) is not None:
            self._mirror(ref, markers[0] or b"")
        return None

    def _claim(self, intent: Intent) -> Claim:
        """The attempt's submit claim on the cluster (slurm_submit.py): its job, or none ever."""
        base = submit_base(self.root, intent)
        where = f"{self.name}: job {intent.name!r}"
        try:
            result = self.runner.run(
                claim_command(base, wait_s=lock_wait_s(self._timeout)), timeout_s=self._timeout
            )
            return parse_claim(checked(result, "submit claim"), where=where)
        except RemoteError as exc:
            raise SchedulerError(f"{where}: cannot read its submit claim: {exc}") from exc

    def _adopt(self, ref: JobRef, intent: Intent, job_id: str) -> Launched:
        with self._lock:
            self._intents[ref.token] = replace(intent, job_id=job_id)
        log.info("slurm.adopted", cluster=self.name, job_id=job_id, name=intent.name)
        return Launched(job_id=job_id)

    # ---- poll --------------------------------------------------------------------------------

    def poll(self, refs: Sequence[JobRef]) -> dict[str, JobInfo]:
        """Status of all ``refs`` from one look at the queue (at most one per ``poll_s``)."""
        snap, fresh = self.watcher.look()
        result: dict[str, JobInfo] = {}
        now = time.monotonic()
        todo: list[tuple[JobRef, Intent | None, str | None]] = []
        for ref in refs:
            with self._lock:
                self._first_seen.setdefault(ref.token, now)
                last = self._last.get(ref.token)
            if not fresh and last is not None:
                result[ref.token] = last  # within the interval: the last verdict stands
                continue
            try:
                intent = self.intent(ref)
            except SchedulerError as exc:
                result[ref.token] = JobInfo(JobStatus.LOST, detail=str(exc))
                continue
            job_id = ref.job_id or (intent.job_id if intent else None)
            job = snap.jobs.get(job_id) if job_id else None
            if job is not None and job.active and job.state not in MARKED_STATES:
                # Waiting (PENDING + its reason, SUSPENDED...): no command of it has run to an end.
                result[ref.token] = JobInfo(JobStatus.RUNNING, scheduler_state=job.state, reason=job.reason)
            elif not fresh:
                result[ref.token] = JobInfo(JobStatus.RUNNING, scheduler_state="SUBMITTED")
            else:
                todo.append((ref, intent, job_id))
        if todo:
            result.update(self._settle(todo, snap.jobs, snap.error, now))
        with self._lock:
            for token, info in result.items():
                if info.status is JobStatus.RUNNING:
                    self._last[token] = info
                else:
                    self._last.pop(token, None)
                    self._first_seen.pop(token, None)
        return result

    def _settle(
        self,
        todo: Sequence[tuple[JobRef, Intent | None, str | None]],
        queue: dict[str, Any],
        queue_error: str,
        now: float,
    ) -> dict[str, JobInfo]:
        """Verdicts for jobs the queue does not show running: markers, then the history."""
        result: dict[str, JobInfo] = {}
        with_intent = [(ref, intent, job_id) for ref, intent, job_id in todo if intent is not None]
        for ref, intent, _ in todo:
            if intent is None:
                result[ref.token] = JobInfo(
                    JobStatus.LOST, detail=f"no record of a Slurm submission ({intent_file(ref.log_prefix)})"
                )
        try:
            endings = read_endings(
                self.runner,
                [
                    (str(i.remote.exit_file), str(i.remote.stderr), not _active(queue, job_id))
                    for _, i, job_id in with_intent
                    if i is not None
                ],
                timeout_s=self._timeout,
            )
        except (SchedulerError, RemoteError) as exc:
            log.warning("slurm.markers_unread", cluster=self.name, error=str(exc)[:300])
            endings = [(None, None)] * len(with_intent)
            queue_error = queue_error or str(exc)
        markers = [m for m, _ in endings]
        tails = {ref.token: t for (ref, _, _), (_, t) in zip(with_intent, endings, strict=True) if t}
        unknown: list[str] = []
        pending: list[tuple[JobRef, Intent, str | None]] = []
        for (ref, intent, job_id), data in zip(with_intent, markers, strict=True):
            assert intent is not None
            info = marker_info(data)
            job = queue.get(job_id) if job_id else None
            if info is not None:
                self._mirror(ref, data or b"")
                if job is not None:
                    named = scheduler_info(job, self._requeue)
                    info = replace(
                        info, scheduler_state=job.state, reason=named.reason, transient=named.transient
                    )
                result[ref.token] = info
            elif queue_error:
                # The controller (or link) is down: no verdict, keep watching.
                result[ref.token] = JobInfo(
                    JobStatus.RUNNING, scheduler_state="UNKNOWN", reason=queue_error[:120]
                )
            else:
                pending.append((ref, intent, job_id))
                # squeue prints no exit code: a job it shows ended without a marker (run.sh could
                # not write one on a full disk) is asked of the history too, for its code.
                if job_id and not _active(queue, job_id):
                    unknown.append(job_id)
        history = (
            ended_jobs(self.runner, unknown, accounting=self.accounting, timeout_s=self._timeout)
            if unknown
            else {}
        )
        for ref, _intent, job_id in pending:
            job = queue.get(job_id) if job_id else None
            if job is None or not job.active:
                job = (history.get(job_id) if job_id else None) or job
            if job is not None and job.active:
                result[ref.token] = JobInfo(JobStatus.RUNNING, scheduler_state=job.state, reason=job.reason)
            elif job is not None:
                result[ref.token] = scheduler_info(job, self._requeue)
            elif now - self._first_seen.get(ref.token, now) < self._grace:
                result[ref.token] = JobInfo(JobStatus.RUNNING, scheduler_state="SUBMITTED")
            else:
                result[ref.token] = JobInfo(
                    JobStatus.LOST,
                    detail=f"job {job_id or '?'} is unknown to Slurm and left no exit marker",
                )
        self._add_tails(tails, todo, result)
        return result

    def _add_tails(
        self,
        tails: dict[str, bytes],
        todo: Sequence[tuple[JobRef, Intent | None, str | None]],
        result: dict[str, JobInfo],
    ) -> None:
        """Give each failed job its stderr tail and mirror it where the pipeline reads it."""
        for ref, _intent, _ in todo:
            info, data = result[ref.token], tails.get(ref.token)
            if data is None or info.status is JobStatus.RUNNING or info.code == 0:
                continue
            with contextlib.suppress(OSError):
                ref.stderr.parent.mkdir(parents=True, exist_ok=True)
                ref.stderr.write_bytes(data)
            result[ref.token] = replace(info, log_tail=data.decode(errors="replace"))

    def _mirror(self, ref: JobRef, data: bytes) -> None:
        """Keep a local copy of the marker (what the pipeline checks after a restart)."""
        with contextlib.suppress(OSError):
            ref.exit_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = ref.exit_file.with_name(ref.exit_file.name + ".part")
            tmp.write_bytes(data)
            os.replace(tmp, ref.exit_file)

    # ---- cancel ------------------------------------------------------------------------------

    def cancel(self, ref: JobRef, *, grace_s: float) -> bool:
        """``scancel`` the job (Slurm signals its whole step: SIGTERM, then SIGKILL after KillWait).

        Waits (bounded by ``grace_s`` plus a little) until the job leaves the running states,
        so a retry never starts beside it.
        """
        job_id = ref.job_id
        if job_id is None:
            found = self.find(ref)
            if found is None:
                return False
            job_id = found.job_id
        if not JOB_ID.match(job_id):
            raise SchedulerError(f"job id {job_id[:40]!r} is not a Slurm job id")
        result = self.runner.run(f"scancel {shlex.quote(job_id)}", timeout_s=self._timeout)
        self.watcher.invalidate()
        if not result.ok:
            log.warning(
                "slurm.scancel_failed", job_id=job_id, error=result.stderr.decode(errors="replace")[:300]
            )
            return False
        deadline = time.monotonic() + grace_s + CANCEL_WAIT_S
        command = f"squeue --noheader --array --states=all --jobs={shlex.quote(job_id)} --format=%T"
        while time.monotonic() < deadline:
            out = self.runner.run(command, timeout_s=self._timeout)
            states = out.stdout.decode(errors="replace").split()
            if not out.ok or not any(s in ACTIVE_STATES for s in states):
                break
            time.sleep(0.1)
        return True
