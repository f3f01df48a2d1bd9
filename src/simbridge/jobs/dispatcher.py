"""The dispatcher: turns cases into beams and drives every beam through the pipeline, durably.

One loop owns scheduling and the status watcher (one poll of all open attempts per tick); the
steps that copy or launch run on a bounded thread pool. Threads, not processes: the heavy work
happens in child processes, the steps only copy files, launch and write short transactions, and
one process keeps GPU leases and the database handle simple. All state lives in the store, so a
restart reconciles whatever was in flight: adopt a running attempt, collect one that ended
while we were away, relaunch one that never started.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import FrameType, TracebackType

import tenacity

from simbridge.config import Settings
from simbridge.gpus import GpuPool
from simbridge.gpus.errors import LeaseTimeout
from simbridge.jobs.clusters import LOCAL, Cluster, Clusters
from simbridge.jobs.errors import (
    BadNameError,
    CaseRejectedError,
    JobsConfigError,
    LeaseLostError,
    RemoteError,
    StaleStateError,
    StoreError,
    StoreLostError,
)
from simbridge.jobs.executors import Executor
from simbridge.jobs.executors.local import LocalExecutor
from simbridge.jobs.inbox import RETRY_INITIAL_S, Inbox
from simbridge.jobs.intake import NOTE_PREFIX, is_taken, reject_case, shown, take_case, tree_limits
from simbridge.jobs.names import safe_key
from simbridge.jobs.pipeline import LOCAL_STEPS, Pipeline
from simbridge.jobs.remote import passing, remote_cause
from simbridge.jobs.states import IN_FLIGHT, NEXT, SCHEDULABLE, BeamState
from simbridge.jobs.store import AttemptRow, Store, default_actor
from simbridge.jobs.store.base import FILE_CHECK_S
from simbridge.jobs.store.faults import STORE_BACKOFF_MAX_S, StoreTrouble
from simbridge.jobs.store.lease import OrchestratorLease
from simbridge.jobs.transport import LocalTransport
from simbridge.jobs.watch import REMOTE_STATES, Watching
from simbridge.logs import get_logger

log = get_logger(__name__)

SCAN_LIMIT = 256


def _store_error(state: tenacity.RetryCallState) -> StoreError:
    exc = state.outcome.exception() if state.outcome is not None else None
    return exc if isinstance(exc, StoreError) else StoreError(repr(exc))


class Dispatcher(Watching):
    """Watch the inbox and run every beam to the end. A context manager (owns threads, store)."""

    def __init__(
        self,
        *,
        settings: Settings,
        store: Store | None = None,
        watch_inbox: bool = True,
        clusters: Clusters | None = None,
    ) -> None:
        jobs = settings.jobs
        if jobs.steps.simulate is None:
            raise JobsConfigError(
                "jobs.steps.simulate is not set: give the simulation command template in "
                "simbridge.yaml (jobs: steps: simulate: ...) or SIMBRIDGE_JOBS__STEPS__SIMULATE"
            )
        self.settings = settings
        self.jobs = jobs
        self._own_store = store is None
        self.store = store or Store(url=jobs.db_url(), actor=default_actor("serve"))
        self._trouble = StoreTrouble()
        self._lost: str | None = None  # why this serve must stop (lease or database lost)
        self._recovered = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._fatal: RemoteError | None = None  # a cluster refused us for good (key, user)
        self.local = LocalExecutor(notify=self._wake.set)
        # One connection, transport and executor per cluster, closed when serve ends.
        # (``clusters`` may be given: built another way, e.g. a cluster whose login node is this host.)
        self.clusters = clusters or Clusters(settings=settings, store=self.store)
        self.cluster: Cluster | None = None
        try:
            if jobs.executor != LOCAL:
                self.cluster = self.clusters.get(jobs.executor)
        except BaseException:
            self.clusters.close()
            if self._own_store:
                self.store.close()
            raise
        self.executor: Executor = self.local if self.cluster is None else self.cluster.executor
        self.pipeline = Pipeline(
            settings=jobs,
            store=self.store,
            executor=self.executor,
            local=self.local,
            transport=(
                LocalTransport(root=jobs.work_root.resolve() / "remote")
                if self.cluster is None
                else self.cluster.transport
            ),
            clusters=self.clusters,
            cluster=self.cluster,
        )
        self.gpus = GpuPool.from_settings(settings)
        # Remote simulations get their GPUs from the scheduler or the host's own assignment.
        if self.cluster is None and jobs.gpus_per_beam > len(self.gpus.gpus):
            self.gpus.close()
            self.clusters.close()
            if self._own_store:
                self.store.close()
            raise JobsConfigError(
                f"jobs.gpus_per_beam is {jobs.gpus_per_beam} but the pool has {len(self.gpus.gpus)} GPU(s); "
                "no beam could ever start: lower jobs.gpus_per_beam or configure more gpus.slots"
            )
        self._threads = ThreadPoolExecutor(max_workers=jobs.workers, thread_name_prefix="sb-step")
        self._busy: set[int] = set()  # beams with an action on the pool
        self._launching: set[int] = set()  # beams whose attempt row may not have a pid yet
        self._recent: set[int] = set()  # launched since the last look at open attempts
        self._recent_seen: set[int] = set()
        self._ingesting: set[str] = set()
        self._open: dict[int, AttemptRow] = {}
        self._gather_since: float | None = None  # ready beams held back for one job array
        self._polled_at: dict[str, float] = {}  # cluster -> when its jobs were last polled
        self._unknown: set[str] = set()  # clusters named by attempts but no longer configured
        self._lock = threading.Lock()
        self._inbox: Inbox | None = None
        if watch_inbox:
            self._inbox = Inbox(
                root=jobs.inbox,
                ready_marker=jobs.ready_marker,
                stable_s=jobs.stable_s,
                is_taken=lambda name: is_taken(self.store, name),
                on_change=self._wake.set,
                on_late_beam=self._late_beam,
            )
        # One orchestrator per database. Taken last, so a failure above never leaves it held
        # (nothing above writes); from here on every write of this store is fenced by it.
        self.lease = OrchestratorLease(self.store, ttl_s=jobs.orchestrator_lease_s, on_lost=self._lease_lost)
        try:
            self.lease.acquire()
        except BaseException:
            self._threads.shutdown(wait=False)
            self.gpus.close()
            self.clusters.close()
            if self._own_store:
                self.store.close()
            raise
        self.store.fence(self.lease)
        self.lease.start()

    # ---- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Dispatcher:
        if self._inbox is not None:
            self._inbox.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop scheduling, let running steps finish (bounded), then release everything.

        Order matters: the pool drains before the store closes, since its steps write to it.
        Launched processes keep running; the next start adopts them.
        """
        self._stop.set()
        if self._inbox is not None:
            self._inbox.__exit__(None, None, None)
        self._threads.shutdown(wait=True, cancel_futures=True)
        self.gpus.close()
        # After the steps drained (they use the connections); remote jobs keep running.
        self.clusters.close()
        self._let_go()

    def _let_go(self) -> None:
        # After the steps drained (they write under the lease), before the store closes.
        self.lease.__exit__(None, None, None)
        self.store.fence(None)
        if self._own_store:
            self.store.close()

    def _lease_lost(self, why: str) -> None:
        self._lost = why
        self.stop()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current tick (signal-safe)."""
        self._stop.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT stop the loop (children keep running and are adopted later)."""

        def handler(signum: int, _frame: FrameType | None) -> None:
            log.info("jobs.serve_stopping", signal=signal.Signals(signum).name)
            self.stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def run(self, *, until_idle: bool = False, max_s: float | None = None) -> bool:
        """Loop until stopped (or idle, or ``max_s`` passed); True if it ended idle.

        A failing store (locked, restarting, unreachable) is waited out with a capped backoff,
        still bounded by ``max_s`` and by :meth:`stop`; nothing is failed meanwhile. A lost
        database or a lost lease raises: this serve must stop rather than guess.
        """
        deadline = None if max_s is None else time.monotonic() + max_s

        def over() -> bool:
            return deadline is not None and time.monotonic() >= deadline

        def pause(seconds: float) -> None:
            left = seconds if deadline is None else min(seconds, max(0.0, deadline - time.monotonic()))
            self._stop.wait(left)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(
                lambda exc: isinstance(exc, StoreError) and not isinstance(exc, StoreLostError)
            ),
            wait=tenacity.wait_exponential(multiplier=0.1, max=STORE_BACKOFF_MAX_S),
            stop=lambda _state: self._stop.is_set() or over(),
            sleep=pause,
            before_sleep=lambda state: self._trouble.failed(_store_error(state)),
            reraise=True,
        )
        self._recovered = False
        while not self._stop.is_set():
            try:
                idle = retrying(self._turn, until_idle)
            except (StoreLostError, LeaseLostError):
                raise
            except StoreError as exc:
                self._trouble.failed(exc)
                break  # stopped or out of time while the store was failing
            self._trouble.ok()
            if idle:
                return True
            if over():
                return False
            self._wake.wait(self.jobs.poll_s)
            self._wake.clear()
        if self._lost is not None:
            raise LeaseLostError(self._lost)
        if self._fatal is not None:
            raise self._fatal
        return False

    def _turn(self, until_idle: bool) -> bool:
        """One tick (after recovery, once): True if ``until_idle`` and nothing is left to do."""
        if not self._recovered:
            self.recover()
            self._recovered = True
        # A deleted or replaced database file stops serve here. Not a stat() per tick: each one
        # hands the GIL to the step threads, which costs the hot path more than the stat itself.
        self.store.check(every=FILE_CHECK_S)
        self.tick()
        return until_idle and self.idle()

    def recover(self) -> None:
        """Say what was in flight when we (re)started; the first tick reconciles it."""
        in_flight = self.store.beams(states=IN_FLIGHT)
        open_attempts = self.store.open_attempts()
        if in_flight or open_attempts:
            log.info(
                "jobs.recovering",
                beams_in_flight=len(in_flight),
                open_attempts=len(open_attempts),
            )

    def idle(self) -> bool:
        """Nothing left to do: no active beam, no step running, no case being taken or settling."""
        with self._lock:
            if self._busy or self._ingesting or self._recent:
                return False
        if self._open:  # as of this tick's look; saves a count over every beam per tick
            return False
        if self._inbox is not None and self._inbox.pending():
            return False
        return self.store.count_active() == 0

    # ---- one tick ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Watch the open attempts, take complete cases, and start what can start now."""
        self._watch(time.time())
        self._take_cases()
        if not self._stop.is_set():
            self._schedule(time.time())

    def _submit(self, beam_id: int, action: Callable[[], object], *, launching: bool) -> None:
        self._submit_batch([beam_id], action, launching=launching)

    def _submit_batch(self, beam_ids: list[int], action: Callable[[], object], *, launching: bool) -> None:
        """One action on the pool for one beam, or for several (a job array): all busy till it ends."""
        with self._lock:
            self._busy.update(beam_ids)
            if launching:
                self._launching.update(beam_ids)

        def done(_fut: Future[None]) -> None:
            with self._lock:
                self._busy.difference_update(beam_ids)
                if launching:
                    # Its attempt row is committed but our last look at open attempts may
                    # predate it: keep the beam off the schedule until the next look.
                    self._recent.update(beam_ids)
                self._launching.difference_update(beam_ids)
            self._wake.set()

        self._threads.submit(self._guard, beam_ids[0], action).add_done_callback(done)

    def _guard(self, beam_id: int, action: Callable[[], object]) -> None:
        try:
            action()
        except StaleStateError as exc:
            log.debug("jobs.step_skipped", beam=beam_id, reason=str(exc))
        except LeaseLostError as exc:
            self._lease_lost(str(exc))
        except StoreError as exc:
            # Never the beam's fault: it stays where it is and every step resumes from there
            # (an attempt launched but not yet recorded is found again by its token).
            self._trouble.failed(exc)
        except Exception as exc:  # a step must never take the dispatcher down
            cause = remote_cause(exc)
            if cause is not None and passing(exc):
                # Never the beam's fault either: it stays where it is until the host answers.
                self._remote_failed(cause)
            elif isinstance(exc, RemoteError):
                self._crashed(beam_id, str(exc))  # disk full, permission, path: the beam's error
            else:
                log.exception("jobs.step_crashed", beam=beam_id)
                self._crashed(beam_id, f"internal error: {exc!r}")

    def _crashed(self, beam_id: int, why: str) -> None:
        try:
            beam = self.store.beam(beam_id)
            if beam.state in SCHEDULABLE:  # a RUNNING beam's command is the watcher's
                self.pipeline.fail(beam, beam.state, f"{beam.state.lower()}: {why}")
        except Exception:
            log.exception("jobs.step_crash_unrecorded", beam=beam_id)

    def _take_cases(self) -> None:
        if self._inbox is None:
            return
        for folder in self._inbox.ready():
            name = folder.name
            with self._lock:
                # In this order: a take that just ended left _ingesting after marking it done.
                if name in self._ingesting or self._inbox.is_done(name):
                    continue
                self._ingesting.add(name)
            fut = self._threads.submit(self._take, folder)
            fut.add_done_callback(functools.partial(self._taken, name))

    def _take(self, folder: Path) -> None:
        assert self._inbox is not None
        try:
            taken = take_case(
                self.store,
                folder,
                work_root=self.jobs.work_root,
                ready_marker=self.jobs.ready_marker,
                limits=tree_limits(self.jobs.case_limits),
            )
        except (CaseRejectedError, BadNameError) as exc:
            self._inbox.mark_done(folder.name)
            if is_taken(self.store, folder.name):
                return  # `simbridge submit` took this very folder meanwhile: nothing is wrong
            # Rejected once, for good: moved aside so no tick offers it again, and shown.
            try:
                moved = reject_case(self._inbox.root, folder, str(exc))
            except OSError as move_exc:
                moved = None
                log.error("jobs.case_reject_unmoved", folder=str(folder), error=str(move_exc))
            log.warning("jobs.case_rejected", folder=str(folder), error=str(exc), moved_to=str(moved))
            return
        except LeaseLostError as exc:
            self._lease_lost(str(exc))
            return
        except StoreError as exc:
            self._trouble.failed(exc)
            # The store is failing: offered again after a backoff, and counted as pending till
            # then (a case whose ready marker is there is in no other list: --until-idle would
            # end with it untaken).
            self._inbox.defer(folder.name)
            return
        except Exception as exc:
            # Our side failed (disk full, database away): not the case's fault, so try again
            # later, backing off; each failure is logged, at most once per backoff delay.
            delay = self._inbox.defer(folder.name)
            log.warning(
                "jobs.case_take_failed",
                folder=str(folder),
                error=repr(exc),
                retry_in_s=delay,
                exc_info=delay == RETRY_INITIAL_S,  # the traceback once, not on every retry
            )
            return
        self._inbox.mark_done(folder.name, beams=set(taken.beam_names))

    def _late_beam(self, folder: str, beam: str) -> None:
        try:
            case = self.store.case(safe_key(folder))
            self.store.add_event(
                case_id=case.id,
                reason=f"{NOTE_PREFIX}beam folder {shown(beam)!r} appeared after the case was taken; "
                "it is not run (submit it as a new case)",
            )
        except Exception as exc:  # a note must never take the loop down
            log.warning("jobs.case_note_unrecorded", folder=shown(folder), error=repr(exc))

    def _taken(self, name: str, _fut: Future[None]) -> None:
        with self._lock:
            self._ingesting.discard(name)
        self._wake.set()

    def _schedule(self, now: float) -> None:
        with self._lock:
            busy = self._busy | self._recent | self._recent_seen
        skip = busy | set(self._open)
        room = 2 * self.jobs.workers - len(self._busy)
        if room <= 0:
            return
        rows = self.store.ready_ids(SCHEDULABLE, now=now, limit=room + 64, skip=skip)
        steps = self.jobs.steps
        commands = {BeamState.PREPARING: steps.prepare, BeamState.POSTPROCESSING: steps.postprocess}
        local_cmds = sum(1 for a in self._open.values() if a.step in LOCAL_STEPS)
        queued: list[int] = []
        chosen: list[tuple[int, bool]] = []
        states = dict(rows)
        for beam_id, state in rows:
            if state is BeamState.QUEUED:
                queued.append(beam_id)
                continue
            if len(chosen) >= room:
                continue
            # A beam in or heading into a command step needs a slot of the command budget.
            heads_to_command = commands.get(NEXT[state]) is not None
            may_launch = False
            if commands.get(state) is not None or heads_to_command:
                if local_cmds < self.jobs.max_preparing:
                    local_cmds += 1
                    may_launch = True
                elif state in commands:
                    continue
            chosen.append((beam_id, may_launch))
        if self.cluster is not None:
            # Remote: the scheduler (or the host's GPU assignment) queues the simulations. Nothing
            # that needs the cluster starts while it is backing off after a dropped link.
            if self.cluster.backoff.waiting():
                chosen = [(i, m) for i, m in chosen if states.get(i) not in REMOTE_STATES]
                queued = []
        else:
            # The GPU queue: strictly first come, first served (beam id order). When our own runs
            # already hold every GPU, asking the pool would only fail: skip the futile lease.
            ours = sum(1 for a in self._open.values() if a.step is BeamState.RUNNING)
            free = (len(self.gpus.gpus) - ours * self.jobs.gpus_per_beam) // self.jobs.gpus_per_beam
            queued = queued[: max(0, free)]
        wanted = [i for i, _ in chosen] + queued
        # One read of every beam acted on this tick (two while they were read apart).
        beams = {b.id: b for b in self.store.beams(ids=wanted)} if wanted else {}
        if chosen:
            for beam_id, may_launch in chosen:
                beam = beams.get(beam_id)
                if beam is not None:
                    action = functools.partial(self.pipeline.advance, beam, may_launch=may_launch)
                    self._submit(beam_id, action, launching=True)
        if queued and self.cluster is not None:
            ready = [beams[i] for i in queued if i in beams and beams[i].state is BeamState.QUEUED]
            self._launch_remote(ready)
        elif queued:
            for beam_id in queued:
                beam = beams.get(beam_id)
                if beam is None or beam.state is not BeamState.QUEUED:
                    continue
                try:
                    lease = self.gpus.lease(self.jobs.gpus_per_beam, timeout=0)
                except LeaseTimeout:
                    break
                launch = functools.partial(self.pipeline.submit, beam, lease)
                self._submit(beam_id, launch, launching=True)
