"""What a person asks of the pipeline from outside `serve`: status views, retry and cancel.

These work whether or not `serve` is running: they write the store (intent first) and, for cancel,
signal the attempt's process group directly; a running `serve` notices on its next tick.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from simbridge.jobs.clusters import LOCAL, Clusters
from simbridge.jobs.errors import JobsConfigError, NotFoundError, RemoteError, StaleStateError
from simbridge.jobs.executors import Executor, make_executor
from simbridge.jobs.names import safe_key
from simbridge.jobs.pipeline import attempt_ref, logs_dir
from simbridge.jobs.states import BeamState, case_state, progress, retry_target
from simbridge.jobs.store import AttemptRow, BeamRow, CaseRow, Store
from simbridge.logs import get_logger
from simbridge.processes import signal_name

log = get_logger(__name__)


@dataclass(frozen=True)
class BeamView:
    """One beam as shown to people.

    ``exit_code`` is set only for an exit; a death by signal sets ``signal`` (``SIGKILL``) instead.
    ``tries`` counts the launches of the step the beam is in (or failed in); for a COMPLETED beam,
    of its simulation (each move resets the per-step count, so the store counts its attempts).
    """

    case: str
    beam: str
    name: str
    state: str
    gpu: str | None
    job_id: str | None
    tries: int
    elapsed_s: float | None
    exit_code: int | None
    last_error: str | None
    progress: float
    signal: str | None = None
    # What the scheduler says of the running attempt (Slurm: "PENDING (Priority)", "RUNNING").
    scheduler: str | None = None


@dataclass(frozen=True)
class CaseView:
    """One case with its derived state and its beams."""

    case: str
    name: str
    state: str
    created_at: float
    beams: tuple[BeamView, ...]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def scheduler_text(attempt: AttemptRow | None) -> str | None:
    """``PENDING (Priority)`` from an attempt's scheduler state and reason; None if it has none."""
    if attempt is None or not attempt.scheduler_state:
        return None
    reason = attempt.scheduler_reason
    return f"{attempt.scheduler_state} ({reason})" if reason else attempt.scheduler_state


def beam_view(
    case: CaseRow, beam: BeamRow, now: float, attempt: AttemptRow | None = None, *, tries: int | None = None
) -> BeamView:
    """How one beam looks on screen (progress is the pipeline position, 0..1); ``tries`` replaces
    the beam's count of tries of its current step (see :class:`BeamView`)."""
    start = beam.started_at or beam.created_at
    end = beam.finished_at if beam.state.terminal else now
    return BeamView(
        case=case.key,
        beam=beam.key,
        name=beam.name,
        state=beam.state.value,
        gpu=beam.gpu_id,
        job_id=beam.hpc_job_id,
        tries=beam.step_tries if tries is None else tries,
        elapsed_s=(end - start) if end is not None else None,
        # The store keeps a signal death as minus the signal number (see processes.end_text).
        exit_code=beam.exit_code if beam.exit_code is None or beam.exit_code >= 0 else None,
        last_error=beam.last_error,
        progress=progress(beam.state),
        signal=signal_name(-beam.exit_code) if beam.exit_code is not None and beam.exit_code < 0 else None,
        scheduler=scheduler_text(attempt),
    )


def snapshot(store: Store, case: str | None = None) -> list[CaseView]:
    """Every case (or one, by key or folder name) with its beams, oldest first."""
    now = time.time()
    cases = [find_case(store, case)] if case is not None else store.cases()
    one = cases[0].id if case is not None else None
    by_case: dict[int, list[BeamRow]] = {}
    for beam in store.beams(case_id=one):
        by_case.setdefault(beam.case_id, []).append(beam)
    running = {a.beam_id: a for a in store.open_attempts()}
    # A COMPLETED beam's tries: its simulation's launches (the per-step count ends at 0 there).
    ran = store.launches(step=BeamState.RUNNING, state=BeamState.COMPLETED, case_id=one)
    views = []
    for c in cases:
        beams = by_case.get(c.id, [])
        views.append(
            CaseView(
                case=c.key,
                name=c.name,
                state=case_state(b.state for b in beams).value,
                created_at=c.created_at,
                beams=tuple(beam_view(c, b, now, running.get(b.id), tries=ran.get(b.id)) for b in beams),
            )
        )
    return views


