"""The per-beam steps: what to do in each state and what an ended attempt means.

Every action is idempotent: it is decided from the stored state alone, writes its intent before it
acts (an attempt row before a launch), and can run again after a crash without doing work twice.
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import TypeVar

from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from simbridge.config import JobsSettings, config_file
from simbridge.gpus import GpuLease
from simbridge.jobs import remote as remote_steps
from simbridge.jobs.clusters import Cluster, Clusters
from simbridge.jobs.errors import (
    LaunchError,
    LaunchTooLateError,
    RemoteError,
    StaleStateError,
    TransferError,
    UnsafeFileError,
)
from simbridge.jobs.executors import Executor, JobInfo, JobRef, JobStatus, LaunchSpec
from simbridge.jobs.names import child_path
from simbridge.jobs.states import LAUNCHED_FROM, NEXT, BeamState
from simbridge.jobs.store import AttemptRow, BeamRow, CaseRow, Store
from simbridge.jobs.transport import Transport
from simbridge.logs import get_logger
from simbridge.processes import last_line

log = get_logger(__name__)
T = TypeVar("T")

# Steps whose command runs on this machine whatever the executor (they touch local files).
LOCAL_STEPS = frozenset({BeamState.PREPARING, BeamState.POSTPROCESSING})

# Called (when set) between writing a launch's intent and checking the lease before it starts: the
# place where a paused serve could be replaced. For tests only (they stop a serve right there).
BEFORE_LAUNCH_HOOK: Callable[[], None] | None = None
# Called (when set) right after that lease check, before the executor starts the command: the
# window the launch wrapper's deadline closes. For tests only, like the hook above.
AFTER_LEASE_CHECK_HOOK: Callable[[], None] | None = None


@dataclass(frozen=True)
class BeamPaths:
    """Where one beam's files live (all keys are safe path components)."""

    staging: Path
    logs: Path
    results: Path


def render(template: str, fields: Mapping[str, str]) -> tuple[str, ...]:
    """Split a template into words, then fill each word: an argv list no shell ever parses."""
    return tuple(word.format_map(fields) for word in shlex.split(template))


def logs_dir(work_root: Path, case_key: str, beam_key: str) -> Path:
    """Where a beam's attempt logs and exit markers live, under the (resolved) work root."""
    return child_path(child_path(work_root / "logs", case_key), beam_key)


def attempt_ref(logs: Path, attempt: AttemptRow) -> JobRef:
    """How to find an attempt's process and marker again, given its beam's logs folder."""
    return JobRef(
        token=attempt.token,
        log_prefix=logs / f"{attempt.step.lower()}-{attempt.number}",
        job_id=attempt.job_id,
        pid=attempt.pid,
        pid_start=attempt.pid_start,
    )


