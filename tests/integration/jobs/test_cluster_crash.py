"""kill -9 of `serve` while its beams run on the loopback Slurm cluster, at different moments: after a
restart the jobs are adopted (found again by name), none is submitted twice (the testbed counts
sbatch calls) and none runs twice (each job appends its beam to a file from its own side)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from tests.integration.jobs.cluster_fixtures import CLUSTER, ClusterEnv, sbatch_job_ids, tiny_steps
from tests.integration.jobs.jobs_fixtures import REPO, wait_for
from tests.testbed import Testbed

from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.errors import StoreError
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BEAMS = ["b1", "b2", "b3", "b4"]
SEED = int(os.environ.get("SIMBRIDGE_KILL_SEED", "0"))


def _serve(env: ClusterEnv, log: object) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, "SIMBRIDGE_CONFIG": str(env.config_path)}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO), child_env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "simbridge.jobs", "serve"],
        cwd=env.root,
        env=child_env,
        stdout=log,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
    )


def _moments(env: ClusterEnv) -> list[tuple[str, Callable[[], bool]]]:
    """Kill moments, each a named condition on the store or the job side, in pipeline order."""

    def beams_in(*states: BeamState) -> Callable[[], bool]:
        def check() -> bool:
            if not (env.work / "simbridge.db").exists():
                return False
            try:
                with Store(url=env.db_url, migrate=False) as store:
                    return any(b.state in states for b in store.beams())
            except StoreError:
                return False  # not created or migrated yet by the serve starting up

        return check

    def submitted() -> bool:
        with Store(url=env.db_url, migrate=False) as store:
            return any(a.job_id for a in store.open_attempts())

    return [
        ("the case taken", beams_in(*BeamState)),
        ("a beam queued or submitted", beams_in(BeamState.QUEUED, BeamState.RUNNING)),
        ("a job id recorded", submitted),
        ("a job running on the cluster", lambda: bool(env.lines("launches"))),
        ("a beam collected", beams_in(BeamState.COLLECTING, BeamState.COMPLETED)),
    ]


@pytest.mark.parametrize("arrays", [True, False])
def test_kill_9_while_jobs_run_then_adopt(
    tmp_path: Path, testbed: Testbed, monkeypatch: pytest.MonkeyPatch, arrays: bool
) -> None:
    """Five serves in a row, each killed at its own moment (case taken, queued, submitted, running,
    collected: two tests, ten kills), then one restart finishes the case."""
    monkeypatch.setenv("SIMBRIDGE_CONFIG", "")
    rng = random.Random(SEED * 1000 + int(arrays))
    env = ClusterEnv(root=tmp_path, db_url=f"sqlite:///{tmp_path / 'work' / 'simbridge.db'}")
    remote = testbed.new_remote_root()
    env.clusters = {
        CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(remote), slurm={"arrays": arrays})
    }
    settings = env.configure(steps=tiny_steps(env, sleep_s=1.5), executor=CLUSTER)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    before = testbed.sbatch_calls()
    with open(env.root / "serve.log", "ab") as log:
        for what, reached in _moments(env):
            proc = _serve(env, log)
            try:
                # Kill once the case got that far (a later moment kills at once), a little after.
                def far(reached: Callable[[], bool] = reached, proc: subprocess.Popen[bytes] = proc) -> bool:
                    return reached() or proc.poll() is not None

                wait_for(far, timeout=60, what=what)
                time.sleep(rng.uniform(0.0, 0.3))  # jitter of the kill moment, not a wait for anything
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL, (env.root / "serve.log").read_text()[-3000:]
    # The restart, in this process (a fresh Dispatcher: nothing of the killed serves survives
    # but the store, the local intent files and what runs on the cluster).
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=90), (env.root / "serve.log").read_text()[-3000:]
    assert env.lines("launches") == BEAMS, "a job ran twice or not at all"
    with Store(url=env.db_url) as store:
        assert store.open_attempts() == []
        jobs = sbatch_job_ids(store)
        for beam in store.beams():
            assert beam.state is BeamState.COMPLETED
            ran = [a for a in store.attempts(beam.id) if a.outcome != "unlaunched"]
            assert [a.step for a in ran] == [BeamState.RUNNING]
    assert testbed.sbatch_calls() - before == len(jobs), "a job was submitted twice"
    for beam in BEAMS:
        assert (env.results / "case" / beam / "raw").read_text() == beam
