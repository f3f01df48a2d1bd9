"""The local executor's exit marker and child reaper, and the store's driver-level fast path."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from simbridge.jobs.errors import StaleStateError
from simbridge.jobs.executors.base import JobInfo, JobRef, JobStatus, LaunchSpec
from simbridge.jobs.executors.local import LocalExecutor, read_exit_file
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import AttemptRow, Store


def test_exit_marker_counts_only_once_whole(tmp_path: Path) -> None:
    marker = tmp_path / "run-1.exit"
    assert read_exit_file(marker) is None  # not there yet
    marker.write_bytes(b"")
    assert read_exit_file(marker) is None  # created, not written
    marker.write_bytes(b"exit 1")
    assert read_exit_file(marker) is None  # "exit 1" of "exit 17\n": not whole, never a wrong code
    marker.write_bytes(b"exit 17\n")
    assert read_exit_file(marker) == JobInfo(JobStatus.EXITED, exit_code=17)
    marker.write_bytes(b"signal 9\n")
    assert read_exit_file(marker) == JobInfo(JobStatus.KILLED, signal=9)
    marker.write_bytes(b"17\n")  # the marker of earlier versions
    assert read_exit_file(marker) == JobInfo(JobStatus.EXITED, exit_code=17)
    for junk in (b"junk\n", b"exit x\n", b"stopped 3\n"):
        marker.write_bytes(junk)
        assert read_exit_file(marker) is None


def test_child_end_is_reaped_notified_and_its_code_read(tmp_path: Path) -> None:
    ended = threading.Event()
    executor = LocalExecutor(notify=ended.set)
    argv = ("sh", "-c", "exit 3")
    spec = LaunchSpec(token="sb-test-1", argv=argv, cwd=tmp_path, log_prefix=tmp_path / "r-1")
    launched = executor.submit(spec)
    assert launched.pid is not None
    assert ended.wait(10), "the reaper never reported the child's end"
    ref = JobRef(token=spec.token, log_prefix=spec.log_prefix, pid=launched.pid, pid_start=launched.pid_start)
    info = executor.poll([ref])[spec.token]
    assert info.status is JobStatus.EXITED
    assert info.exit_code == 3
    assert spec.exit_file.read_bytes() == b"exit 3\n"


def test_fast_writes_are_all_or_nothing(tmp_path: Path) -> None:
    with Store(url=f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        store.add_case(key="c", name="c", source="src", root="root", beams_=[("b", "b", str(tmp_path))])
        (beam,) = store.beams()
        store.transition(beam.id, BeamState.PENDING, BeamState.PREPARING, reason="started")
        with pytest.raises(StaleStateError):
            store.transition(beam.id, BeamState.PENDING, BeamState.PREPARING, reason="again")

        def open_try(token: str) -> AttemptRow:
            return store.open_attempt(
                beam.id,
                expected=BeamState.PREPARING,
                target=BeamState.PREPARING,
                token=token,
                executor="local",
                work_dir=str(tmp_path),
                deadline=1e12,
            )

        attempt = open_try("t1")
        with pytest.raises(StaleStateError):  # one live attempt per beam
            open_try("t2")
        store.close_attempt(attempt.id, outcome="ok", exit_code=0)
        # The move and the close commit together: a close that fails rolls the move back.
        with pytest.raises(StaleStateError):
            store.transition(
                beam.id, BeamState.PREPARING, BeamState.UPLOADING, reason="x", close=(attempt.id, "ok", 0)
            )
        assert store.beam(beam.id).state is BeamState.PREPARING
        assert [e.to_state for e in store.events(beam_id=beam.id)] == ["PENDING", "PREPARING"]
        assert [a.beam_id for a in store.open_attempts()] == []
        assert store.ready_ids([BeamState.PREPARING], now=0, limit=5, skip=[beam.id]) == []
        assert store.ready_ids([BeamState.PREPARING], now=0, limit=5) == [(beam.id, BeamState.PREPARING)]
        assert store.beams(ids=[beam.id])[0].state is BeamState.PREPARING
