"""Every `simbridge shm` command fed ugly input ends in one error line and a non-zero exit, never a traceback.

Ugly names (empty, huge, `../`, spaces, quotes, unicode, bytes that are not UTF-8), ugly segments
(0 bytes, random bytes, a directory, a corrupted payload), another user's block and a malformed
recording, each through Typer's CliRunner.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result
from typer.testing import CliRunner

from simbridge.shm import Block, block_info
from simbridge.shm.cli import app, demo_app

runner = CliRunner()
SHM = Path("/dev/shm")
NOBODY = 65534  # owns the "other user's" block
STRANGER = 65533  # runs the CLI: neither root nor the owner

UGLY_NAMES = [
    "",
    "x" * 5000,
    "../etc",
    "../../dev/shm/x",
    "a b",
    'quo"te',
    "it's",
    "ünïcødé",
    "name\x00nul",
    b"caf\xe9-\xff".decode("utf-8", "surrogateescape"),  # what Python makes of non-UTF-8 argv bytes
    "a/b",
    ".hidden",
    "/abs",
]


def assert_one_line_error(result: Result, code: int | None = None) -> str:
    """The command failed cleanly: non-zero exit, no traceback, exactly one `error:` line on stderr."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("name", UGLY_NAMES, ids=range(len(UGLY_NAMES)))
@pytest.mark.parametrize("command", [["inspect"], ["rm"], ["rm", "--force"]])
def test_ugly_names_are_refused_in_one_line(command: list[str], name: str) -> None:
    result = runner.invoke(app, [*command, "--", name])
    line = assert_one_line_error(result, 1)
    assert "invalid block name" in line and "use 1 to 200 of [A-Za-z0-9._-]" in line


