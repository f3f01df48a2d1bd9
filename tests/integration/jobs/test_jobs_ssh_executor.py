"""The plain-SSH executor through the testbed's real sshd: start, poll, fail with the remote stderr,
a remote kill, adoption by a new executor (runs counted from the job's side), cancel of the whole
remote group, hostile names, and GPUs assigned by the store (never two beams on one)."""

from __future__ import annotations

import dataclasses
import shlex
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support import wait_for
from tests.testbed import Testbed

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import GpuAssignmentError
from simbridge.jobs.executors.base import JobInfo, JobRef, JobStatus, Launched, LaunchSpec
from simbridge.jobs.executors.ssh import SshExecutor
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store
from simbridge.jobs.transport.base import CommandResult, CommandRunner
from simbridge.jobs.transport.ssh_connection import SshConnection

pytestmark = pytest.mark.integration

HOSTILE = "we'ird $(touch PWNED) `x` ;&|\"\\ n\u00e4me"
WAIT_S = 60.0


@pytest.fixture
def settings(testbed: Testbed, tmp_remote_root: Path) -> ClusterSettings:
    entry = testbed.cluster_settings("plain", scheduler="none", remote_root=str(tmp_remote_root), gpus=2)
    return ClusterSettings.model_validate(entry)


@pytest.fixture
def conn(settings: ClusterSettings) -> Iterator[SshConnection]:
    with SshConnection.from_settings(settings, name="plain") as connection:
        yield connection


@pytest.fixture
def executor(settings: ClusterSettings, conn: SshConnection) -> SshExecutor:
    return SshExecutor(name="plain", settings=settings, runner=conn)


class Job:
    """One attempt of the tests: its remote beam folder, local log prefix and spec."""

    def __init__(self, ex: SshExecutor, local: Path, case: str, beam: str, argv: list[str], n: int = 1):
        self.dir = Path(ex.root) / case / beam
        self.dir.mkdir(parents=True, exist_ok=True)  # the upload's work (loopback: same disk)
        self.spec = LaunchSpec(
            token=f"sb-{time.monotonic_ns()}",
            argv=tuple(argv),
            cwd=self.dir,
            log_prefix=local / "logs" / case / beam / f"running-{n}",
        )

    def ref(self, launched: Launched | None = None) -> JobRef:
        return JobRef(
            token=self.spec.token,
            log_prefix=self.spec.log_prefix,
            pid=launched.pid if launched else None,
            pid_start=launched.pid_start if launched else None,
        )


def _how(info: JobInfo) -> tuple[JobStatus, int | None]:
    """Status and code (other fields, such as a log tail, may come with it)."""
    return info.status, info.signal if info.status is JobStatus.KILLED else info.exit_code


def _ended(ex: SshExecutor, refs: list[JobRef]) -> dict[str, JobInfo]:
    """Poll (one remote command for all) until none runs."""
    seen: dict[str, JobInfo] = {}

    def done() -> bool:
        seen.update(ex.poll(refs))
        return all(info.status is not JobStatus.RUNNING for info in seen.values())

    wait_for(done, timeout=WAIT_S, what="the remote attempts to end", interval=0.1)
    return seen


def test_jobs_complete_and_fail_with_the_remote_stderr_tail_hostile_names(
    executor: SshExecutor, tmp_path: Path
) -> None:
    ok = Job(
        executor,
        tmp_path,
        HOSTILE,
        HOSTILE,
        ["sh", "-c", 'printf "%s|%s" "$1" "$PWD" > out.txt', "sh", HOSTILE],
    )
    bad = Job(executor, tmp_path, "case", "bad", ["sh", "-c", "echo 'it broke: no plan' >&2; exit 3"])
    refs = [ok.ref(executor.submit(ok.spec)), bad.ref(executor.submit(bad.spec))]
    got = _ended(executor, refs)
    assert _how(got[ok.spec.token]) == (JobStatus.EXITED, 0)
    assert _how(got[bad.spec.token]) == (JobStatus.EXITED, 3)
    assert (ok.dir / "out.txt").read_text() == f"{HOSTILE}|{ok.dir}"
    assert not list(Path(executor.root).rglob("PWNED")) and not list(tmp_path.rglob("PWNED"))
    # The remote stderr came back into the local .err (what the pipeline's failure message reads).
    assert "it broke: no plan" in refs[1].stderr.read_text()
    files = executor.files(bad.spec.log_prefix)
    assert Path(files.failed).exists() and Path(executor.files(ok.spec.log_prefix).success).exists()
    data, size = executor.read_log(refs[1], offset=3)
    assert data == b"broke: no plan\n" and size == len(b"it broke: no plan\n")


