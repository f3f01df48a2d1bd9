"""The scheduler's word on an attempt (Slurm state + reason) is stored and shown by status/--json,
and the pipeline follows the executor's retry policy per named reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from simbridge.config import JobsSettings
from simbridge.jobs.control import snapshot
from simbridge.jobs.executors import JobInfo, JobStatus, LocalExecutor
from simbridge.jobs.pipeline import Pipeline
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import AttemptRow, BeamRow, Store
from simbridge.jobs.transport import LocalTransport


def test_scheduler_state_is_stored_and_shown(tmp_path: Path) -> None:
    with Store(url=f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        store.add_case(key="c", name="c", source="src", root="root", beams_=[("b", "b", str(tmp_path))])
        (beam,) = store.beams()
        store.transition(beam.id, BeamState.PENDING, BeamState.PREPARING, reason="started")
        attempt = store.open_attempt(
            beam.id,
            expected=BeamState.PREPARING,
            target=BeamState.PREPARING,
            token="t1",
            executor="hpc",
            work_dir=str(tmp_path),
            deadline=1e12,
        )
        assert attempt.scheduler_state is None
        store.record_scheduler(attempt.id, state="PENDING", reason="Priority")
        (row,) = store.open_attempts()
        assert (row.scheduler_state, row.scheduler_reason) == ("PENDING", "Priority")
        (view,) = snapshot(store)
        assert view.beams[0].scheduler == "PENDING (Priority)"
        assert view.as_dict()["beams"][0]["scheduler"] == "PENDING (Priority)"
        store.close_attempt(attempt.id, outcome="ok", exit_code=0)
        (view,) = snapshot(store)
        assert view.beams[0].scheduler is None  # only a live attempt's word is shown


def test_describe_names_the_reason() -> None:
    assert JobInfo(JobStatus.RUNNING, scheduler_state="PENDING", reason="Resources").describe() == (
        "pending (Resources)"
    )
    assert JobInfo(JobStatus.KILLED, signal=15, reason="TIMEOUT").describe().endswith("(TIMEOUT)")


def _running_beam(store: Store, tmp_path: Path) -> tuple[BeamRow, AttemptRow]:
    store.add_case(key="c", name="c", source="src", root="root", beams_=[("b", "b", str(tmp_path))])
    (beam,) = store.beams()
    for here, there in [
        (BeamState.PENDING, BeamState.PREPARING),
        (BeamState.PREPARING, BeamState.UPLOADING),
        (BeamState.UPLOADING, BeamState.QUEUED),
    ]:
        store.transition(beam.id, here, there, reason="test")
    attempt = store.open_attempt(
        beam.id,
        expected=BeamState.QUEUED,
        target=BeamState.RUNNING,
        token="t1",
        executor="hpc",
        work_dir=str(tmp_path),
        deadline=1e12,
    )
    return store.beam(beam.id), attempt


@pytest.mark.parametrize(("transient", "after"), [(True, BeamState.QUEUED), (False, BeamState.FAILED)])
def test_the_pipeline_follows_the_executors_policy_per_reason(
    tmp_path: Path, transient: bool, after: BeamState
) -> None:
    settings = JobsSettings(work_root=tmp_path / "work", results=tmp_path / "results")
    with Store(url=f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        beam, attempt = _running_beam(store, tmp_path)
        pipeline = Pipeline(
            settings=settings,
            store=store,
            executor=LocalExecutor(),
            local=LocalExecutor(),
            transport=LocalTransport(root=tmp_path / "remote"),
        )
        info = JobInfo(
            JobStatus.LOST,
            detail="job 7 its node failed",
            scheduler_state="NODE_FAIL",
            reason="NODE_FAIL",
            transient=transient,
            log_tail="remote stderr line\n",
        )
        pipeline.finish(attempt, info, beam=beam)
        ended = store.beam(beam.id)
        assert ended.state is after
        if after is BeamState.FAILED:
            assert ended.last_error is not None
            assert "NODE_FAIL" in ended.last_error and "remote stderr line" in ended.last_error
