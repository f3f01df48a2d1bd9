"""kill -9 of the orchestrator at random moments: after a restart every beam completes exactly once.

Each trial drops a 6-beam case in the inbox, starts `simbridge serve` as a real process and kills
it with SIGKILL three times at random moments (during start-up, taking the case, preparing,
queueing, running, collecting, postprocessing...), then lets a last `serve` finish. Every command
appends its beam to a launch log: each beam must be prepared, simulated and postprocessed exactly
once, with exactly one result, and no attempt may be left open.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
from tests.integration.jobs.jobs_fixtures import REPO, JobsEnv

from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BEAMS = [f"beam_{i}" for i in range(6)]
# Other seeds explore other moments: SIMBRIDGE_KILL_SEED=7 pytest ... (the default is fixed).
SEED = int(os.environ.get("SIMBRIDGE_KILL_SEED", "0"))
KILLS_PER_TRIAL = 3

PREPARE = 'echo "$1" >> "$2/prepares"\ncp "$3/plan.json" plan.json\n'
SIMULATE = 'echo "$1" >> "$2/launches"\nsleep "$4"\nprintf "%s" "$1" > raw\n'
POSTPROCESS = 'echo "$1" >> "$2/posts"\n'


def _start_serve(env: JobsEnv, log: object) -> subprocess.Popen[bytes]:
    child_env = {**os.environ, "SIMBRIDGE_CONFIG": str(env.config_path)}
    child_env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), child_env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "simbridge.jobs", "serve"],
        cwd=env.root,
        env=child_env,
        stdout=log,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
    )


def _lines(env: JobsEnv, name: str) -> list[str]:
    path = env.root / name
    return sorted(path.read_text().split()) if path.exists() else []


def _trial(env: JobsEnv, seed: int) -> None:
    rng = random.Random(seed)
    env.slots = 2
    (env.root / "prepare.sh").write_text(PREPARE)
    (env.root / "sim.sh").write_text(SIMULATE)
    (env.root / "post.sh").write_text(POSTPROCESS)
    sleep_s = f"{rng.uniform(0.1, 0.4):.2f}"
    env.configure(
        workers=4,
        max_preparing=2,
        steps={
            "prepare": "sh {config_dir}/prepare.sh {beam_id} {config_dir} {beam_dir}",
            "simulate": f"sh {{config_dir}}/sim.sh {{beam_id}} {{config_dir}} x {sleep_s}",
            "postprocess": "sh {config_dir}/post.sh {beam_id} {config_dir}",
        },
    )
    env.make_case("case", {b: {"plan.json": f'{{"beam": "{b}"}}'} for b in BEAMS})
    moments = sorted(rng.uniform(0.05, 2.5) for _ in range(KILLS_PER_TRIAL))
    with open(env.root / "serve.log", "ab") as log:
        for moment in moments:
            proc = _start_serve(env, log)
            try:
                proc.wait(timeout=moment)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL, "serve ended by itself before the kill"
    final = env.cli("serve", "--until-idle", "--max-seconds", "180")
    assert final.returncode == 0, final.stderr

    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    assert _lines(env, "prepares") == BEAMS, "a beam was prepared twice or not at all"
    assert _lines(env, "launches") == BEAMS, "a simulation ran twice or not at all"
    assert _lines(env, "posts") == BEAMS, "a beam was postprocessed twice or not at all"
    for beam in BEAMS:
        assert (env.results / "case" / beam / "raw").read_text() == beam
        assert sorted(p.name for p in (env.results / "case" / beam).iterdir()) == ["raw"]
    with Store(url=env.db_url) as store:
        assert store.open_attempts() == []
        for beam in store.beams():
            assert beam.state is BeamState.COMPLETED
            # Attempts that really ran: exactly one per command step.
            ran = [a.step for a in store.attempts(beam.id) if a.outcome != "unlaunched"]
            assert ran == [BeamState.PREPARING, BeamState.RUNNING, BeamState.POSTPROCESSING]
    # Nothing left running: every simulation was collected.
    time.sleep(0.1)


@pytest.mark.parametrize("trial", range(7))
def test_kill_9_and_resume_sqlite(sqlite_env: JobsEnv, trial: int) -> None:
    _trial(sqlite_env, seed=SEED * 100_000 + 1000 + trial)


@pytest.mark.parametrize("trial", range(2))
def test_kill_9_and_resume_postgresql(sqlite_env: JobsEnv, pg_server: object, trial: int) -> None:
    sqlite_env.db_url = pg_server.new_database()  # type: ignore[attr-defined]
    _trial(sqlite_env, seed=SEED * 100_000 + 2000 + trial)
