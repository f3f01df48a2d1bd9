"""The Slurm executor against the loopback testbed's real Slurm (commands run on this host).

Submit/poll/complete, a failing job with its stderr tail, cancel (scancel), adoption after the
executor is thrown away (no second sbatch), slurmctld restarted mid-run, one squeue per poll for a
50-element job array, hostile names. Every wait has a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from simbridge.config import ClusterSettings
from simbridge.jobs.executors import JobInfo, JobRef, JobStatus, LaunchSpec
from simbridge.jobs.executors.slurm import SlurmExecutor
from simbridge.jobs.executors.slurm_intent import intent_file, read_intent, write_intent
from simbridge.jobs.transport import CommandResult, CommandRunner, LocalRunner

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0


class CountingRunner(CommandRunner):
    """A real runner, wrapped: every command it runs is kept (to count squeue calls)."""

    def __init__(self, inner: CommandRunner) -> None:
        self.inner = inner
        self.host = inner.host
        self.commands: list[str] = []

    def run(self, command: str, *, timeout_s: float, stdin: bytes | None = None) -> CommandResult:
        self.commands.append(command)
        return self.inner.run(command, timeout_s=timeout_s, stdin=stdin)

    def count(self, word: str) -> int:
        # sbatch runs inside the submit claim's `sh -c` (slurm_submit.py): a word among others.
        return sum(1 for c in self.commands if c.startswith(word + " ") or f" {word} " in c)


def make(
    testbed: Any, root: Path, *, top: dict[str, Any] | None = None, **slurm: Any
) -> tuple[SlurmExecutor, CountingRunner]:
    entry = testbed.cluster_settings("tb", remote_root=str(root), **(top or {}))
    entry["slurm"] = {**entry.get("slurm", {}), **slurm}
    settings = ClusterSettings.model_validate(entry)
    runner = CountingRunner(LocalRunner(env=testbed.env()))
    return SlurmExecutor(name="tb", settings=settings, runner=runner, missing_grace_s=20.0), runner


def spec(tmp: Path, root: Path, beam: str, argv: Sequence[str], *, case: str = "case1") -> LaunchSpec:
    cwd = root / case / beam
    cwd.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(
        token=f"sb-{uuid.uuid4().hex}",
        argv=tuple(argv),
        cwd=cwd,
        log_prefix=tmp / "logs" / case / beam / "running-1",
    )


def ref_of(s: LaunchSpec, job_id: str | None) -> JobRef:
    return JobRef(token=s.token, log_prefix=s.log_prefix, job_id=job_id)


def wait_all(
    ex: SlurmExecutor, refs: Sequence[JobRef], *, seen: list[JobInfo] | None = None
) -> dict[str, JobInfo]:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        infos = ex.poll(refs)
        if seen is not None:
            seen.extend(infos.values())
        if all(i.status is not JobStatus.RUNNING for i in infos.values()):
            return infos
        assert time.monotonic() < deadline, f"jobs still running after {DEADLINE_S}s: {infos}"
        time.sleep(0.1)


def test_submit_poll_complete_fail_and_stderr_tail(
    testbed: Any, tmp_remote_root: Path, tmp_path: Path
) -> None:
    ex, _ = make(testbed, tmp_remote_root)
    ok = spec(tmp_path, tmp_remote_root, "b-ok", ["sh", "-c", "echo done > raw"])
    bad = spec(tmp_path, tmp_remote_root, "b-bad", ["sh", "-c", "echo boom-on-stderr >&2; exit 3"])
    before = testbed.sbatch_calls()
    refs = [ref_of(s, ex.submit(s).job_id) for s in (ok, bad)]
    assert testbed.sbatch_calls() == before + 2
    seen: list[JobInfo] = []
    infos = wait_all(ex, refs, seen=seen)
    assert infos[ok.token].status is JobStatus.EXITED and infos[ok.token].exit_code == 0
    assert (tmp_remote_root / "case1" / "b-ok" / "raw").read_text() == "done\n"
    failed = infos[bad.token]
    assert failed.status is JobStatus.EXITED and failed.exit_code == 3
    assert "boom-on-stderr" in failed.log_tail
    assert "boom-on-stderr" in bad.stderr.read_text()  # mirrored where the pipeline reads its tail
    assert bad.exit_file.read_text() == "exit 3\n"  # the marker, mirrored locally
    assert any(i.scheduler_state for i in seen)


def test_cancel_runs_scancel_per_array_element(testbed: Any, tmp_remote_root: Path, tmp_path: Path) -> None:
    ex, runner = make(testbed, tmp_remote_root)
    pair = [spec(tmp_path, tmp_remote_root, f"b-long{i}", ["sleep", "300"]) for i in range(2)]
    refs = [ref_of(s, x.job_id) for s, x in zip(pair, ex.submit_many(pair), strict=True)]  # type: ignore[union-attr]
    assert refs[0].job_id is not None and refs[0].job_id.endswith("_0")
    deadline = time.monotonic() + DEADLINE_S
    while any(i.scheduler_state != "RUNNING" for i in ex.poll(refs).values()):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert ex.cancel(refs[1], grace_s=5.0)
    assert runner.count("scancel") == 1
    info = wait_all(ex, [refs[1]])[pair[1].token]
    assert info.status is JobStatus.KILLED, info
    assert info.reason == "CANCELLED" and info.scheduler_state == "CANCELLED"
    ex.watcher.invalidate()  # the next poll is a fresh look, not the cached one
    assert ex.poll([refs[0]])[pair[0].token].status is JobStatus.RUNNING  # its sibling runs on
    assert ex.cancel(refs[0], grace_s=5.0)
    assert wait_all(ex, [refs[0]])[pair[0].token].reason == "CANCELLED"


def test_find_adopts_after_crash_never_submits_twice(
    testbed: Any, tmp_remote_root: Path, tmp_path: Path
) -> None:
    ex, _ = make(testbed, tmp_remote_root)
    s = spec(tmp_path, tmp_remote_root, "b-adopt", ["sh", "-c", "sleep 1; echo ok > raw"])
    job_id = ex.submit(s).job_id
    calls = testbed.sbatch_calls()
    # The crash came between sbatch and writing its id anywhere: only the intent survives.
    intent = read_intent(s.log_prefix, tmp_remote_root)
    assert intent is not None and intent.job_id == job_id
    write_intent(s.log_prefix, intent.__class__(**{**intent.__dict__, "job_id": None}))
    del ex
    fresh, runner = make(testbed, tmp_remote_root)
    found = fresh.find(ref_of(s, None))
    assert found is not None and found.job_id == job_id
    # The submit claim on the cluster names the job: no squeue needed, no second sbatch.
    assert runner.count("squeue") == 0 and runner.count("sbatch") == 0
    # An sbatch that failed yet queued its job (or one submitted without the claim) leaves no
    # claimed job id: then the queue, by unique name and token, finds it.
    job_file = tmp_remote_root / "case1" / "b-adopt" / ".simbridge" / "running-1.job"
    assert job_file.read_text().strip() == job_id
    job_file.unlink()
    again, runner = make(testbed, tmp_remote_root)
    found = again.find(ref_of(s, None))
    assert found is not None and found.job_id == job_id
    assert runner.count("squeue") == 1 and runner.count("sbatch") == 0
    info = wait_all(fresh, [ref_of(s, found.job_id)])[s.token]
    assert info.status is JobStatus.EXITED and info.exit_code == 0
    assert testbed.sbatch_calls() == calls
    # An attempt whose intent never got written never reached Slurm: nothing to adopt.
    never = spec(tmp_path, tmp_remote_root, "b-never", ["true"])
    assert not intent_file(never.log_prefix).exists()
    assert fresh.find(ref_of(never, None)) is None


def test_slurmctld_restart_mid_run_polling_recovers(
    testbed: Any, tmp_remote_root: Path, tmp_path: Path
) -> None:
    # Slurm's clients retry an absent controller for about 9 s; a 3 s command limit keeps the
    # test short and is itself a case the watcher must survive (a command that hangs).
    ex, _ = make(testbed, tmp_remote_root, top={"command_timeout_s": 3.0})
    s = spec(tmp_path, tmp_remote_root, "b-restart", ["sleep", "5"])
    ref = ref_of(s, ex.submit(s).job_id)
    deadline = time.monotonic() + DEADLINE_S
    while ex.poll([ref])[s.token].scheduler_state != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    testbed.stop_slurmctld()
    try:
        ex.watcher.invalidate()  # the next poll really asks the (stopped) controller
        info = ex.poll([ref])[s.token]
        assert info.status is JobStatus.RUNNING, info  # unknown is never "lost"
        assert info.scheduler_state == "UNKNOWN"
    finally:
        testbed.start_slurmctld()
    final = wait_all(ex, [ref])[s.token]
    assert final.status is JobStatus.EXITED and final.exit_code == 0


def test_array_of_50_one_squeue_per_poll(testbed: Any, tmp_remote_root: Path, tmp_path: Path) -> None:
    ex, runner = make(testbed, tmp_remote_root, array_parallel=16)
    specs = [spec(tmp_path, tmp_remote_root, f"b{i:02d}", ["sh", "-c", f"echo {i} > raw"]) for i in range(50)]
    before = testbed.sbatch_calls()
    launched = ex.submit_many(specs)
    assert testbed.sbatch_calls() == before + 1
    array_id = launched[0].job_id.partition("_")[0]  # type: ignore[union-attr]
    assert [getattr(x, "job_id", x) for x in launched] == [f"{array_id}_{i}" for i in range(50)]
    refs = [ref_of(s, x.job_id) for s, x in zip(specs, launched, strict=True)]  # type: ignore[union-attr]
    deadline = time.monotonic() + DEADLINE_S
    while True:
        squeues = runner.count("squeue")
        infos = ex.poll(refs)
        assert runner.count("squeue") - squeues <= 1  # one look for all 50, never one per job
        if all(i.status is not JobStatus.RUNNING for i in infos.values()):
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    bad = {t: i for t, i in infos.items() if i.status is not JobStatus.EXITED or i.exit_code != 0}
    assert not bad, bad
    for i in range(50):
        assert (tmp_remote_root / "case1" / f"b{i:02d}" / "raw").read_text() == f"{i}\n"


def test_hostile_names_are_quoted(testbed: Any, tmp_remote_root: Path, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    hostile = f"$(touch {canary}); `touch {canary}` ' \" |&;"
    ex, _ = make(
        testbed, tmp_remote_root, job_name="moqui_{beam_id} " + hostile.replace("{", "").replace("}", "")
    )
    s = spec(tmp_path, tmp_remote_root, "b-x_1.y", ["printf", "%s\\n", hostile])
    s = LaunchSpec(token=s.token, argv=s.argv, cwd=s.cwd, log_prefix=s.log_prefix, env={"HOSTILE": hostile})
    ref = ref_of(s, ex.submit(s).job_id)
    info = wait_all(ex, [ref])[s.token]
    assert info.status is JobStatus.EXITED and info.exit_code == 0
    assert not canary.exists()
    out = PurePosixPath(str(tmp_remote_root)) / "case1" / "b-x_1.y" / ".simbridge" / "running-1.out"
    assert hostile in Path(str(out)).read_text()
    # Adopted again by its hostile name: squeue --name got it quoted, whole.
    intent = read_intent(s.log_prefix, tmp_remote_root)
    assert intent is not None
    write_intent(s.log_prefix, intent.__class__(**{**intent.__dict__, "job_id": None}))
    fresh, _ = make(testbed, tmp_remote_root, job_name=ex.settings.slurm.job_name)
    found = fresh.find(ref_of(s, None))
    assert found is not None and found.job_id == ref.job_id
    assert not canary.exists()


def test_through_sshd_a_job_and_an_array(testbed: Any, tmp_remote_root: Path, tmp_path: Path) -> None:
    from simbridge.jobs.transport.ssh_connection import SshConnection

    entry = testbed.cluster_settings("tb", remote_root=str(tmp_remote_root))
    settings = ClusterSettings.model_validate(entry)
    with SshConnection.from_settings(settings, name="tb") as conn:
        runner = CountingRunner(conn)
        ex = SlurmExecutor(name="tb", settings=settings, runner=runner)
        one = spec(tmp_path, tmp_remote_root, "s-one", ["sh", "-c", "echo one > raw; exit 4"])
        many = [spec(tmp_path, tmp_remote_root, f"s{i}", ["sh", "-c", "hostname > raw"]) for i in range(3)]
        refs = [ref_of(one, ex.submit(one).job_id)]
        refs += [ref_of(s, x.job_id) for s, x in zip(many, ex.submit_many(many), strict=True)]  # type: ignore[union-attr]
        infos = wait_all(ex, refs)
    assert infos[one.token].status is JobStatus.EXITED and infos[one.token].exit_code == 4
    assert all(infos[s.token].exit_code == 0 for s in many)
    assert runner.count("sbatch") == 2


def test_node_fail_is_a_named_transient_failure(testbed: Any, tmp_remote_root: Path, tmp_path: Path) -> None:
    # Slurm requeues a batch job on a node failure by itself unless told not to; this one ends NODE_FAIL.
    ex, runner = make(testbed, tmp_remote_root, extra_args=["--no-requeue"])
    s = spec(tmp_path, tmp_remote_root, "b-node", ["sleep", "300"])
    ref = ref_of(s, ex.submit(s).job_id)
    deadline = time.monotonic() + DEADLINE_S
    while ex.poll([ref])[s.token].scheduler_state != "RUNNING":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    node = testbed.node
    runner.inner.run(f"scontrol update nodename={node} state=down reason=simbridge-test", timeout_s=30)
    try:
        info = wait_all(ex, [ref])[s.token]
    finally:
        runner.inner.run(f"scontrol update nodename={node} state=resume", timeout_s=30)
        while "idle" not in runner.inner.run("sinfo -h -o %t", timeout_s=30).stdout.decode():
            assert time.monotonic() < deadline, "the node did not come back"
            time.sleep(0.1)
    assert info.reason == "NODE_FAIL" and info.scheduler_state == "NODE_FAIL", info
    assert info.transient is True  # slurm.requeue: retried as a new attempt, by default
    assert "NODE_FAIL" in info.describe()
