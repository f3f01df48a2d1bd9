"""run.sh rendered and run for real with bash: markers, environment, signals, hostile names, templates."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path, PurePosixPath

import pytest
from tests.support import wait_for

from simbridge.jobs.errors import RemotePathError, RunScriptError
from simbridge.jobs.executors.base import JobInfo, JobStatus
from simbridge.jobs.executors.local import read_exit_file
from simbridge.jobs.executors.runscript import (
    AttemptFiles,
    attempt_files,
    check_template,
    confined,
    load_template,
    parse_exit_marker,
    render_run_script,
)

HOSTILE = "we'ird $(touch PWNED) `x` ;&|\"\\ n\u00e4me"


def _files(root: Path, case: str = "case", beam: str = "beam") -> AttemptFiles:
    files = attempt_files(PurePosixPath(root), Path("/local/logs", case, beam, "running-1"))
    Path(files.folder).mkdir(parents=True)
    return files


def _run(script: str, files: AttemptFiles, *, wait: bool = True) -> subprocess.Popen[bytes]:
    Path(files.script).write_text(script)
    with open(files.stdout, "wb") as out, open(files.stderr, "wb") as err:
        proc = subprocess.Popen(
            ["bash", str(files.script)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    if wait:
        proc.wait(timeout=30)
    return proc


def _marker(files: AttemptFiles) -> JobInfo | None:
    return read_exit_file(Path(files.exit_file))


def test_success_writes_markers_env_and_runs_in_the_beam_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    beam = root / "case" / "beam"
    files = _files(root)
    beam.mkdir(parents=True, exist_ok=True)
    argv = ["sh", "-c", 'pwd; echo "$A|$CUDA_VISIBLE_DEVICES|$SIMBRIDGE_ATTEMPT"']
    script = render_run_script(
        remote_root=PurePosixPath(root),
        files=files,
        token="sb-abc",
        argv=argv,
        workdir=PurePosixPath(beam),
        env={"A": "x y $HOME", "CUDA_VISIBLE_DEVICES": "overridden"},
        gpus=[2, 5],
    )
    proc = _run(script, files)
    assert proc.returncode == 0
    assert _marker(files) == JobInfo(JobStatus.EXITED, exit_code=0)
    assert Path(files.stdout).read_text().splitlines() == [str(beam), "x y $HOME|2,5|sb-abc"]
    assert Path(files.success).exists() and not Path(files.failed).exists()
    assert not Path(files.exit_tmp).exists()
    pid, start = Path(files.pid_file).read_text().split()
    assert int(pid) == proc.pid and int(start) > 0
    info = dict(line.split("=", 1) for line in Path(files.info_file).read_text().splitlines())
    assert info["exit"] == "0" and info["host"] and int(info["end"]) >= int(info["start"])


def test_failure_and_missing_program_and_missing_folder(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "case" / "beam").mkdir(parents=True)
    work = PurePosixPath(root / "case" / "beam")
    for argv, code in ((["sh", "-c", "echo boom >&2; exit 3"], 3), (["no-such-program-here"], 127)):
        files = _files(root, beam=f"b{code}")
        script = render_run_script(
            remote_root=PurePosixPath(root), files=files, token="sb-f", argv=argv, workdir=work
        )
        assert _run(script, files).returncode == code
        assert _marker(files) == JobInfo(JobStatus.EXITED, exit_code=code)
        assert Path(files.failed).exists() and not Path(files.success).exists()
    assert "boom" in Path(_files_of(root, "b3").stderr).read_text()
    files = _files(root, beam="gone")
    script = render_run_script(
        remote_root=PurePosixPath(root), files=files, token="sb-g", argv=["true"], workdir=work / "missing"
    )
    assert _run(script, files).returncode == 126
    assert _marker(files) == JobInfo(JobStatus.EXITED, exit_code=126)
    assert "cannot enter" in Path(files.stderr).read_text()


def _files_of(root: Path, beam: str) -> AttemptFiles:
    return attempt_files(PurePosixPath(root), Path("/local/logs/case", beam, "running-1"))


def test_term_to_the_script_reaches_the_group_and_reads_as_a_signal(tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = root / "case" / "beam"
    work.mkdir(parents=True)
    files = _files(root)
    # The command's child ignores nothing: TERM must reach it through the group, not via sh.
    argv = ["sh", "-c", "sleep 60 & echo $! > child; wait"]
    script = render_run_script(
        remote_root=PurePosixPath(root), files=files, token="sb-t", argv=argv, workdir=PurePosixPath(work)
    )
    proc = _run(script, files, wait=False)
    wait_for(
        lambda: (work / "child").exists() and (work / "child").read_text().strip(),
        timeout=20,
        what="child pid",
    )
    child = int((work / "child").read_text())
    os.kill(proc.pid, signal.SIGTERM)  # the script alone: it forwards to its group
    proc.wait(timeout=20)
    assert _marker(files) == JobInfo(JobStatus.KILLED, signal=signal.SIGTERM)
    wait_for(
        lambda: not Path(f"/proc/{child}").exists() or _zombie(child), timeout=20, what="grandchild gone"
    )
    assert Path(files.failed).exists()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    except OSError:
        return True


def test_hostile_names_are_quoted_and_confined(tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = root / HOSTILE / HOSTILE
    work.mkdir(parents=True)
    files = _files(root, HOSTILE, HOSTILE)
    argv = ["sh", "-c", 'printf "%s\\n" "$1" "$PWD"', "sh", HOSTILE]
    script = render_run_script(
        remote_root=PurePosixPath(root),
        files=files,
        token="sb-h",
        argv=argv,
        workdir=PurePosixPath(work),
        env={"WEIRD": HOSTILE},
    )
    assert _run(script, files).returncode == 0
    assert Path(files.stdout).read_text().splitlines() == [HOSTILE, str(work)]
    assert not list(tmp_path.rglob("PWNED"))
    with pytest.raises(RemotePathError):
        attempt_files(PurePosixPath(root), Path("/l/logs/..", "beam", "running-1"))
    with pytest.raises(RemotePathError):
        render_run_script(
            remote_root=PurePosixPath(root), files=files, token="sb-h", argv=["true"], workdir="/etc"
        )
    with pytest.raises(RemotePathError):
        confined(PurePosixPath(root), "a/../../x")
    assert confined(PurePosixPath("/r"), "a/./b") == PurePosixPath("/r/a/b")


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    root = PurePosixPath(tmp_path)
    files = attempt_files(root, Path("/l/logs/c/b/running-1"))
    kw: dict[str, object] = {"remote_root": root, "files": files, "workdir": root / "c"}
    with pytest.raises(RunScriptError, match="not a shell name"):
        render_run_script(token="sb-1", argv=["true"], env={"A-B": "x"}, **kw)  # type: ignore[arg-type]
    with pytest.raises(RunScriptError, match="GPU id"):
        render_run_script(token="sb-1", argv=["true"], gpus=["0;rm"], **kw)  # type: ignore[arg-type]
    with pytest.raises(RunScriptError, match="token"):
        render_run_script(token="sb 1", argv=["true"], **kw)  # type: ignore[arg-type]
    with pytest.raises(RunScriptError, match="empty"):
        render_run_script(token="sb-1", argv=[], **kw)  # type: ignore[arg-type]


def test_template_from_file_and_its_errors(tmp_path: Path) -> None:
    template = tmp_path / "run.tmpl"
    template.write_text("#!/bin/bash\n$environment\ncd -- $workdir && exec $command > $$HOME/x\n")
    text = load_template(template)
    root = PurePosixPath(tmp_path)
    files = attempt_files(root, Path("/l/logs/c/b/running-1"))
    out = render_run_script(
        remote_root=root, files=files, token="sb-1", argv=["echo", "a b"], workdir=root / "c", template=text
    )
    assert "exec echo 'a b' > $HOME/x" in out and "export SIMBRIDGE_ATTEMPT=sb-1" in out
    template.write_text("echo $beam_name $command\n")
    with pytest.raises(RunScriptError, match=r"unknown field\(s\) \$beam_name"):
        load_template(template)
    with pytest.raises(RunScriptError, match=r"line 1.*\$\$"):
        check_template("echo $(date)\n")
    with pytest.raises(RunScriptError, match="cannot read"):
        load_template(tmp_path / "missing.tmpl")


def test_exit_marker_bytes_are_read_like_the_local_ones() -> None:
    assert parse_exit_marker(b"exit 3\n") == JobInfo(JobStatus.EXITED, exit_code=3)
    assert parse_exit_marker(b"signal 9\n") == JobInfo(JobStatus.KILLED, signal=9)
    assert parse_exit_marker(b"17\n") == JobInfo(JobStatus.EXITED, exit_code=17)
    for junk in (b"", b"exit 1", b"junk\n", b"exit -1\n", b"exit 999\n", b"signal 0\n", b"x" * 100 + b"\n"):
        assert parse_exit_marker(junk) is None


def test_a_kill_of_the_group_but_its_leader_still_reads_as_a_signal(tmp_path: Path) -> None:
    root = tmp_path / "root"
    work = root / "case" / "beam"
    work.mkdir(parents=True)
    files = _files(root)
    argv = ["sh", "-c", "echo > started; exec sleep 60"]
    script = render_run_script(
        remote_root=PurePosixPath(root), files=files, token="sb-k", argv=argv, workdir=PurePosixPath(work)
    )
    proc = _run(script, files, wait=False)
    wait_for((work / "started").exists, timeout=20, what="the command started")
    # What the SSH executor's cancel does after the grace: KILL every member but run.sh.
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != proc.pid:
            try:
                pgrp = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
            except (OSError, IndexError, ValueError):
                continue
            if pgrp == proc.pid:
                os.kill(int(entry.name), signal.SIGKILL)
    proc.wait(timeout=20)
    assert _marker(files) == JobInfo(JobStatus.KILLED, signal=signal.SIGKILL)
