"""The scheduler's word on an attempt (Slurm state + reason) is stored and shown by status/--json."""

from __future__ import annotations

from pathlib import Path

from simbridge.jobs.control import snapshot
from simbridge.jobs.executors import JobInfo, JobStatus
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store


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