def find_case(store: Store, ref: str) -> CaseRow:
    """A case by key, or by its original folder name."""
    try:
        return store.case(ref)
    except NotFoundError:
        return store.case(safe_key(ref))


def resolve(store: Store, target: str) -> tuple[CaseRow, list[BeamRow]]:
    """``CASE`` (all its beams) or ``CASE/BEAM`` (one beam), by key or original name."""
    case_ref, _, beam_ref = target.partition("/")
    case = find_case(store, case_ref)
    beams = store.beams(case_id=case.id)
    if beam_ref:
        beams = [b for b in beams if beam_ref in {b.key, b.name}]
        if not beams:
            raise NotFoundError(
                f"case {case.key} has no beam {beam_ref!r}; see `simbridge status {case.key}`"
            )
    return case, beams


def retry(store: Store, target: str, *, failed: bool = True, cancelled: bool = False) -> list[str]:
    """Put failed (and/or cancelled) beams back in line from the step that failed; their keys."""
    _, beams = resolve(store, target)
    done = []
    wanted = {BeamState.FAILED} if failed else set()
    if cancelled:
        wanted.add(BeamState.CANCELLED)
    for beam in beams:
        to = retry_target(beam.state, beam.failed_step) if beam.state in wanted else None
        if to is None:
            continue
        try:
            store.transition(
                beam.id,
                beam.state,
                to,
                reason=f"retry requested (was {beam.state}, resumes at {to})",
                step_tries=0,
                not_before=None,
                last_error=None,
                exit_code=None,
                finished_at=None,
            )
        except StaleStateError:
            continue
        done.append(beam.key)
    return done


def cancel(
    store: Store,
    target: str,
    *,
    work_root: Path,
    grace_s: float,
    clusters: Clusters | None = None,
) -> list[str]:
    """Cancel every unfinished beam of the target: record it, then kill its processes.

    A job on a cluster is cancelled by its executor there (``scancel`` on Slurm, the remote process
    group on a plain host), through ``clusters``.
    """
    _, beams = resolve(store, target)
    executors: dict[str, Executor] = {}
    done = []
    for beam in beams:
        for _ in range(5):  # `serve` may move the beam meanwhile: retry on the fresh state
            current = store.beam(beam.id)
            if current.state.terminal:
                break
            try:
                store.transition(beam.id, current.state, BeamState.CANCELLED, reason="cancel requested")
            except StaleStateError:
                continue
            done.append(beam.key)
            break
        # Kill what runs for it (also an attempt left open by an earlier, interrupted cancel).
        for attempt in store.open_attempts(beam_id=beam.id):
            if store.beam(beam.id).state is not BeamState.CANCELLED:
                break
            case = store.case(beam.case_id)
            if attempt.executor == LOCAL:
                ex = executors.get(LOCAL)
                if ex is None:
                    ex = executors[LOCAL] = make_executor(LOCAL)
            else:
                if clusters is None or not clusters.known(attempt.executor):
                    raise JobsConfigError(
                        f"beam {beam.key} runs on cluster {attempt.executor!r}, which is not in the "
                        "clusters section; add it back to cancel its job there"
                    )
                ex = clusters.get(attempt.executor).executor
            # A remote executor derives its remote files from the same local log prefix.
            ref = attempt_ref(logs_dir(work_root.resolve(), case.key, beam.key), attempt)
            try:
                killed = ex.cancel(ref, grace_s=grace_s)
            except RemoteError as exc:
                # The beam is CANCELLED already; the attempt stays open, so a running serve (or
                # the next cancel) cancels the job once the cluster answers.
                log.warning("jobs.cancel_unreached", beam=beam.id, cluster=attempt.executor, error=str(exc))
                store.add_event(
                    case_id=beam.case_id,
                    beam_id=beam.id,
                    reason=f"cancel: cluster {attempt.executor} unreachable ({exc}); job "
                    f"{attempt.job_id} is cancelled when it answers",
                )
                continue
            store.close_attempt(attempt.id, outcome="cancelled", exit_code=None)
            store.add_event(
                case_id=beam.case_id,
                beam_id=beam.id,
                reason=f"cancel: {'killed' if killed else 'no process of'} job {attempt.job_id}",
            )
    return done