def test_a_remote_kill_reads_as_killed_and_a_dead_run_sh_as_lost(
    executor: SshExecutor, testbed: Testbed, tmp_path: Path
) -> None:
    argv = ["sh", "-c", "echo $$ > pid.tmp; mv pid.tmp pid; exec sleep 60"]
    killed, lost = (Job(executor, tmp_path, "case", name, argv) for name in ("kill", "lost"))
    refs = [job.ref(executor.submit(job.spec)) for job in (killed, lost)]
    for job in (killed, lost):
        wait_for((job.dir / "pid").exists, timeout=WAIT_S, what="the command's pid")
    command_pid = int((lost.dir / "pid").read_text())
    assert refs[1].pid is not None
    # The command killed: run.sh writes how it ended. run.sh itself killed (the leader only):
    # nobody writes a marker; what it left must run no more, and the attempt is LOST.
    testbed.ssh(f"kill -9 {int((killed.dir / 'pid').read_text())} {refs[1].pid}")
    got = _ended(executor, refs)
    assert _how(got[killed.spec.token]) == (JobStatus.KILLED, signal.SIGKILL)
    assert got[lost.spec.token].status is JobStatus.LOST and "never wrote" in got[lost.spec.token].detail
    wait_for(lambda: not _alive(command_pid), timeout=WAIT_S, what="the orphaned command killed")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in {"Z", "X"}
    except OSError:
        return False


def test_a_new_executor_adopts_the_job_and_it_runs_once(
    settings: ClusterSettings, conn: SshConnection, executor: SshExecutor, tmp_path: Path
) -> None:
    argv = ["sh", "-c", "echo run >> runs; while [ ! -e go ]; do sleep 0.05; done"]
    job = Job(executor, tmp_path, "case", "adopt", argv)
    first = executor.submit(job.spec)
    # The orchestrator "died" before it recorded the pid: a new executor only has the token.
    again = SshExecutor(name="plain", settings=settings, runner=conn)
    found = again.find(job.ref())
    assert found is not None and (found.pid, found.pid_start) == (first.pid, first.pid_start)
    assert again.poll([job.ref()])[job.spec.token].status is JobStatus.RUNNING
    # A submit repeated with the same attempt (after a dropped link) reports it, never reruns it.
    repeated = again.submit(job.spec)
    assert (repeated.pid, repeated.pid_start) == (first.pid, first.pid_start)
    (job.dir / "go").touch()
    assert _ended(again, [job.ref(found)])[job.spec.token].exit_code == 0
    assert again.find(job.ref()) == found  # ended: still found (its marker tells how)
    assert (job.dir / "runs").read_text() == "run\n"
    never = Job(executor, tmp_path, "case", "never", ["true"])
    assert again.find(never.ref()) is None


def test_cancel_stops_the_whole_remote_group(executor: SshExecutor, tmp_path: Path) -> None:
    script = "sleep 60 & echo $! > kids; sleep 61 & echo $! >> kids; echo ready > r; wait"
    job = Job(executor, tmp_path, "case", "cancel", ["sh", "-c", script])
    # One that ignores TERM is KILLed after the grace; run.sh still writes how it ended.
    stubborn = Job(executor, tmp_path, "case", "stubborn", ["sh", "-c", "trap '' TERM; echo > r; sleep 60"])
    refs = [j.ref(executor.submit(j.spec)) for j in (job, stubborn)]
    for started in (job, stubborn):
        wait_for((started.dir / "r").exists, timeout=WAIT_S, what="the job's children started")
    kids = [int(p) for p in (job.dir / "kids").read_text().split()]
    assert executor.cancel(refs[0], grace_s=5.0)
    assert executor.cancel(refs[1], grace_s=0.3)
    got = _ended(executor, refs)
    assert _how(got[job.spec.token]) == (JobStatus.KILLED, signal.SIGTERM)
    assert _how(got[stubborn.spec.token]) == (JobStatus.KILLED, signal.SIGKILL)
    wait_for(lambda: not any(_alive(p) for p in kids), timeout=WAIT_S, what="every process of the group gone")
    assert not executor.cancel(refs[1], grace_s=0.3)  # nothing left: nothing signalled
    # A recorded pid whose start time is not the job's is never signalled.
    assert not executor.cancel(
        JobRef(token="sb-x", log_prefix=refs[1].log_prefix, pid=1, pid_start=1), grace_s=0
    )


