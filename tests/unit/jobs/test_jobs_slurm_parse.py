"""Parsers of Slurm's output and the state mapping: real shapes (as printed by Slurm 22.05 here),
hostile and garbage input (typed errors, never a guessed id or state), and properties."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import RemotePathError, SchedulerError
from simbridge.jobs.executors import JobStatus, LaunchSpec
from simbridge.jobs.executors.slurm_array import chunks
from simbridge.jobs.executors.slurm_intent import Intent, read_intent, write_intent
from simbridge.jobs.executors.slurm_parse import (
    SlurmJob,
    has_accounting,
    max_array_size,
    parse_config,
    parse_marker,
    parse_sacct,
    parse_sbatch,
    parse_scontrol_jobs,
    parse_squeue,
    parse_squeue_find,
)
from simbridge.jobs.executors.slurm_script import job_env, remote_files
from simbridge.jobs.executors.slurm_watch import marker_info, scheduler_info

REQUEUE = frozenset({"NODE_FAIL", "PREEMPTED"})


def test_sbatch_parsable() -> None:
    assert parse_sbatch("123\n") == ("123", None)
    assert parse_sbatch("77;cluster-a\n") == ("77", "cluster-a")
    for bad in ("", "Submitted batch job 5", "12;x y", "-1", "1;2;3", "12\n13", "sbatch: error: x"):
        with pytest.raises(SchedulerError):
            parse_sbatch(bad)


def test_squeue_lines_with_arrays_and_reasons() -> None:
    text = (
        "1|FAILED|NonZeroExitCode\n2_0|COMPLETED|None\n"
        "2_4|PENDING|JobArrayTaskLimit\n3_[5-9%2]|PENDING|Priority\n"
    )
    jobs = parse_squeue(text)
    assert jobs["1"] == SlurmJob("1", "FAILED", "NonZeroExitCode")
    assert jobs["2_0"].reason == "" and not jobs["2_0"].active
    assert jobs["2_4"].active and jobs["2_4"].reason == "JobArrayTaskLimit"
    assert "3_[5-9%2]" in jobs
    # A reason with spaces and a '|' stays whole (it is the last field).
    assert parse_squeue("9|PENDING|ReqNodeNotAvail, a|b\n")["9"].reason == "ReqNodeNotAvail, a|b"


@pytest.mark.parametrize(
    "line",
    ["1|RUNNING", "x|RUNNING|None", "1|running|None", "1;rm -rf|RUNNING|None", "12_a|RUNNING|None", "|||"],
)
def test_squeue_garbage_is_a_typed_error(line: str) -> None:
    with pytest.raises(SchedulerError):
        parse_squeue(line + "\n")


def test_squeue_find_keeps_the_comment() -> None:
    (job,) = parse_squeue_find("42_3|PENDING|sb-array-abc\n")
    assert job.job_id == "42_3" and job.comment == "sb-array-abc"


def test_sacct_last_record_wins_and_exit_codes() -> None:
    text = (
        "5|NODE_FAIL|0:0|None\n5|COMPLETED|0:0|None\n"
        "6|CANCELLED by 0|0:15|None\n7_2|FAILED|3:0|NonZeroExitCode\n"
    )
    jobs = parse_sacct(text)
    assert jobs["5"].state == "COMPLETED"
    assert jobs["6"].state == "CANCELLED" and jobs["6"].signal == 15
    assert jobs["7_2"].exit_code == 3 and jobs["7_2"].signal is None
    for bad in ("5|COMPLETED|x:0|None", "5|COMPLETED|999:0|None", "5|COMPLETED"):
        with pytest.raises(SchedulerError):
            parse_sacct(bad)


def test_scontrol_oneliner_single_and_array_element() -> None:
    text = (
        "JobId=1 JobName=moqui x;$(id) UserId=root(0) JobState=FAILED Reason=NonZeroExitCode "
        "ExitCode=3:0 Comment=tok123 StdErr=/x\n"
        "JobId=9 ArrayJobId=8 ArrayTaskId=1 JobName=a JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15\n"
    )
    jobs = parse_scontrol_jobs(text)
    assert jobs["1"].exit_code == 3 and jobs["1"].comment == "tok123" and jobs["1"].state == "FAILED"
    assert jobs["8_1"].state == "TIMEOUT" and jobs["8_1"].signal == 15
    assert parse_scontrol_jobs("No jobs in the system\n") == {}
    with pytest.raises(SchedulerError):
        parse_scontrol_jobs("JobName=x\n")


def test_config_array_size_and_accounting() -> None:
    config = parse_config(
        "MaxArraySize            = 1001\nAccountingStorageType   = accounting_storage/none\n"
    )
    assert max_array_size(config) == 1001 and not has_accounting(config)
    assert has_accounting({"AccountingStorageType": "accounting_storage/slurmdbd"})
    with pytest.raises(SchedulerError):
        max_array_size({"MaxArraySize": "lots"})


def test_markers() -> None:
    assert parse_marker(b"exit 3\n") == ("exit", 3)
    assert parse_marker(b"signal 9\n") == ("signal", 9)
    assert parse_marker(b"0\n") == ("exit", 0)
    for bad in (b"exit 3", b"exit 300\n", b"signal 0\n", b"nope 1\n", b"exit -1\n", b"exit 1\x00\n", b""):
        assert parse_marker(bad) is None
    info = marker_info(b"signal 15\n")
    assert info is not None and info.status is JobStatus.KILLED and info.signal == 15


@pytest.mark.parametrize(
    ("state", "status", "sig", "transient"),
    [
        ("TIMEOUT", JobStatus.KILLED, signal.SIGTERM, False),
        ("OUT_OF_MEMORY", JobStatus.KILLED, signal.SIGKILL, False),
        ("CANCELLED", JobStatus.KILLED, signal.SIGTERM, False),
        ("NODE_FAIL", JobStatus.LOST, None, True),
        ("PREEMPTED", JobStatus.LOST, None, True),
        ("BOOT_FAIL", JobStatus.LOST, None, False),
    ],
)
def test_named_failures(state: str, status: JobStatus, sig: int | None, transient: bool) -> None:
    info = scheduler_info(SlurmJob("4", state), REQUEUE)
    assert info.status is status and info.reason == state and info.transient is transient
    assert info.signal == sig
    assert state in info.describe()


def test_failed_and_completed_without_marker_use_slurms_exit_code() -> None:
    failed = scheduler_info(SlurmJob("4", "FAILED", exit_code=2), REQUEUE)
    assert failed.status is JobStatus.EXITED and failed.exit_code == 2
    done = scheduler_info(SlurmJob("4", "COMPLETED", exit_code=0), REQUEUE)
    assert done.status is JobStatus.EXITED and done.exit_code == 0
    assert scheduler_info(SlurmJob("4", "COMPLETED"), REQUEUE).status is JobStatus.LOST


def test_chunks_split_at_max_array_size() -> None:
    assert [len(c) for c in chunks(2500, 1001)] == [1001, 1001, 498]
    assert chunks(0, 5) == []


def test_remote_files_confined_and_env_filtered(tmp_path: Path) -> None:
    root = PurePosixPath("/srv/sb")
    good = LaunchSpec(
        token="t", argv=("x",), cwd=Path("/srv/sb/c/b"), log_prefix=tmp_path / "c" / "b" / "running-1"
    )
    cwd, files = remote_files(root, good)
    assert cwd == PurePosixPath("/srv/sb/c/b") and str(files.exit_file).startswith("/srv/sb/c/b/")
    bad = LaunchSpec(token="t", argv=("x",), cwd=Path("/srv/sb/../etc"), log_prefix=good.log_prefix)
    with pytest.raises(RemotePathError):
        remote_files(root, bad)
    settings = ClusterSettings(host="h", remote_root=root, env={"A": "1"})
    assert job_env(settings, {"CUDA_VISIBLE_DEVICES": "0", "SLURM_JOB_ID": "1", "B": "2"}) == {
        "A": "1",
        "B": "2",
    }


def test_intent_file_round_trip_and_hostile_contents(tmp_path: Path) -> None:
    root = PurePosixPath("/srv/sb")
    prefix = tmp_path / "running-1"
    intent = Intent(
        name="moqui_b", comment="tok", cwd="/srv/sb/c/b", prefix="/srv/sb/c/b/.simbridge/running-1"
    )
    write_intent(prefix, intent)
    assert read_intent(prefix, root) == intent
    assert read_intent(tmp_path / "none", root) is None
    (tmp_path / "running-1.slurm").write_text(
        '{"name": "x", "comment": "t", "cwd": "/etc", "prefix": "/etc/x"}'
    )
    with pytest.raises(SchedulerError):
        read_intent(prefix, root)
    (tmp_path / "running-1.slurm").write_text("not json")
    with pytest.raises(SchedulerError):
        read_intent(prefix, root)


@given(st.text(max_size=300))
def test_parsers_never_raise_anything_but_scheduler_error(text: str) -> None:
    for parse in (parse_sbatch, parse_squeue, parse_squeue_find, parse_sacct, parse_scontrol_jobs):
        with contextlib.suppress(SchedulerError):
            parse(text)  # type: ignore[operator]


@given(st.binary(max_size=80))
def test_marker_is_a_code_or_none(data: bytes) -> None:
    got = parse_marker(data)
    assert (
        got is None
        or (got[0] == "exit" and 0 <= got[1] <= 255)
        or (got[0] == "signal" and 1 <= got[1] <= 127)
    )


@given(st.integers(0, 10**12), st.integers(0, 10**6))
def test_squeue_round_trip(job: int, index: int) -> None:
    jobs = parse_squeue(f"{job}_{index}|RUNNING|None\n{job}|PENDING|Resources\n")
    assert jobs[f"{job}_{index}"].state == "RUNNING" and jobs[str(job)].reason == "Resources"
