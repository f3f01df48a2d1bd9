"""The per-beam steps: what to do in each state (start, prepare, upload, submit, collect,
postprocess), chained back to back while they run in process.

Every action is idempotent: it is decided from the stored state alone, writes its intent before it
acts (an attempt row before a launch), and can run again after a crash without doing work twice.
Built in three layers: layout.py (paths and template fields), attempts.py (launching and ending
attempts), and the steps here; remote.py holds the cluster side. The names they define are
re-exported here, where callers have always found them.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tenacity import (
    Retrying,
    retry_if_exception_type,
    retry_if_not_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

from simbridge.gpus import GpuLease
from simbridge.jobs import remote as remote_steps
from simbridge.jobs.attempts import LOCAL_STEPS, Attempts
from simbridge.jobs.errors import RemoteError, TransferError, UnsafeFileError
from simbridge.jobs.layout import BeamPaths, attempt_ref, logs_dir, render
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import AttemptRow, BeamRow

__all__ = ["LOCAL_STEPS", "BeamPaths", "Pipeline", "attempt_ref", "logs_dir", "render"]

T = TypeVar("T")


class Pipeline(Attempts):
    """The steps of every beam, bound to one store, executor, transport and GPU pool."""

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
        count = self._copy(beam, BeamState.UPLOADING, lambda: self.transport.upload(local, remote))
        if count is None:
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
        got = self._copy(
            beam, BeamState.COLLECTING, lambda: self.transport.download(remote, patterns, results)
        )
        if got is None:
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

    def _copy(self, beam: BeamRow, step: BeamState, call: Callable[[], T]) -> T | None:
        """Run an upload or download for ``step``; None when it failed the beam.

        A passing remote error (host away, link dropped) is raised: the dispatcher backs off (or
        stops) and the beam stays in ``step``. Anything else (a copy that failed its retries, disk
        full, permission denied, a path outside remote_root) fails the beam, saying why; the local
        files stay, so `simbridge retry` resumes here once it is fixed.
        """
        try:
            return self._transfer(call)
        except TransferError as exc:
            self.fail(beam, step, str(exc))
        except RemoteError as exc:
            if remote_steps.passing(exc):
                raise
            self.fail(beam, step, str(exc))
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