@pytest.fixture
def ugly_segments(block_name: str) -> Iterator[dict[str, str]]:
    """Segments a crash, a stray tool or a hostile user may leave under simbridge's prefix."""
    names = {kind: f"{block_name}-{kind}" for kind in ("empty", "random", "dir", "link")}
    (SHM / f"simbridge.{names['empty']}").touch()
    (SHM / f"simbridge.{names['random']}").write_bytes(np.random.default_rng(1).bytes(5000))
    (SHM / f"simbridge.{names['dir']}").mkdir()
    (SHM / f"simbridge.{names['link']}").symlink_to("/etc/passwd")
    weird = os.fsencode(str(SHM)) + b"/simbridge." + block_name.encode() + b"-\xff\xfe"
    fd = os.open(weird, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    try:
        yield names
    finally:
        os.rmdir(SHM / f"simbridge.{names['dir']}")
        os.unlink(weird)


def test_ugly_segments_are_listed_not_crashed_on(ugly_segments: dict[str, str]) -> None:
    result = runner.invoke(app, ["ls", "--json"])
    assert result.exit_code == 0, result.output
    listed = {b["name"]: b for b in json.loads(result.stdout)}
    assert listed[ugly_segments["random"]]["state"] == "invalid"
    assert listed[ugly_segments["dir"]]["state"] == "invalid"
    assert listed[ugly_segments["link"]]["state"] == "invalid"
    assert listed[ugly_segments["empty"]]["state"] == "uninitialised"
    result = runner.invoke(app, ["ls"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "\\xff" in result.stdout  # the undecodable name is shown, escaped
    result = runner.invoke(app, ["clean", "--prefix", ugly_segments["dir"].rsplit("-", 1)[0]])
    assert result.exit_code == 0, result.output
    assert all(
        (SHM / f"simbridge.{n}").exists() or (SHM / f"simbridge.{n}").is_symlink()
        for n in ugly_segments.values()
    )


def test_inspect_and_rm_on_ugly_segments(ugly_segments: dict[str, str]) -> None:
    for kind, name in ugly_segments.items():
        line = assert_one_line_error(runner.invoke(app, ["inspect", name]), 1)
        assert name in line, line
        if kind == "empty":
            assert "initialised by its creator" in line
        else:
            assert "cannot be inspected" in line and "shm rm" in line
    line = assert_one_line_error(runner.invoke(app, ["rm", ugly_segments["dir"]]), 1)
    assert "is a directory" in line.lower() and "rmdir" in line
    line = assert_one_line_error(runner.invoke(app, ["rm", ugly_segments["empty"]]), 1)
    assert "being created" in line and "force" in line
    assert runner.invoke(app, ["rm", "--force", ugly_segments["empty"]]).exit_code == 0
    assert runner.invoke(app, ["rm", ugly_segments["random"]]).exit_code == 0
    assert runner.invoke(app, ["rm", ugly_segments["link"]]).exit_code == 0
    assert (Path("/etc/passwd")).exists()


def test_inspect_reports_a_corrupted_payload_in_one_line(block_name: str) -> None:
    with Block.create(block_name, 64, np.float32) as writer:
        writer.publish(np.arange(64, dtype=np.float32))
        header = writer.header()
        with open(SHM / f"simbridge.{block_name}", "r+b") as raw:  # a peer scribbling outside the protocol
            for slot in range(header["slot_count"]):
                raw.seek(header["payload_offset"] + slot * header["slot_stride"])
                raw.write(b"\xde\xad\xbe\xef" * 16)
        result = runner.invoke(app, ["inspect", block_name])
    line = assert_one_line_error(result, 1)
    assert "corrupted" in line and "restart the writer" in line
    assert "owner_pid" in result.stdout  # the header is still shown


def test_diff_on_malformed_recordings(tmp_path: Path) -> None:
    good = {
        "name": "b",
        "direction": "read",
        "iteration": 1,
        "commit": 1,
        "checksum": 5,
        "writer_pid": 1,
        "file": "b/x.npz",
    }
    cases: dict[str, Any] = {
        "not json": b"[{",
        "not utf-8": b"\xff\xfe[]",
        "an object": b'{"a": 1}',
        "a list of numbers": b"[1, 2]",
        "missing keys": b'[{"direction": "read"}]',
        "wrong types": json.dumps([good | {"commit": "1"}]).encode(),
        "a bool commit": json.dumps([good | {"commit": True}]).encode(),
        "a bad direction": json.dumps([good | {"direction": "sideways"}]).encode(),
        "a huge checksum": json.dumps([good | {"checksum": 2**80}]).encode(),
    }
    for what, content in cases.items():
        folder = tmp_path / what.replace(" ", "-")
        folder.mkdir()
        (folder / "metadata.json").write_bytes(content)
        line = assert_one_line_error(runner.invoke(app, ["diff", str(folder)]), 1)
        assert "metadata.json" in line, (what, line)
    folder = tmp_path / "index-is-a-folder"
    (folder / "metadata.json").mkdir(parents=True)
    assert_one_line_error(runner.invoke(app, ["diff", str(folder)]), 1)
    assert_one_line_error(runner.invoke(app, ["diff", str(tmp_path / "missing")]), 2)
    assert_one_line_error(runner.invoke(app, ["diff", "\x00"]), 2)


def test_demo_refuses_bad_iterations_without_a_traceback() -> None:
    result = runner.invoke(demo_app, ["blocks", "--iterations", "0"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output


def _as_stranger(commands: list[list[str]]) -> list[dict[str, Any]]:
    """Run CLI commands in a forked child that dropped root to uid STRANGER; their results."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(STRANGER, STRANGER, STRANGER)
            os.setresuid(STRANGER, STRANGER, STRANGER)
            out = []
            for command in commands:
                result = runner.invoke(app, command)
                out.append(
                    {
                        "exit": result.exit_code,
                        "stderr": result.stderr,
                        "output": result.output,
                        "exception": repr(result.exception),
                    }
                )
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    results: list[dict[str, Any]] = json.loads(b"".join(chunks))
    return results


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand a block to another uid")
def test_another_users_block_gives_one_line_errors(block_name: str) -> None:
    with Block.create(block_name, 4, np.float32, mode=0o600) as writer:
        writer.publish(np.ones(4, np.float32))
        path = SHM / f"simbridge.{block_name}"
        os.chown(path, NOBODY, NOBODY)
        results = _as_stranger(
            [["inspect", block_name], ["rm", block_name], ["rm", "--force", block_name], ["ls", "--json"]]
        )
        for result in results[:3]:
            assert result["exit"] == 1, result
            assert "Traceback" not in result["output"], result
            lines = [line for line in result["stderr"].splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), result
        assert "Permission denied" in results[0]["stderr"]
        assert "uid 65534" in results[2]["stderr"] and "as root" in results[2]["stderr"]
        assert results[3]["exit"] == 0, results[3]
        assert path.exists()  # nothing was removed
        info = block_info(block_name)
        assert info is not None and info.alive


def test_a_killed_cli_leaves_no_lock_behind(block_name: str) -> None:
    """The lock is an flock: a process killed while holding it frees it, and the next taker proceeds."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        from simbridge.shm.namelock import name_lock

        with name_lock(block_name):
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    with Block.create(block_name, 1, np.int8):  # takes the same lock
        pass


def test_inspect_of_a_block_closed_before_its_first_publish(block_name: str) -> None:
    code = (
        "import os, sys, numpy as np\n"
        "from simbridge.shm import Block\n"
        f"b = Block.create({block_name!r}, 2, np.float32)\n"
        "b._seg.close()\n"  # marked closed, name kept: what a C peer's close without unlink leaves
        "os._exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    result = runner.invoke(app, ["inspect", block_name])
    assert result.exit_code == 0, result.output
    assert "nothing published" in result.stdout


def test_text_from_a_recording_or_a_file_name_is_not_read_as_markup(tmp_path: Path) -> None:
    entry = {"iteration": 1, "commit": 1, "writer_pid": 1, "name": "[/oops]", "file": "[bold]f"}
    entries = [entry | {"direction": "publish", "checksum": 1}, entry | {"direction": "read", "checksum": 2}]
    (tmp_path / "metadata.json").write_text(json.dumps(entries))
    result = runner.invoke(app, ["diff", str(tmp_path)], env={"COLUMNS": "300"})
    assert result.exit_code == 1 and "1 mismatched" in result.stdout, result.output
    assert "[/oops]" in result.stdout and "[bold]f" in result.stdout
    hidden = SHM / "simbridge.[red]tag"
    hidden.touch()
    try:
        result = runner.invoke(app, ["ls"], env={"COLUMNS": "300"})
        assert result.exit_code == 0 and "[red]tag" in result.stdout, result.output
        result = runner.invoke(app, ["ls", "--json"])
        assert "[red]tag" in [b["name"] for b in json.loads(result.stdout)]
    finally:
        hidden.unlink()
