"""kill -9 of `serve` while its beams run on the loopback Slurm cluster, at different moments: after a
restart the jobs are adopted (found again by name), none is submitted twice (the testbed counts
sbatch calls) and none runs twice (each job appends its beam to a file from its own side)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.integration.jobs.cluster_fixtures import CLUSTER, ClusterEnv, sbatch_job_ids, tiny_steps
from tests.integration.jobs.jobs_fixtures import REPO
from tests.testbed import Testbed

from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BEAMS = ["b1", "b2", "b3"]
SEED = int(os.environ.get("SIMBRIDGE_KILL_SEED", "0"))
TRIALS = 10


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


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_9_while_jobs_run_then_adopt(
    tmp_path: Path, testbed: Testbed, monkeypatch: pytest.MonkeyPatch, trial: int
) -> None:
    monkeypatch.setenv("SIMBRIDGE_CONFIG", "")
    rng = random.Random(SEED * 1000 + trial)
    env = ClusterEnv(root=tmp_path, db_url=f"sqlite:///{tmp_path / 'work' / 'simbridge.db'}")
    remote = testbed.new_remote_root()
    # Odd trials submit one array, even ones single jobs: adoption of both.
    slurm = {"arrays": trial % 2 == 1}
    env.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(remote), slurm=slurm)}
    settings = env.configure(steps=tiny_steps(env, sleep_s=0.3), executor=CLUSTER)
    env.make_case("case", {b: {"plan.json": "{}"} for b in BEAMS})
    # Moments spread over start-up, upload, submit, queue and run (later trials later).
    moment = 0.4 + (trial / TRIALS) * 2.5 + rng.uniform(0.0, 0.25)
    before = testbed.sbatch_calls()
    with open(env.root / "serve.log", "ab") as log:
        proc = _serve(env, log)
        try:
            proc.wait(timeout=moment)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # The restart, in this process (a fresh Dispatcher: nothing of the killed serve survives
    # but the store, the local intent files and what runs on the cluster).
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=90), (env.root / "serve.log").read_text()
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
