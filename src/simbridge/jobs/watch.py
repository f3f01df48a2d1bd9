"""The dispatcher's watcher and its remote side: one poll of every open attempt per executor (per
cluster at most once per its poll_s), adoption of attempts found again after a crash, the verdict on
each ended one, and the launch of a cluster's ready beams (one job array when it pays). A cluster
that drops is backed off and never fails a beam; one that refuses us (key, user) stops serve.

A mixin of :class:`~simbridge.jobs.dispatcher.Dispatcher`, kept apart so each module stays small.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from collections.abc import Callable

from simbridge.config import JobsSettings
from simbridge.jobs import remote
from simbridge.jobs.clusters import LOCAL, Cluster, Clusters, is_fatal
from simbridge.jobs.errors import LeaseLostError, RemoteError, SchedulerError, StaleStateError, StoreError
from simbridge.jobs.executors import Executor, JobInfo, JobRef, JobStatus
from simbridge.jobs.executors.local import LocalExecutor
from simbridge.jobs.pipeline import Pipeline
from simbridge.jobs.remote import remote_cause
from simbridge.jobs.states import LAUNCHED_FROM, BeamState
from simbridge.jobs.store import AttemptRow, BeamRow, Store
from simbridge.logs import get_logger

log = get_logger(__name__)

# Steps that need the cluster when simulations run remotely (held back while it is unreachable).
REMOTE_STATES = frozenset({BeamState.UPLOADING, BeamState.QUEUED, BeamState.COLLECTING})
_UPSTREAM = frozenset({BeamState.PENDING, BeamState.PREPARING, BeamState.UPLOADING})
# How long ready beams may wait for the rest of their case before a job array goes out anyway.
ARRAY_GATHER_S = 2.0


class Watching:
    """The watcher and the remote launches; the state below is the dispatcher's own."""

    jobs: JobsSettings
    store: Store
    pipeline: Pipeline
    local: LocalExecutor
    clusters: Clusters
    cluster: Cluster | None
    _lock: threading.Lock
    _busy: set[int]
    _launching: set[int]
    _recent: set[int]
    _recent_seen: set[int]
    _open: dict[int, AttemptRow]
    _polled_at: dict[str, float]
    _unknown: set[str]
    _gather_since: float | None
    _fatal: RemoteError | None

    def stop(self) -> None:
        raise NotImplementedError  # the dispatcher's

    def _submit(self, beam_id: int, action: Callable[[], object], *, launching: bool) -> None:
        raise NotImplementedError  # the dispatcher's

    def _submit_batch(self, beam_ids: list[int], action: Callable[[], object], *, launching: bool) -> None:
        raise NotImplementedError  # the dispatcher's

    def _remote_failed(self, exc: RemoteError, cluster: str | None = None) -> None:
        """A remote error outside a beam's own fault: back off, or stop serve for good."""
        if cluster is None and self.cluster is not None:
            cluster = self.cluster.name
        if is_fatal(exc):
            if self._fatal is None:
                log.error("jobs.cluster_refused", cluster=cluster, error=str(exc))
                self._fatal = exc
            self.stop()
            return
        target = None if cluster is None else self._cluster(cluster)
        delay = target.backoff.failed(exc) if target is not None else 0.0
        log.warning("jobs.cluster_unreachable", cluster=cluster, error=str(exc), retry_in_s=delay)

    def _watch_failed(self, name: str, exc: BaseException) -> None:
        cluster = self._cluster(name)
        if cluster is None:
            log.exception("jobs.watch_failed", executor=name)
            return
        delay = cluster.backoff.failed(exc)
        log.warning("jobs.cluster_watch_failed", cluster=name, error=str(exc)[:300], retry_in_s=delay)

    def _cluster(self, name: str) -> Cluster | None:
        if name == LOCAL:
            return None
        if self.cluster is not None and name == self.cluster.name:
            return self.cluster
        return self.clusters.get(name) if self.clusters.known(name) else None

    def _executor_of(self, name: str) -> Executor | None:
        if name == LOCAL:
            return self.local
        cluster = self._cluster(name)
        return None if cluster is None else cluster.executor

    def _watch(self, now: float) -> None:
        with self._lock:
            # Taken before the query: a launch that ended before this point is in the query.
            self._recent_seen, self._recent = self._recent, set()
            launching = set(self._launching)
        attempts = self.store.open_attempts()
        self._open = {a.beam_id: a for a in attempts}
        if not attempts:
            return
        beams = {b.id: b for b in self.store.beams(ids=self._open.keys())}
        by_executor: dict[str, list[AttemptRow]] = {}
        for attempt in attempts:
            if attempt.beam_id in launching or attempt.beam_id not in beams:
                continue
            by_executor.setdefault(attempt.executor, []).append(attempt)
        for name, group in by_executor.items():
            executor = self._watched_executor(name, now)
            if executor is None:
                continue
            try:
                self._watch_group(executor, group, beams, now)
            except (StoreError, LeaseLostError):
                raise
            except Exception as exc:
                # The watcher never fails a beam for the cluster's trouble: it asks again later.
                cause = remote_cause(exc)
                if cause is not None and is_fatal(cause):
                    self._remote_failed(cause, name)
                    continue
                self._watch_failed(name, exc)
                continue
            cluster = self._cluster(name)
            if cluster is not None:
                cluster.backoff.ok()
                self._polled_at[name] = now

    def _watched_executor(self, name: str, now: float) -> Executor | None:
        """The executor to poll for ``name`` now (None: not now, or not configured any more)."""
        if name == LOCAL:
            return self.local
        if not self.clusters.known(name):
            if name not in self._unknown:
                self._unknown.add(name)
                log.error(
                    "jobs.cluster_unknown",
                    cluster=name,
                    fix="put the cluster back in the clusters section to finish or cancel its beams",
                )
            return None
        cluster = self._cluster(name)
        assert cluster is not None
        # A cluster that just failed is left alone for its backoff; a healthy one is asked at
        # most once per its poll_s (site admins may ask for minutes between scheduler queries).
        if cluster.backoff.waiting() or now - self._polled_at.get(name, 0.0) < cluster.settings.poll_s:
            return None
        return cluster.executor

    def _watch_group(
        self, executor: Executor, attempts: list[AttemptRow], beams: dict[int, BeamRow], now: float
    ) -> None:
        """Find, poll (once for the whole group) and judge the open attempts of one executor."""
        items: list[tuple[AttemptRow, JobRef]] = []
        for attempt in attempts:
            beam = beams[attempt.beam_id]
            ref = self.pipeline.ref(attempt, beam)
            if attempt.pid is None and attempt.job_id is None:
                try:
                    found = executor.find(ref)
                except SchedulerError as exc:
                    # The scheduler cannot say now: ask again next tick, never relaunch meanwhile.
                    log.warning("jobs.find_failed", beam=beam.id, error=str(exc)[:300])
                    continue
                if found is not None:
                    self.store.record_launch(
                        attempt.id,
                        beam_id=beam.id,
                        job_id=found.job_id,
                        pid=found.pid,
                        pid_start=found.pid_start,
                        simulation=attempt.step is BeamState.RUNNING,
                    )
                    log.info("jobs.attempt_adopted", beam=beam.id, job_id=found.job_id)
                    ref = dataclasses.replace(
                        ref, job_id=found.job_id, pid=found.pid, pid_start=found.pid_start
                    )
                elif not remote.marker_exists(self.pipeline, attempt, ref):
                    self._never_started(attempt, beam)
                    continue
            items.append((attempt, ref))
        if not items:
            return
        infos = executor.poll([ref for _, ref in items])
        for attempt, ref in items:
            info = infos.get(ref.token)
            if info is not None:
                self._judge(attempt, ref, beams[attempt.beam_id], info, now)

    def _never_started(self, attempt: AttemptRow, beam: BeamRow) -> None:
        # Killed between writing the intent and launching: nothing ran, so this was no try.
        if not self.store.close_attempt(attempt.id, outcome="unlaunched", exit_code=None):
            return
        self.store.forget_try(beam.id)
        log.info("jobs.attempt_never_started", beam=beam.id, step=attempt.step)
        start = LAUNCHED_FROM[attempt.step]
        if beam.state is attempt.step and start is not attempt.step:
            with contextlib.suppress(StaleStateError):
                self.store.transition(
                    beam.id,
                    attempt.step,
                    start,
                    reason=f"launch was interrupted before it started; back to {start}",
                    step_tries=max(0, beam.step_tries - 1),
                )

    def _judge(self, attempt: AttemptRow, ref: JobRef, beam: BeamRow, info: JobInfo, now: float) -> None:
        with self._lock:
            if beam.id in self._busy:
                return  # a kill (timeout/cancel) is under way; it judges the attempt itself
        executor = self._executor_of(attempt.executor)
        if executor is None:
            return
        if info.scheduler_state and (info.scheduler_state, info.reason) != (
            attempt.scheduler_state,
            attempt.scheduler_reason,
        ):
            # What the scheduler says (PENDING + Priority, TIMEOUT...): written only when it changes.
            self.store.record_scheduler(attempt.id, state=info.scheduler_state, reason=info.reason)
        if info.status is JobStatus.RUNNING:
            if beam.state is not attempt.step:
                # Cancelled (by `simbridge cancel` in another process that died midway).
                self._submit_once(beam.id, functools.partial(self._kill, executor, attempt, ref, None))
            elif now > attempt.deadline:
                kill = functools.partial(self._kill, executor, attempt, ref, "timeout")
                self._submit_once(beam.id, kill)
            return
        # Killed or vanished past its deadline: our own kill of an earlier tick (perhaps by a
        # process that died before it could judge it), or the limit anyway.
        timed_out = info.status in {JobStatus.LOST, JobStatus.KILLED} and now > attempt.deadline
        try:
            self.pipeline.finish(attempt, info, timed_out=timed_out, beam=beam)
        except StaleStateError as exc:
            log.debug("jobs.judge_skipped", beam=beam.id, reason=str(exc))

    def _submit_once(self, beam_id: int, action: Callable[[], object]) -> None:
        with self._lock:
            if beam_id in self._busy:
                return
        self._submit(beam_id, action, launching=False)

    def _kill(self, executor: Executor, attempt: AttemptRow, ref: JobRef, why: str | None) -> None:
        executor.cancel(ref, grace_s=self.jobs.timeouts.kill_grace_s)
        if why == "timeout":
            log.warning("jobs.attempt_timeout", beam=attempt.beam_id, step=attempt.step)
            self.pipeline.finish(attempt, JobInfo(JobStatus.LOST, detail="timeout"), timed_out=True)
        else:
            self.store.close_attempt(attempt.id, outcome="cancelled", exit_code=None)

    def _launch_remote(self, ready: list[BeamRow]) -> None:
        """Submit the cluster's ready beams: one job array when Slurm arrays pay off, else one by one.

        With arrays on, ready beams wait a moment (at most ARRAY_GATHER_S) while others are still
        being prepared or uploaded, so a case goes out as one array rather than many small ones.
        """
        if not ready:
            self._gather_since = None
            return
        cluster = self.cluster
        assert cluster is not None
        cfg = cluster.settings.slurm
        arrays = cluster.slurm and cfg.arrays and callable(getattr(cluster.executor, "submit_many", None))
        # Asked only when an array could form: are other beams still on their way here?
        with self._lock:
            # Beams whose step just ended are off this tick's list: their state is not known yet.
            settling = self._busy or (self._recent | self._recent_seen) - set(self._open) - {
                b.id for b in ready
            }
        if arrays and (settling or self.store.beams(states=_UPSTREAM)):
            now = time.monotonic()
            if self._gather_since is None:
                self._gather_since = now
            if now - self._gather_since < ARRAY_GATHER_S:
                return
        self._gather_since = None
        if arrays and len(ready) >= cfg.array_min:
            ids = [b.id for b in ready]
            self._submit_batch(
                ids, functools.partial(remote.submit_many, self.pipeline, ready), launching=True
            )
            return
        for beam in ready:
            self._submit(
                beam.id, functools.partial(remote.submit_many, self.pipeline, [beam]), launching=True
            )