class Pipeline:
    """The steps of every beam, bound to one store, executor, transport and GPU pool."""

    def __init__(
        self,
        *,
        settings: JobsSettings,
        store: Store,
        executor: Executor,
        local: Executor,
        transport: Transport,
        clusters: Clusters | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.executor = executor
        self.local = local
        self.transport = transport
        self.clusters = clusters
        # The cluster simulations run on (None: this machine); its executor and transport are
        # the ones above.
        self.cluster = cluster
        self.work_root = settings.work_root.resolve()
        self.results_root = settings.results.resolve()
        self._cases: dict[int, CaseRow] = {}
        self._paths: dict[int, BeamPaths] = {}
        self._remote: dict[int, PurePosixPath] = {}
        where = config_file()
        self.config_dir = (where.parent if where is not None else Path.cwd()).resolve()

    # ---- paths and fields --------------------------------------------------------------------

    def case_of(self, beam: BeamRow) -> CaseRow:
        """The beam's case (cached: cases never change once stored)."""
        case = self._cases.get(beam.case_id)
        if case is None:
            case = self._cases[beam.case_id] = self.store.case(beam.case_id)
        return case

    def paths(self, beam: BeamRow) -> BeamPaths:
        """Staging, log and results folders of a beam (cached: they never change)."""
        found = self._paths.get(beam.id)
        if found is not None:
            return found
        case = self.case_of(beam)
        found = self._paths[beam.id] = BeamPaths(
            staging=child_path(child_path(self.work_root / "staging", case.key), beam.key),
            logs=logs_dir(self.work_root, case.key, beam.key),
            results=child_path(child_path(self.results_root, case.key), beam.key),
        )
        return found

    def remote_dir(self, beam: BeamRow) -> PurePosixPath:
        """The beam's folder on the executor's side (cached: it never changes)."""
        found = self._remote.get(beam.id)
        if found is None:
            found = self._remote[beam.id] = self.transport.beam_dir(self.case_of(beam).key, beam.key)
        return found

    def fields(self, beam: BeamRow, work_dir: PurePath | str) -> dict[str, str]:
        """The named fields a step template may use."""
        case = self.case_of(beam)
        return {
            "case_id": case.key,
            "beam_id": beam.key,
            "beam_dir": beam.path,
            "work_dir": str(work_dir),
            "results_dir": str(self.paths(beam).results),
            "python": sys.executable,
            "config_dir": str(self.config_dir),
        }

    def ref(self, attempt: AttemptRow, beam: BeamRow | None = None) -> JobRef:
        """How to find an attempt's process and marker again.

        A remote attempt's ref carries the same local log prefix: its executor derives the remote
        files from it (runscript.attempt_files: ``{remote_root}/CASE/BEAM/.simbridge/STEP-N``).
        """
        beam = beam or self.store.beam(attempt.beam_id)
        return attempt_ref(self.paths(beam).logs, attempt)

    def executor_for(self, step: BeamState) -> Executor:
        """The local executor for local steps, the configured one for the simulation."""
        return self.local if step in LOCAL_STEPS else self.executor

    # ---- actions, one per state --------------------------------------------------------------

    def advance(self, beam: BeamRow, *, may_launch: bool) -> None:
        """Run the in-process steps of a beam back to back until one launches or must wait.

        Chaining saves a scheduling round per step; a prepare/postprocess command is launched
        only if ``may_launch`` (the dispatcher's concurrency budget), else left for later.
        Each step returns the beam as it moved it, or None when the chain stops there.
        """
        if self._fast_path(beam):
            return
        current: BeamRow | None = beam
        while current is not None:
            state = current.state
            if state is BeamState.PENDING:
                current = self.start(current)
            elif state is BeamState.UPLOADING:
                current = self.upload(current)
            elif state is BeamState.COLLECTING:
                current = self.collect(current)
            elif state is BeamState.PREPARING:
                if self.settings.steps.prepare is not None and not may_launch:
                    return
                current = self.prepare(current)
            elif state is BeamState.POSTPROCESSING:
                if self.settings.steps.postprocess is not None and not may_launch:
                    return
                current = self.postprocess(current)
            else:
                return

    def _fast_path(self, beam: BeamRow) -> bool:
        """Steps without a command, done back to back with their moves in one transaction.

        PENDING -> QUEUED (no prepare: check and upload) and COLLECTING -> COMPLETED (no
        postprocess: download). Each copy is idempotent, so a crash before the commit only
        repeats it. Anything unusual (no files, a copy error) takes the step-by-step path.
        """
        steps = self.settings.steps
        remote = self.remote_dir(beam)
        try:
            if beam.state is BeamState.PENDING and steps.prepare is None:
                source = Path(beam.path)
                if not source.is_dir() or not any(p.is_file() for p in source.rglob("*")):
                    return False
                count = self.transport.upload(source, remote)
                self.store.path(
                    beam.id,
                    [
                        (BeamState.PENDING, BeamState.PREPARING, "started"),
                        (BeamState.PREPARING, BeamState.UPLOADING, "no prepare step"),
                        (BeamState.UPLOADING, BeamState.QUEUED, f"uploaded {count} file(s)"),
                    ],
                )
                return True
            if beam.state is BeamState.COLLECTING and steps.postprocess is None:
                results = self.paths(beam).results
                got = self.transport.download(remote, steps.outputs, results)
                self.store.path(
                    beam.id,
                    [
                        (
                            BeamState.COLLECTING,
                            BeamState.POSTPROCESSING,
                            f"downloaded {len(got)} file(s) to {results}",
                        ),
                        (BeamState.POSTPROCESSING, BeamState.COMPLETED, "done"),
                    ],
                )
                remote_steps.cleanup(self, beam, remote)
                return True
        except TransferError:
            return False  # the step-by-step path retries and reports it
        except RemoteError as exc:
            if remote_steps.passing(exc):
                raise
            return False
        return False

    def _move(self, beam: BeamRow, target: BeamState, reason: str) -> BeamRow:
        self.store.transition(beam.id, beam.state, target, reason=reason)
        return dataclasses.replace(beam, state=target, step_tries=0)

    def start(self, beam: BeamRow) -> BeamRow | None:
        """PENDING: take the beam into the pipeline."""
        return self._move(beam, BeamState.PREPARING, "started")

    def prepare(self, beam: BeamRow) -> BeamRow | None:
        """PREPARING: check the beam's files, then launch the prepare command (or skip it)."""
        source = Path(beam.path)
        if not source.is_dir() or not any(p.is_file() for p in source.rglob("*")):
            self.fail(
                beam,
                BeamState.PREPARING,
                f"beam folder {source} has no files; put the beam's plan in it and "
                "`simbridge retry` the case",
            )
            return None
        template = self.settings.steps.prepare
        if template is None:
            return self._move(beam, BeamState.UPLOADING, "no prepare step")
        staging = self.paths(beam).staging

        def fresh_staging() -> None:
            # A re-run starts from a clean folder so a half-written earlier try leaves no trace;
            # only after the attempt row is ours, so a running try's folder is never wiped.
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        self.launch(
            beam,
            step=BeamState.PREPARING,
            argv=render(template, self.fields(beam, staging)),
            cwd=staging,
            timeout_s=self.settings.timeouts.prepare_s,
            setup=fresh_staging,
        )
        return None

    def upload(self, beam: BeamRow) -> BeamRow | None:
        """UPLOADING: copy the staged files (or the beam folder) to the per-beam folder."""
        local = self.paths(beam).staging if self.settings.steps.prepare else Path(beam.path)
        remote = self.remote_dir(beam)
        try:
            count = self._transfer(lambda: self.transport.upload(local, remote))
        except TransferError as exc:
            self.fail(beam, BeamState.UPLOADING, str(exc))
            return None
        except RemoteError as exc:
            if remote_steps.passing(exc):
                raise  # the dispatcher backs off (or stops); the beam stays UPLOADING
            # Disk full, permission denied, a path outside remote_root: say so; the local files
            # stay, so `simbridge retry` resumes here once it is fixed.
            self.fail(beam, BeamState.UPLOADING, str(exc))
            return None
        self._move(beam, BeamState.QUEUED, f"uploaded {count} file(s)")
        return None  # the GPU queue is the dispatcher's

    def submit(self, beam: BeamRow, lease: GpuLease) -> AttemptRow | None:
        """QUEUED -> RUNNING: launch the simulation on the leased GPU(s).

        The child inherits the lease's lock fds, so the GPU stays held as long as the simulation
        runs, even if this orchestrator is killed; our own copies are closed right after launch.
        """
        template = self.settings.steps.simulate
        assert template is not None  # checked when the dispatcher starts
        remote = self.remote_dir(beam)
        gpu_id = ",".join(str(i) for i in lease.indices)
        with lease:
            return self.launch(
                beam,
                step=BeamState.RUNNING,
                argv=render(template, self.fields(beam, remote)),
                cwd=Path(remote),
                timeout_s=self.settings.timeouts.simulate_s,
                env=lease.env,
                pass_fds=lease.fds,
                gpu_id=gpu_id,
                # `simbridge gpus` then names the simulation, which keeps the GPU, not us.
                on_started=lease.record_holder,
            )

    def collect(self, beam: BeamRow) -> BeamRow | None:
        """COLLECTING: download the outputs into results/CASE/BEAM/."""
        remote = self.remote_dir(beam)
        results = self.paths(beam).results
        patterns = self.settings.steps.outputs
        try:
            got = self._transfer(lambda: self.transport.download(remote, patterns, results))
        except TransferError as exc:
            self.fail(beam, BeamState.COLLECTING, str(exc))
            return None
        except RemoteError as exc:
            if remote_steps.passing(exc):
                raise  # the dispatcher backs off (or stops); the beam stays COLLECTING
            self.fail(beam, BeamState.COLLECTING, str(exc))
            return None
        moved = self._move(beam, BeamState.POSTPROCESSING, f"downloaded {len(got)} file(s) to {results}")
        remote_steps.cleanup(self, beam, remote)
        return moved

    def postprocess(self, beam: BeamRow) -> BeamRow | None:
        """POSTPROCESSING: run the postprocess command in the results folder (or finish)."""
        template = self.settings.steps.postprocess
        if template is None:
            self._move(beam, BeamState.COMPLETED, "done")
            return None
        results = self.paths(beam).results
        self.launch(
            beam,
            step=BeamState.POSTPROCESSING,
            argv=render(template, self.fields(beam, results)),
            cwd=results,
            timeout_s=self.settings.timeouts.postprocess_s,
            setup=lambda: results.mkdir(parents=True, exist_ok=True),
        )
        return None

    def _transfer(self, call: Callable[[], T]) -> T:
        # Copies can hit passing trouble (a full disk being cleaned, a dropped link): retry a few
        # times in-process; the step itself stays resumable if we are killed meanwhile.
        retrying = Retrying(
            # A refused link or special file is refused again on every try: no retry.
            retry=retry_if_exception_type(TransferError) & retry_if_not_exception_type(UnsafeFileError),
            stop=stop_after_attempt(3) | stop_after_delay(self.settings.timeouts.transfer_s),
            wait=wait_exponential(multiplier=0.2, max=2.0),
            reraise=True,
        )
        return retrying(call)

    # ---- launching and ending attempts -------------------------------------------------------

    def launch(
        self,
        beam: BeamRow,
        *,
        step: BeamState,
        argv: tuple[str, ...],
        cwd: Path,
        timeout_s: float,
        env: Mapping[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        gpu_id: str | None = None,
        setup: Callable[[], None] | None = None,
        on_started: Callable[[int], None] | None = None,
    ) -> AttemptRow | None:
        """Write the attempt (intent), run ``setup``, start it, record how to find it.

        Returns None if the beam moved on or already has a live attempt (nothing is touched).
        """
        token = f"sb-{uuid.uuid4().hex}"
        current = LAUNCHED_FROM[step]
        try:
            attempt = self.store.open_attempt(
                beam.id,
                expected=current,
                target=step,
                token=token,
                executor=self.executor_for(step).name,
                work_dir=str(cwd),
                deadline=time.time() + timeout_s,
                gpu_id=gpu_id,
            )
        except StaleStateError:
            return None
        ref = self.ref(attempt, beam)
        spec = LaunchSpec(
            token=token,
            argv=argv,
            cwd=cwd,
            log_prefix=ref.log_prefix,
            env=dict(env or {}),
            pass_fds=pass_fds,
        )
        try:
            if setup is not None:
                setup()
            if BEFORE_LAUNCH_HOOK is not None:
                BEFORE_LAUNCH_HOOK()
            # The intent above was written under our lease, but time has passed (a pause, a slow
            # setup): if we were replaced meanwhile, the new holder may already have judged this
            # attempt "never started" and relaunched it. Prove the lease is still ours, last thing;
            # and since a pause may still fall after this check, the local wrapper gets the
            # lease's validity end and starts nothing past it.
            not_after = self.store.check_lease()
            if AFTER_LEASE_CHECK_HOOK is not None:
                AFTER_LEASE_CHECK_HOOK()
            if not_after is not None:
                spec = dataclasses.replace(spec, not_after=not_after)
            launched = self.executor_for(step).submit(spec)
        except LaunchTooLateError as exc:
            # Nothing ran and no exit marker was written: the attempt is left as an intent without
            # a process, which the lease's holder (us, if still) closes as never started, gives
            # the try back and relaunches. If the lease is gone, our own writes would be refused.
            log.warning("jobs.launch_too_late", beam=beam.id, step=step, error=str(exc))
            return None
        except (LaunchError, OSError) as exc:
            self.fail(self.store.beam(beam.id), step, str(exc), close=(attempt.id, "failed", None))
            return None
        self.store.record_launch(
            attempt.id,
            beam_id=beam.id,
            job_id=launched.job_id,
            pid=launched.pid,
            pid_start=launched.pid_start,
            simulation=step is BeamState.RUNNING,
        )
        log.debug("jobs.launched", beam=beam.id, step=step, job_id=launched.job_id)
        if on_started is not None and launched.pid is not None:
            on_started(launched.pid)
        return attempt

    def finish(
        self,
        attempt: AttemptRow,
        info: JobInfo,
        *,
        timed_out: bool = False,
        beam: BeamRow | None = None,
    ) -> None:
        """Act on an attempt that ended: advance the beam, retry it, or fail it.

        ``beam`` may be passed as just read (every write below re-checks its state anyway).
        """
        beam = beam or self.store.beam(attempt.beam_id)
        step = attempt.step
        if beam.state is not step:
            # Cancelled (or moved by a person) while it ran: just close the books.
            outcome = "cancelled" if beam.state is BeamState.CANCELLED else "orphaned"
            self.store.close_attempt(attempt.id, outcome=outcome, exit_code=info.code)
            return
        if info.status is JobStatus.EXITED and info.exit_code == 0 and not timed_out:
            self.store.transition(
                beam.id,
                step,
                NEXT[step],
                reason=f"{step.lower()} exited 0 (job {attempt.job_id})",
                close=(attempt.id, "ok", 0),
            )
            return
        retry = self.settings.retry
        ref = self.ref(attempt, beam)
        # A scheduler's executor may bring the tail along (fetched in its one poll of the host).
        tail = info.log_tail.strip() or remote_steps.stderr_tail(self, attempt, ref)
        if timed_out:
            what, transient = (
                f"timed out after its limit (job {attempt.job_id})",
                retry.retry_timeout,
            )
        elif info.status in {JobStatus.LOST, JobStatus.KILLED}:
            # Killed by a signal (OOM killer, a person, a lost node) or gone without a word: the
            # command never said it failed, which is what `retry_lost` retries.
            what, transient = info.describe(), retry.retry_lost
        else:
            what, transient = info.describe(), info.exit_code in retry.transient_exit_codes
        if info.transient is not None and not timed_out:
            # The executor's policy for a named reason (Slurm: requeue NODE_FAIL, PREEMPTED).
            transient = info.transient
        outcome = "timeout" if timed_out else "transient" if transient else "failed"
        if transient and beam.step_tries < retry.max_attempts:
            delay = retry.backoff_s(beam.step_tries)
            reason = (
                f"{step.lower()} {what}; transient, retry {beam.step_tries + 1}/"
                f"{retry.max_attempts} in {delay:g}s"
            )
            back = LAUNCHED_FROM[step]
            if back is step:
                # Order: the backoff is set before the attempt closes, so no tick can relaunch
                # early; a crash in between only delays the retry.
                self.store.update_beam(beam.id, step, not_before=time.time() + delay)
                if self.store.close_attempt(attempt.id, outcome=outcome, exit_code=info.code):
                    self.store.add_event(reason=reason, case_id=beam.case_id, beam_id=beam.id)
            else:
                self.store.transition(
                    beam.id,
                    step,
                    back,
                    reason=reason,
                    step_tries=beam.step_tries,
                    not_before=time.time() + delay,
                    close=(attempt.id, outcome, info.code),
                )
            return
        # The first line says why on its own (status, the dashboard and the log show only it).
        message = f"{step.lower()} {what}"
        if tail:
            message += f": {last_line(tail)}\nstderr tail:\n{tail}"
        self.fail(
            beam,
            step,
            message,
            exit_code=info.code,
            close=(attempt.id, outcome, info.code),
        )

    def fail(
        self,
        beam: BeamRow,
        step: BeamState,
        message: str,
        *,
        exit_code: int | None = None,
        close: tuple[int, str, int | None] | None = None,
    ) -> None:
        """Mark a beam FAILED in ``step`` with its error (kept for the dashboard and retry).

        ``exit_code`` is negative for a signal death (-9: SIGKILL). The beam keeps its count of
        tries of the step, so a person sees how often it was launched before it failed.
        """
        try:
            self.store.transition(
                beam.id,
                step,
                BeamState.FAILED,
                reason=message,
                step_tries=beam.step_tries,
                failed_step=step.value,
                last_error=message[:4000],
                exit_code=exit_code,
                close=close,
            )
        except StaleStateError:
            log.info("jobs.fail_skipped", beam=beam.id, reason="state moved meanwhile")
            return
        log.warning("jobs.beam_failed", beam=beam.id, step=step, error=message.splitlines()[0])
