"""Malformed and hostile cases through a real `serve` loop: each is rejected once (moved to
inbox/.rejected, listed by `status`), never retried in a loop; links never leak into results;
what the inbox leaves alone is said once; the README's manual steps work as written."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tests.integration.jobs.jobs_fixtures import EXAMPLE, REPO, JobsEnv, wait_for
from tests.support import capture_events

from simbridge.config import Settings
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.names import safe_key
from simbridge.jobs.states import BeamState

pytestmark = pytest.mark.integration

SIM = "sh {config_dir}/sim.sh"
PASSWD = Path("/etc/passwd")


def _script(env: JobsEnv, body: str) -> None:
    (env.root / "sim.sh").write_text("set -u\n" + body)


def _until_idle(settings: Settings, max_s: float = 60) -> list[dict[str, object]]:
    """Serve until idle; the structured log lines it wrote."""
    with capture_events() as logs, Dispatcher(settings=settings) as dispatcher:
        idle = dispatcher.run(until_idle=True, max_s=max_s)
    assert idle, f"serve never became idle in {max_s}s; log tail: {logs[-5:]}"
    return logs


def _deep(folder: Path, levels: int) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            sub = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = sub
    finally:
        os.close(fd)


# watchdog's own inotify bookkeeping warns about the 600 nested watches; nothing of ours.
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_malformed_cases_are_rejected_once_and_the_rest_runs(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "cat plan.json > raw\n")
    settings = env.configure(steps={"simulate": SIM})
    twin = f"{safe_key('a b')[:-13]}-{hashlib.sha256(b'a b').hexdigest()[:12]}"
    env.make_case("collide", {"a b": {"plan.json": "1"}, twin: {"plan.json": "2"}})
    deep = env.make_case("deep", {"b1": {"plan.json": "{}"}}, ready=False)
    _deep(deep / "b1", 600)
    (deep / "READY").touch()
    link = env.make_case("linked", {"b1": {"plan.json": "{}"}}, ready=False)
    (link / "b1" / "secret").symlink_to(PASSWD)
    (link / "READY").touch()
    env.make_case("good", {"b1": {"plan.json": "ok"}})
    logs = _until_idle(settings)
    rejected = [e for e in logs if e["event"] == "jobs.case_rejected"]
    assert sorted(Path(str(e["folder"])).name for e in rejected) == ["collide", "deep", "linked"]
    by_name = {c["name"]: c for c in env.status()}
    assert by_name["good"]["state"] == "COMPLETED"
    assert (env.results / "good" / "b1" / "raw").read_text() == "ok"
    for name, why in [
        ("collide", rf"'a b' and '{twin}' both map to the key"),
        ("deep", "deeper than 16 levels"),
        ("linked", r"b1/secret .*symbolic link \(to '/etc/passwd'\)"),
    ]:
        assert by_name[name]["state"] == "REJECTED" and re.search(why, str(by_name[name]["reason"]))
        assert not (env.inbox / name).exists()
    shown = env.cli("status", "linked").stdout  # a name that never became a case: why
    assert "REJECTED" in shown and "symbolic link" in shown
    moved = sorted((env.inbox / ".rejected").iterdir())
    assert len(moved) == 3 and all((m / "case").is_dir() and (m / "reason.json").is_file() for m in moved)
    # Nothing of the rejected cases reached the work area, and a second serve finds nothing to do.
    assert sorted(p.name for p in (env.work / "cases").iterdir()) == ["good"]
    again = _until_idle(settings)
    assert not [e for e in again if e["event"].startswith("jobs.case_")]


def test_a_link_written_by_the_simulation_never_reaches_the_results(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, 'ln -s /etc/passwd raw\nmkdir out && ln -s /etc out/etc\necho "{}" > raw.json\n')
    settings = env.configure(
        steps={"simulate": SIM, "outputs": ["raw.json", "raw"]}, retry={"max_attempts": 1}
    )
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    _until_idle(settings)
    [case] = env.status()
    [beam] = case["beams"]
    assert beam["state"] == "FAILED" and "raw" in beam["last_error"]
    assert "symbolic link (to '/etc/passwd')" in beam["last_error"]
    secret = PASSWD.read_bytes()
    for path in env.results.rglob("*"):
        assert path.is_dir() or (not path.is_symlink() and secret not in path.read_bytes())


def test_a_link_made_by_the_prepare_step_is_never_uploaded(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "cat plan.json > raw\n")
    (env.root / "prep.sh").write_text('cp "$1/plan.json" "$2/" && ln -s /etc/passwd "$2/extra"\n')
    settings = env.configure(
        steps={"simulate": SIM, "prepare": "sh {config_dir}/prep.sh {beam_dir} {work_dir}"}
    )
    env.make_case("c1", {"b1": {"plan.json": "{}"}})
    _until_idle(settings)
    [beam] = env.status()[0]["beams"]
    assert (
        beam["state"] == "FAILED" and "extra" in beam["last_error"] and "symbolic link" in beam["last_error"]
    )
    remote = env.work / "remote"
    assert not remote.exists() or not [p for p in remote.rglob("*") if p.is_symlink()]


def test_what_the_inbox_leaves_alone_is_said_once_and_shown(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "cat plan.json > raw\n")
    settings = env.configure(steps={"simulate": SIM}, stable_s=0.2)
    env.inbox.mkdir(parents=True)
    (env.inbox / "empty-no-marker").mkdir()
    (env.inbox / ".hidden-case" / "b1").mkdir(parents=True)
    (env.inbox / "stray.txt").write_text("x")
    env.make_case("c1", {"b1": {"plan.json": "{}"}, ".b0": {"plan.json": "{}"}})
    logs = _until_idle(settings)  # before: the empty folder kept it from ever being idle
    events = [e["event"] for e in logs]
    for event in ("jobs.inbox_hidden_ignored", "jobs.inbox_not_a_folder_ignored", "jobs.case_entry_ignored"):
        assert events.count(event) == 1, (event, events)
    by_name = {c["name"]: c for c in env.status()}
    assert by_name["c1"]["state"] == "COMPLETED"
    assert [n for n in by_name["c1"]["notes"] if "'.b0'" in n]
    assert by_name[".hidden-case"]["state"] == by_name["stray.txt"]["state"] == "IGNORED"
    assert by_name["empty-no-marker"]["state"] == "WAITING"
    table = env.cli("status").stdout
    assert "stray.txt" in table and "IGNORED" in table and "empty folder" in table


def test_a_beam_added_after_the_case_was_taken_is_noted(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, 'while [ ! -e "$0.go" ]; do sleep 0.05; done\ncat plan.json > raw\n')
    settings = env.configure(steps={"simulate": "sh {config_dir}/sim.sh"})
    folder = env.make_case("c1", {"b1": {"plan.json": "{}"}})
    dispatcher = Dispatcher(settings=settings)
    with dispatcher:
        thread = threading.Thread(target=dispatcher.run, kwargs={"max_s": 120}, daemon=True)
        thread.start()
        try:
            wait_for(lambda: len(dispatcher.store.beams()) == 1, timeout=60, what="the case taken")
            (folder / "late").mkdir()
            (folder / "late" / "plan.json").write_text("{}")

            def noted() -> bool:
                notes = dispatcher.store.case_notes("ignored: ")
                return any("'late'" in n for ns in notes.values() for n in ns)

            wait_for(noted, timeout=60, what="a note on the late beam")
            (env.root / "sim.sh.go").touch()
            wait_for(
                lambda: [b.state for b in dispatcher.store.beams()] == [BeamState.COMPLETED],
                timeout=60,
                what="the taken beam to complete",
            )
        finally:
            (env.root / "sim.sh.go").touch()
            dispatcher.stop()
            thread.join(timeout=60)
    [case] = env.status()
    assert [b["name"] for b in case["beams"]] == ["b1"] and any("'late'" in n for n in case["notes"])


def test_a_case_taken_by_this_serve_is_never_called_already_taken(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "cat plan.json > raw\n")
    settings = env.configure(steps={"simulate": SIM})
    folder = env.make_case("c1", {"b1": {"plan.json": "{}"}})
    with capture_events() as logs, Dispatcher(settings=settings) as dispatcher:
        inbox = dispatcher._inbox
        assert inbox is not None
        stale = inbox.ready()  # a scan that ran just before the take below ended
        assert [p.name for p in stale] == ["c1"]
        dispatcher._take(folder)
        inbox.ready = lambda: stale  # type: ignore[method-assign]  # replay that scan's answer
        dispatcher._take_cases()
        dispatcher._threads.shutdown(wait=True)
    assert not [e for e in logs if e["event"] in {"jobs.case_rejected", "jobs.case_take_failed"}]
    assert folder.is_dir() and [c["state"] for c in env.status()] == ["PENDING"]


def test_status_shows_the_original_names(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "cat plan.json > raw\n")
    env.configure(steps={"simulate": SIM})
    # Before any serve: neither the database nor the inbox is created behind the user's back.
    first = env.cli("status", check=False)
    assert first.returncode == 1 and "not initialised" in first.stderr, first.stderr
    assert not env.inbox.exists() and not (env.root / "work" / "simbridge.db").exists()
    env.make_case("patient 7", {"beam one": {"plan.json": "{}"}})
    env.cli("serve", "--until-idle", "--max-seconds", "60")
    table = env.cli("status").stdout
    assert "patient 7" in table and "COMPLETED" in table
    key = env.status()[0]["case"]
    assert "beam one" in env.cli("status", key).stdout
    assert "beam one" in env.cli("status", "patient 7").stdout
    shutil.rmtree(env.inbox)
    later = env.cli("status")
    assert f"the inbox {env.inbox} does not exist yet" in " ".join(later.stderr.split())
    assert not env.inbox.exists()  # reported, not re-created behind the user's back


def test_the_readme_manual_steps_work_as_written(tmp_path: Path) -> None:
    readme = (EXAMPLE / "README.md").read_text()
    block = readme.split("# or by hand:\n", 1)[1].split("```", 1)[0]
    steps = [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]
    # A copy of what the steps read, run from a fresh folder that has no .work yet.
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "mqi")
    env = {**os.environ, "COLUMNS": "200", "SIMBRIDGE_GPUS__LOCK_DIR": str(tmp_path / "gpus")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    env.pop("SIMBRIDGE_CONFIG", None)
    serve: subprocess.Popen[bytes] | None = None
    try:
        for step in steps:
            words = shlex.split(step)
            if words[0] == "export":
                name, _, value = words[1].partition("=")
                env[name] = value
            elif words[:2] == ["simbridge", "serve"]:
                serve = subprocess.Popen(words, cwd=tmp_path, env=env, stderr=subprocess.PIPE)
            elif words[:2] == ["simbridge", "dashboard"]:
                continue  # interactive: a live view until Ctrl-C
            elif words[:2] == ["simbridge", "status"]:
                assert serve is not None

                def done(args: list[str] = words) -> bool:
                    out = subprocess.run(
                        [*args, "--json"],
                        check=False,
                        cwd=tmp_path,
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=60,
                    )
                    return '"state": "COMPLETED"' in out.stdout and out.returncode == 0

                wait_for(done, timeout=120, what=f"`{step}` to show the case COMPLETED")
            else:
                subprocess.run(["sh", "-c", step], cwd=tmp_path, env=env, check=True, timeout=60)
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=60)
    assert (tmp_path / ".work" / "results" / "case-1" / "beam_1" / "summary.json").is_file()


@pytest.mark.parametrize(
    ("plan", "says"),
    [
        (b"", "not valid JSON"),
        (b"{", "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "must be a JSON object"),
        (b'{"layers": NaN}', "NaN is not a number"),
        (b'{"layers": [{"energy_mev": 1e400, "spots": []}]}', "energy_mev must be finite"),
        (
            b'{"layers": [{"energy_mev": 100, "spots": [{"x_mm": "0", "y_mm": 0, "weight": 1}]}]}',
            "x_mm must be",
        ),
        (
            b'{"layers": [{"energy_mev": 100, "spots": []}], "grid": {"shape": [1e9, 1, 1], "voxel_mm": 1}}',
            "shape",
        ),
    ],
)
def test_a_bad_plan_is_one_clear_line_not_a_traceback(tmp_path: Path, plan: bytes, says: str) -> None:
    (tmp_path / "beam").mkdir()
    (tmp_path / "beam" / "plan.json").write_bytes(plan)
    out = subprocess.run(
        [sys.executable, str(EXAMPLE / "preprocess.py"), str(tmp_path / "beam"), str(tmp_path / "work")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_take_failing_on_our_side_backs_off_and_never_rejects_the_case(sqlite_env: JobsEnv) -> None:
    env = sqlite_env
    _script(env, "cat plan.json > raw\n")
    settings = env.configure(steps={"simulate": SIM})
    env.work.mkdir(parents=True)
    (env.work / "cases").write_text("in the way")  # the snapshot folder cannot be made
    folder = env.make_case("c1", {"b1": {"plan.json": "ok"}})
    with capture_events() as logs, Dispatcher(settings=settings) as dispatcher:
        thread = threading.Thread(target=dispatcher.run, kwargs={"max_s": 120}, daemon=True)
        thread.start()
        try:
            failed = lambda: [e for e in logs if e["event"] == "jobs.case_take_failed"]  # noqa: E731
            wait_for(lambda: len(failed()) >= 2, timeout=60, what="two failed takes")
            assert [e["retry_in_s"] for e in failed()[:2]] == [1.0, 2.0]  # backing off, not spinning
            assert folder.is_dir() and not (env.inbox / ".rejected").exists()
            (env.work / "cases").unlink()  # the trouble is fixed: the next try takes it
            wait_for(
                lambda: [b.state for b in dispatcher.store.beams()] == [BeamState.COMPLETED],
                timeout=60,
                what="the case taken once the work root was fixed",
            )
        finally:
            dispatcher.stop()
            thread.join(timeout=60)
    assert not [e for e in logs if e["event"] == "jobs.case_rejected"]
