"""Failures and people: a failing beam and `retry --failed`, transient retries, timeouts, cancel
(kills the whole process group), the GPU queue, hostile names, and odd case folders."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest
from tests.integration.jobs.jobs_fixtures import JobsEnv, wait_for
from tests.integration.jobs.jobs_fixtures import serving as _serving

from simbridge.config import Settings
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.states import BeamState

pytestmark = pytest.mark.integration

SIM = "sh {config_dir}/sim.sh {beam_id} {config_dir} {case_id}"


def _script(env: JobsEnv, body: str) -> None:
    (env.root / "sim.sh").write_text("set -u\n" + body)


def _run_until_idle(settings: Settings, max_s: float = 120) -> None:
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=max_s), "dispatcher did not become idle"


def _launches(env: JobsEnv) -> list[str]:
    path = env.root / "launches"
    return sorted(path.read_text().split()) if path.exists() else []


def _dead(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def test_failing_beam_then_retry_failed_runs_only_it(env: JobsEnv) -> None:
    _script(
        env,
        'echo "$1" >> "$2/launches"\n'
        'if [ "$1" = b2 ] && [ ! -e "$2/fixed" ]; then\n'
        '  echo "bad plan for $1: negative spot weight" >&2; exit 3\n'
        "fi\n"
        "echo ok > raw\n",
    )
    settings = env.configure(steps={"simulate": SIM})
    env.make_case("c1", {b: {"plan.json": "{}"} for b in ("b1", "b2", "b3")})
    _run_until_idle(settings)
    [case] = env.status()
    assert case["state"] == "PARTIAL"
    states = {b["beam"]: b for b in case["beams"]}
    assert states["b1"]["state"] == states["b3"]["state"] == "COMPLETED"
    failed = states["b2"]
    assert failed["state"] == "FAILED" and failed["exit_code"] == 3
    assert "running exited 3" in failed["last_error"]
    assert "negative spot weight" in failed["last_error"]  # the log tail travels with the error
    assert _launches(env) == ["b1", "b2", "b3"]  # exit 3 is permanent: no automatic retry

    (env.root / "fixed").touch()
    out = env.cli("retry", "c1", "--failed")
    assert "retrying 1 beam(s): b2" in out.stdout
    _run_until_idle(settings)
    [case] = env.status()
    assert case["state"] == "COMPLETED"
    assert _launches(env) == ["b1", "b2", "b2", "b3"]  # only the failed beam ran again
    assert (env.results / "c1" / "b2" / "raw").read_text() == "ok\n"
    assert env.cli("retry", "c1").stdout.startswith("retrying 0 beam(s)")


def test_transient_failure_is_retried_with_backoff(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(
        env,
        'echo "$1" >> "$2/launches"\n'
        'if [ ! -e "$2/once-$1" ]; then touch "$2/once-$1"; exit 75; fi\n'
        "echo ok > raw\n",
    )
    settings = env.configure(steps={"simulate": SIM}, retry={"backoff_initial_s": 0.1, "max_attempts": 3})
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=120)
        [beam] = dispatcher.store.beams()
        assert beam.state is BeamState.COMPLETED
        runs = [a for a in dispatcher.store.attempts(beam.id) if a.step is BeamState.RUNNING]
        assert [(a.outcome, a.exit_code) for a in runs] == [("transient", 75), ("ok", 0)]
        reasons = [e.reason for e in dispatcher.store.events(beam_id=beam.id)]
        assert any("transient, retry 2/3" in r for r in reasons)
    assert _launches(env) == ["b1", "b1"]


def test_transient_failures_stop_after_max_attempts(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, 'echo "$1" >> "$2/launches"\nexit 75\n')
    settings = env.configure(steps={"simulate": SIM}, retry={"backoff_initial_s": 0.05, "max_attempts": 2})
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    _run_until_idle(settings)
    [case] = env.status()
    assert case["beams"][0]["state"] == "FAILED" and case["beams"][0]["exit_code"] == 75
    assert _launches(env) == ["b1", "b1"]


def test_timeout_fails_the_beam_and_kills_it(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, 'echo $$ > "$2/pid"\nexec sleep 120\n')
    settings = env.configure(steps={"simulate": SIM}, timeouts={"simulate_s": 1})
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    _run_until_idle(settings, max_s=120)
    [case] = env.status()
    beam = case["beams"][0]
    assert beam["state"] == "FAILED" and "timed out" in beam["last_error"]
    pid = int((env.root / "pid").read_text())
    wait_for(lambda: _dead(pid), timeout=30, what="the timed-out simulation to be gone")


def test_cancel_kills_the_whole_process_group(env: JobsEnv) -> None:
    _script(
        env,
        'sleep 300 & echo $! > "$2/child.pid"\necho $$ > "$2/parent.pid"\nwait\necho ok > raw\n',
    )
    settings = env.configure(steps={"simulate": SIM})
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    with _serving(settings) as dispatcher:
        wait_for(
            lambda: (
                (env.root / "child.pid").exists() and dispatcher.store.beams()[0].state is BeamState.RUNNING
            ),
            timeout=60,
            what="the simulation to run",
        )
        wait_for(lambda: (env.root / "child.pid").read_text().strip() != "", timeout=10, what="pid")
        child = int((env.root / "child.pid").read_text())
        parent = int((env.root / "parent.pid").read_text())
        out = env.cli("cancel", "c1/b1")
        assert "cancelled 1 beam(s): b1" in out.stdout
        wait_for(lambda: _dead(child) and _dead(parent), timeout=30, what="the group to die")
        wait_for(dispatcher.idle, timeout=30, what="the dispatcher to settle")
        [beam] = dispatcher.store.beams()
        assert beam.state is BeamState.CANCELLED
        [attempt] = [a for a in dispatcher.store.attempts(beam.id) if a.step is BeamState.RUNNING]
        assert attempt.outcome == "cancelled"
    [case] = env.status()
    assert case["state"] == "CANCELLED"
    assert not (env.results / "c1" / "b1").exists()
    # A cancelled beam can be restarted on request.
    assert "retrying 1 beam(s)" in env.cli("retry", "c1", "--cancelled").stdout
    assert env.status()[0]["beams"][0]["state"] == "PENDING"


def test_gpu_queue_never_shares_a_gpu(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    env.slots = 2
    _script(
        env,
        'echo "start $CUDA_VISIBLE_DEVICES" >> "$2/gpu.log"\nsleep 0.3\n'
        'echo "end $CUDA_VISIBLE_DEVICES" >> "$2/gpu.log"\necho ok > raw\n',
    )
    settings = env.configure(steps={"simulate": SIM}, workers=8)
    env.make_case("c1", {f"b{i}": {"plan.json": "{}"} for i in range(6)})
    _run_until_idle(settings)
    busy: set[str] = set()
    peak = 0
    for line in (env.root / "gpu.log").read_text().splitlines():
        what, gpu = line.split()
        if what == "start":
            assert gpu not in busy, f"GPU {gpu} given to two beams at once"
            busy.add(gpu)
            peak = max(peak, len(busy))
        else:
            busy.remove(gpu)
    assert peak <= 2
    [case] = env.status()
    assert case["state"] == "COMPLETED"
    assert {b["gpu"] for b in case["beams"]} <= {"0", "1"}


def test_hostile_names_never_reach_a_shell_or_leave_the_roots(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, 'printf "%s|%s" "$1" "$3" > raw\n')
    settings = env.configure(steps={"simulate": SIM})
    case_name = "$(touch PWNED); rm -rf ~ 'q\" `id`"
    beams = ["a b", ";touch PWNED", "ünïcødé", "-rf", "x" * 200, "dots..x..", "$HOME"]
    env.make_case(case_name, {b: {"plan.json": "{}"} for b in beams})
    cwd_before = set(os.listdir(Path.cwd()))
    _run_until_idle(settings)
    [case] = env.status()
    assert case["state"] == "COMPLETED", case
    assert case["name"] == case_name
    assert sorted(b["name"] for b in case["beams"]) == sorted(beams)
    for beam in case["beams"]:
        key = beam["beam"]
        assert "/" not in key and key[0].isalnum() and len(key) <= 64
        raw = env.results / case["case"] / key / "raw"
        assert raw.read_text() == f"{key}|{case['case']}"  # the safe keys, never the raw names
    for path in [env.root, Path.cwd(), Path.home()]:
        assert not list(path.rglob("PWNED")) if path == env.root else not (path / "PWNED").exists()
    assert set(os.listdir(Path.cwd())) == cwd_before
    results = list(env.results.rglob("*"))
    assert all(p.resolve().is_relative_to(env.results.resolve()) for p in results)


def test_empty_case_and_beam_without_files(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "echo ok > raw\n")
    settings = env.configure(steps={"simulate": SIM})
    env.make_case("empty", {})
    env.make_case("mixed", {"good": {"plan.json": "{}"}, "hollow": {}})
    _run_until_idle(settings)
    by_case = {c["case"]: c for c in env.status()}
    assert by_case["empty"]["state"] == "EMPTY" and by_case["empty"]["beams"] == []
    mixed = {b["beam"]: b for b in by_case["mixed"]["beams"]}
    assert by_case["mixed"]["state"] == "PARTIAL"
    assert mixed["good"]["state"] == "COMPLETED"
    assert mixed["hollow"]["state"] == "FAILED" and "has no files" in mixed["hollow"]["last_error"]


def test_case_removed_after_it_was_taken_still_completes(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, 'while [ ! -e "$2/go" ]; do sleep 0.05; done\necho ok > raw\n')
    settings = env.configure(steps={"simulate": SIM})
    folder = env.make_case("c1", {"b1": {"plan.json": "{}"}, "b2": {"plan.json": "{}"}})
    with _serving(settings) as dispatcher:
        wait_for(lambda: len(dispatcher.store.beams()) == 2, timeout=60, what="the case taken")
        shutil.rmtree(folder)  # removed from the inbox while its beams are queued/running
        (env.root / "go").touch()
        wait_for(
            lambda: {b.state for b in dispatcher.store.beams()} == {BeamState.COMPLETED},
            timeout=60,
            what="both beams to complete from the snapshot",
        )


def test_case_removed_before_it_was_complete_is_never_taken(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "echo ok > raw\n")
    settings = env.configure(steps={"simulate": SIM}, ready_marker=None, stable_s=1.0)
    with _serving(settings) as dispatcher:
        folder = env.make_case("gone", {"b1": {"plan.json": "{}"}}, ready=False)
        shutil.rmtree(folder)
        later = env.make_case("kept", {"b1": {"plan.json": "{}"}}, ready=False)
        wait_for(
            lambda: (
                [c.key for c in dispatcher.store.cases()] == ["kept"]
                and dispatcher.store.beams()[0].state is BeamState.COMPLETED
            ),
            timeout=60,
            what="the later case to complete",
        )
        assert later.exists()
    assert [c["case"] for c in env.status()] == ["kept"]


def test_bad_input_gets_a_clear_error_and_exit_code_1(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    env.configure()  # no simulate step configured
    out = env.cli("serve", "--until-idle", check=False)
    assert out.returncode == 1 and "jobs.steps.simulate is not set" in out.stderr
    out = env.cli("submit", str(env.root / "no-such-case"), check=False)
    assert out.returncode == 1 and "is not a folder" in out.stderr
    out = env.cli("status", "nope", check=False)
    assert out.returncode == 1 and "no case 'nope'" in out.stderr
    out = env.cli("cancel", "nope/b1", check=False)
    assert out.returncode == 1 and "no case" in out.stderr


def test_the_gpu_holder_shown_is_the_running_simulation(sqlite_env: JobsEnv) -> None:
    from simbridge.gpus import GpuPool

    env = sqlite_env
    env.slots = 1
    _script(env, 'echo $$ > "$2/sim.pid"\nsleep 2\necho ok > raw\n')
    settings = env.configure(steps={"simulate": SIM})
    env.make_case("c1", {"b0": {"plan.json": "{}"}})
    holders: list[list[int]] = []
    with Dispatcher(settings=settings) as dispatcher:
        thread = threading.Thread(target=dispatcher.run, kwargs={"until_idle": True, "max_s": 120})
        thread.start()
        wait_for((env.root / "sim.pid").exists, timeout=60, what="the simulation to start")
        with GpuPool.from_settings(settings) as pool:
            wait_for(
                lambda: any(p != os.getpid() for p in pool.holders()[0].pids),
                timeout=10,
                what="the launched process recorded as a holder",
            )
            holders.append(list(pool.holders()[0].pids))
        thread.join(timeout=120)
    sim_pid = int((env.root / "sim.pid").read_text())
    # Besides the dispatcher that leased it, the launched process that inherited the lock is named.
    assert os.getpid() in holders[0] and any(pid != os.getpid() for pid in holders[0]), holders
    assert sim_pid > 0


def test_more_gpus_per_beam_than_the_pool_has_is_a_clear_config_error(sqlite_env: JobsEnv) -> None:
    from simbridge.jobs.errors import JobsConfigError

    env = sqlite_env
    env.slots = 2
    settings = env.configure(steps={"simulate": SIM}, gpus_per_beam=3)
    with pytest.raises(JobsConfigError, match="gpus_per_beam is 3 but the pool has 2"):
        Dispatcher(settings=settings)