class _FakeGpuPath(CommandRunner):
    """Runs commands with a folder holding a FAKE `nvidia-smi` first on the remote PATH (no GPU here)."""

    def __init__(self, inner: CommandRunner, folder: Path) -> None:
        self.inner, self.folder, self.host = inner, folder, inner.host

    def run(self, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        prefix = f'PATH={shlex.quote(str(self.folder))}:"$PATH"; export PATH; '
        return self.inner.run(prefix + command, timeout_s=timeout_s, stdin=stdin)


def test_gpu_discovery_through_a_fake_nvidia_smi(
    settings: ClusterSettings, conn: SshConnection, tmp_path: Path
) -> None:
    fake = tmp_path / "fakebin"
    fake.mkdir()
    smi = fake / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$*" = "--query-gpu=index,uuid --format=csv,noheader" ] || exit 9\n'
                   'printf "0, GPU-0a1b\\n1, GPU-2c3d\\n"\n')  # fmt: skip
    smi.chmod(0o755)
    discovering = settings.model_copy(update={"gpus": "discover"})
    ex = SshExecutor(name="plain", settings=discovering, runner=_FakeGpuPath(conn, fake))
    assert ex.host_gpus() == [("0", "GPU-0a1b"), ("1", "GPU-2c3d")]
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2; exit 9\n")
    with pytest.raises(GpuAssignmentError, match="NVIDIA-SMI has failed"):
        ex.host_gpus()
    smi.write_text("#!/bin/sh\necho '0; rm -rf /, GPU-x'\n")
    with pytest.raises(GpuAssignmentError, match="not 'INDEX, UUID'"):
        ex.host_gpus()


def test_gpus_two_gpus_four_beams_never_shared_fifo(
    settings: ClusterSettings, conn: SshConnection, tmp_path: Path
) -> None:
    with Store(url=f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        ex = SshExecutor(name="plain", settings=settings, runner=conn, store=store)
        assert ex.register_gpus() == ("0", "1")
        store.add_case(
            key="c", name="c", source="s", root="r", beams_=[(f"b{i}", f"b{i}", "/x") for i in range(4)]
        )
        beams = [b.id for b in store.beams()]
        for beam in beams:
            store.path(beam, [(BeamState.PENDING, BeamState.PREPARING, "s"),
                              (BeamState.PREPARING, BeamState.UPLOADING, "s"),
                              (BeamState.UPLOADING, BeamState.QUEUED, "s")])  # fmt: skip
        usage = Path(ex.root) / "usage"
        script = 'echo "$CUDA_VISIBLE_DEVICES start" >> "$1"; while [ ! -e go ]; do sleep 0.05; done; ' \
                 'echo "$CUDA_VISIBLE_DEVICES end" >> "$1"'  # fmt: skip
        running: dict[int, tuple[Job, JobRef, int]] = {}

        def launch(beam: int) -> bool:
            gpus = ex.acquire_gpus(beam, 1)
            if gpus is None:
                return False
            job = Job(ex, tmp_path, "c", f"b{beam}", ["sh", "-c", script, "sh", str(usage)])
            attempt = store.open_attempt(beam, expected=BeamState.QUEUED, target=BeamState.RUNNING,
                                         token=job.spec.token, executor=ex.name, work_dir=str(job.dir),
                                         deadline=time.time() + 600, gpu_id=",".join(gpus))  # fmt: skip
            env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}
            spec = dataclasses.replace(job.spec, env=env)
            running[beam] = (job, job.ref(ex.submit(spec)), attempt.id)
            return True

        def finish(*ending: int) -> None:
            jobs = [running.pop(beam) for beam in ending]
            for job, _, _ in jobs:
                (job.dir / "go").touch()
            got = _ended(ex, [ref for _, ref, _ in jobs])
            for _, ref, attempt in jobs:
                assert got[ref.token].exit_code == 0
                assert store.close_attempt(attempt, outcome="ok", exit_code=0)  # gives the GPU back

        assert [launch(b) for b in beams] == [True, True, False, False]
        finish(beams[1])
        assert not launch(beams[3])  # the last one asked before its elder: FIFO, it waits
        assert launch(beams[2])
        finish(beams[0])
        assert launch(beams[3])
        finish(*running)
        # From the jobs' side: on each GPU, every start is followed by its end before the next.
        per_gpu: dict[str, list[str]] = {}
        for line in usage.read_text().splitlines():
            gpu, what = line.split()
            per_gpu.setdefault(gpu, []).append(what)
        assert set(per_gpu) == {"0", "1"}
        for events in per_gpu.values():
            assert events == ["start", "end"] * (len(events) // 2)
