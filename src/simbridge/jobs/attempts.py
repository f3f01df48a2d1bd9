"""Launching and ending attempts: write the intent, prove the lease, start the command, record how
to find it again; then, when it ended, advance the beam, retry it with backoff, or fail it.

The middle layer of the pipeline (on layout.py; pipeline.py adds the per-state steps). Every write
re-checks the beam's state, so an attempt judged twice (after a crash) changes nothing the second time.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from simbridge.config import JobsSettings
from simbridge.jobs import remote as remote_steps
from simbridge.jobs.clusters import Cluster, Clusters
from simbridge.jobs.errors import LaunchError, LaunchTooLateError, StaleStateError
from simbridge.jobs.executors import Executor, JobInfo, JobStatus, LaunchSpec
from simbridge.jobs.layout import BeamLayout
from simbridge.jobs.states import LAUNCHED_FROM, NEXT, BeamState
from simbridge.jobs.store import AttemptRow, BeamRow, Store
from simbridge.jobs.transport import Transport
from simbridge.logs import get_logger
from simbridge.processes import last_line

log = get_logger(__name__)

# Steps whose command runs on this machine whatever the executor (they touch local files).
LOCAL_STEPS = frozenset({BeamState.PREPARING, BeamState.POSTPROCESSING})

# Called (when set) between writing a launch's intent and checking the lease before it starts: the
# place where a paused serve could be replaced. For tests only (they stop a serve right there).
BEFORE_LAUNCH_HOOK: Callable[[], None] | None = None
# Called (when set) right after that lease check, before the executor starts the command: the
# window the launch wrapper's deadline closes. For tests only, like the hook above.
AFTER_LEASE_CHECK_HOOK: Callable[[], None] | None = None


class Attempts(BeamLayout):
    """Launches and verdicts of every beam's attempts, bound to one store, executor and transport."""

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
        super().__init__(settings=settings, store=store, transport=transport)
        self.executor = executor
        self.local = local
        self.clusters = clusters
        # The cluster simulations run on (None: this machine); its executor and transport are
        # the ones above.
        self.cluster = cluster

    def executor_for(self, step: BeamState) -> Executor:
        """The local executor for local steps, the configured one for the simulation."""
        return self.local if step in LOCAL_STEPS else self.executor

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
