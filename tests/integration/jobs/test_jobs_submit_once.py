"""Exactly one submission per attempt, whatever dies on the way (slurm_submit.py, ssh_scripts.py).

The race CI met once: an orchestrator killed while its sbatch was in flight over SSH; the restarted
one looked for the job, found nothing yet, and submitted the beam again. Here the testbed holds
every sbatch on the cluster while the submitting process is killed with SIGKILL: the restarted
executor is told "ask again" while the sbatch is held, then adopts the job the held sbatch made,
and each job runs once, counted from its own side. A submit that arrives after a restarted
orchestrator gave its attempt up is refused on the cluster, for Slurm and for the plain host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.jobs.jobs_fixtures import REPO
from tests.testbed import Testbed

from simbridge.config import ClusterSettings
from simbridge.jobs.clusters import Cluster, build_cluster
from simbridge.jobs.errors import LaunchError, SchedulerError
from simbridge.jobs.executors import JobRef, JobStatus, LaunchSpec
from simbridge.jobs.executors.runscript import attempt_files
from simbridge.jobs.executors.slurm_intent import Intent, write_intent

pytestmark = pytest.mark.integration

WAIT_S = 60.0

# The orchestrator that dies: builds the cluster from the JSON in argv[1] and submits its specs.
SUBMITTER = """
import json, sys
from pathlib import Path
from simbridge.config import ClusterSettings
from simbridge.jobs.clusters import build_cluster
from simbridge.jobs.executors import LaunchSpec
data = json.loads(sys.argv[1])
cluster = build_cluster("tb", ClusterSettings.model_validate(data["settings"]))
specs = [LaunchSpec(token=t, argv=tuple(a), cwd=Path(c), log_prefix=Path(p)) for t, a, c, p in data["specs"]]
print(cluster.executor.submit_many(specs) if len(specs) > 1 else cluster.executor.submit(specs[0]))
"""


def _settings(testbed: Testbed, root: Path, scheduler: str = "slurm") -> ClusterSettings:
    # A short command limit keeps the claim's wait for a busy lock at 1 s.
    entry = testbed.cluster_settings("tb", scheduler=scheduler, remote_root=str(root), command_timeout_s=6.0)  # type: ignore[arg-type]
    return ClusterSettings.model_validate(entry)


@contextlib.contextmanager
def _cluster(settings: ClusterSettings) -> Iterator[Cluster]:
    cluster = build_cluster("tb", settings)
    try:
        yield cluster
    finally:
        cluster.close()


def _spec(local: Path, root: Path, beam: str, runs: Path) -> LaunchSpec:
    cwd = root / "case" / beam
    cwd.mkdir(parents=True, exist_ok=True)
    return LaunchSpec(
        token=f"sb-{uuid.uuid4().hex}",
        argv=("sh", "-c", f'echo "$1" >> {runs}', "sh", beam),
        cwd=cwd,
        log_prefix=local / "logs" / "case" / beam / "running-1",
    )


def _ref(spec: LaunchSpec, job_id: str | None = None) -> JobRef:
    return JobRef(token=spec.token, log_prefix=spec.log_prefix, job_id=job_id)


def _busy_then_given_up(cluster: Cluster, spec: LaunchSpec, *, busy: str) -> None:
    """While another look holds the attempt's lock, find says "ask again" (``busy``); once it is
    free, "never submitted", which gives the attempt up on the host."""
    lock = Path(str(attempt_files(cluster.settings.remote_root, spec.log_prefix).prefix) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        with pytest.raises(SchedulerError, match=busy):
            cluster.executor.find(_ref(spec))
    assert cluster.executor.find(_ref(spec)) is None


def _runs(runs: Path) -> list[str]:
    return sorted(runs.read_text().split()) if runs.exists() else []


@pytest.mark.parametrize("beams", [1, 2], ids=["single", "array"])
def test_killed_inside_sbatch_then_restarted_submits_once(
    testbed: Testbed, tmp_remote_root: Path, tmp_path: Path, beams: int
) -> None:
    settings = _settings(testbed, tmp_remote_root)
    runs = tmp_remote_root / "runs"
    specs = [_spec(tmp_path, tmp_remote_root, f"b{i}", runs) for i in range(beams)]
    data = {
        "settings": settings.model_dump(mode="json"),
        "specs": [[s.token, list(s.argv), str(s.cwd), str(s.log_prefix)] for s in specs],
    }
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    before = testbed.sbatch_calls()
    with _cluster(settings) as cluster, testbed.sbatch_held() as held:
        child = subprocess.Popen(
            [sys.executable, "-c", SUBMITTER, json.dumps(data)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            held(WAIT_S)  # its sbatch waits on the cluster: the orchestrator dies now
        finally:
            child.send_signal(signal.SIGKILL)
            out = child.communicate(timeout=WAIT_S)[0]
        assert child.returncode == -signal.SIGKILL, out
        for spec in specs:
            # The restarted orchestrator asks: not "never submitted" while the sbatch is held.
            with pytest.raises(SchedulerError, match="still running on the cluster"):
                cluster.executor.find(_ref(spec))
    # The hold is over: the sbatch that was in flight made the job(s), and they are adopted.
    with _cluster(settings) as cluster:
        deadline = time.monotonic() + WAIT_S
        found: list[str] = []
        for spec in specs:
            while True:
                try:
                    launched = cluster.executor.find(_ref(spec))
                    break
                except SchedulerError:  # the held sbatch is finishing: ask again
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
            assert launched is not None, f"{spec.cwd.name}: the in-flight job was taken for never submitted"
            found.append(launched.job_id)
        if beams > 1:
            assert [j.partition("_")[2] for j in found] == ["0", "1"]
        refs = [_ref(s, j) for s, j in zip(specs, found, strict=True)]
        while any(i.status is JobStatus.RUNNING for i in cluster.executor.poll(refs).values()):
            assert time.monotonic() < deadline
            time.sleep(0.2)
    assert testbed.sbatch_calls() == before + 1
    assert _runs(runs) == [f"b{i}" for i in range(beams)]


def test_slurm_submit_arriving_after_a_give_up_is_refused(
    testbed: Testbed, tmp_remote_root: Path, tmp_path: Path
) -> None:
    settings = _settings(testbed, tmp_remote_root)
    runs = tmp_remote_root / "runs"
    spec = _spec(tmp_path, tmp_remote_root, "late", runs)
    files = attempt_files(settings.remote_root, spec.log_prefix)
    # Killed after writing the intent, before its sbatch left: the restart finds nothing...
    write_intent(
        spec.log_prefix,
        Intent(name="moqui_late", comment=spec.token, cwd=str(spec.cwd), prefix=str(files.prefix)),
    )
    before = testbed.sbatch_calls()
    with _cluster(settings) as cluster:
        # ...while a look is under way (its lock held) it is "ask again", then "never submitted".
        _busy_then_given_up(cluster, spec, busy="still running on the cluster")
        # The old sbatch arrives late: refused on the cluster, never reaching Slurm.
        with pytest.raises(LaunchError, match="gave this attempt up"):
            cluster.executor.submit(spec)
    assert testbed.sbatch_calls() == before
    assert _runs(runs) == []


def test_plain_host_start_arriving_after_a_give_up_is_refused(
    testbed: Testbed, tmp_remote_root: Path, tmp_path: Path
) -> None:
    settings = _settings(testbed, tmp_remote_root, scheduler="none")
    runs = tmp_remote_root / "runs"
    spec = _spec(tmp_path, tmp_remote_root, "late", runs)
    files = attempt_files(settings.remote_root, spec.log_prefix)
    with _cluster(settings) as cluster:
        _busy_then_given_up(cluster, spec, busy="being started")
        with pytest.raises(LaunchError, match="gave this attempt up"):
            cluster.executor.submit(spec)
        assert not Path(str(files.pid_file)).exists()
        # A fresh attempt of the same beam starts as usual and runs once.
        again = LaunchSpec(
            token=f"sb-{uuid.uuid4().hex}",
            argv=spec.argv,
            cwd=spec.cwd,
            log_prefix=spec.log_prefix.with_name("running-2"),
        )
        launched = cluster.executor.submit(again)
        deadline = time.monotonic() + WAIT_S
        ref = JobRef(
            token=again.token, log_prefix=again.log_prefix, pid=launched.pid, pid_start=launched.pid_start
        )
        while cluster.executor.poll([ref])[again.token].status is JobStatus.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert _runs(runs) == ["late"]
