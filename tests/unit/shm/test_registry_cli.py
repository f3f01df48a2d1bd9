"""Listing, removing and cleaning blocks, through the API and the `simbridge shm` commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from simbridge.shm import (
    Block,
    BlockExists,
    BlockNotFound,
    block_info,
    cleanup_stale,
    list_blocks,
    remove,
)
from simbridge.shm.cli import app

runner = CliRunner()


def make_orphan(name: str) -> int:
    """A block whose owner process was killed: the stale segment a crash leaves behind."""
    code = (
        "import sys, numpy as np\n"
        "from simbridge.shm import Block\n"
        f"b = Block.create({name!r}, (2, 2), np.float32)\n"
        "b.publish(np.ones((2, 2), np.float32))\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # structlog's default writes log lines to stdout before ours
        if line.strip() == "ready":
            break
    else:
        raise AssertionError("the owner process did not start")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    return proc.pid


def test_list_and_info_describe_a_live_block(block_name: str) -> None:
    with Block.create(block_name, (3, 4), np.int16) as writer:
        writer.publish(np.zeros((3, 4), np.int16), iteration=9)
        info = block_info(block_name)
        assert info is not None
        assert info.owner_pid == os.getpid() and info.alive and not info.stale
        assert info.dtype == "int16" and info.shape == (3, 4) and info.iteration == 9
        assert info.state == "open" and info.last_publish is not None
        assert block_name in [i.name for i in list_blocks()]


def test_stale_blocks_are_detected_cleaned_and_replaced(block_name: str) -> None:
    pid = make_orphan(block_name)
    info = block_info(block_name)
    assert info is not None and info.owner_pid == pid and not info.alive and info.stale
    with Block.open(block_name, timeout=1) as reader:  # the last good data is still readable
        assert reader.read(timeout=1).array.sum() == 4
    removed = cleanup_stale()
    assert block_name in [r.name for r in removed]
    assert block_info(block_name) is None
    make_orphan(block_name)
    with Block.create(block_name, 1, np.float64) as again:  # a restarted writer replaces it
        assert again.writer_pid == os.getpid()
    make_orphan(block_name)
    with pytest.raises(BlockExists, match="stale"):
        Block.create(block_name, 1, np.float64, replace_stale=False)


def test_cleanup_leaves_live_blocks_alone(block_name: str) -> None:
    with Block.create(block_name, 1, np.float32):
        assert block_name not in [r.name for r in cleanup_stale()]
        assert block_info(block_name) is not None


def test_remove_refuses_live_blocks_unless_forced(block_name: str) -> None:
    with pytest.raises(BlockNotFound):
        remove(block_name)
    writer = Block.create(block_name, 1, np.float32)
    with pytest.raises(BlockExists, match="live pid"):
        remove(block_name)
    remove(block_name, force=True)
    assert block_info(block_name) is None
    writer.close()  # must not fail although its name is gone


def test_cli_ls_inspect_rm_clean(block_name: str) -> None:
    with Block.create(block_name, (2, 2), np.float32) as writer:
        writer.publish(np.array([[1, 2], [np.nan, 4]], np.float32))
        result = runner.invoke(app, ["ls", "--json"])
        assert result.exit_code == 0, result.output
        listed = {b["name"]: b for b in json.loads(result.output)}
        assert listed[block_name]["alive"] and listed[block_name]["shape"] == [2, 2]
        result = runner.invoke(app, ["ls"], env={"COLUMNS": "250"})
        assert result.exit_code == 0 and block_name[:10] in result.output
        result = runner.invoke(app, ["inspect", block_name])
        assert result.exit_code == 0, result.output
        assert "NaN/Inf count" in result.output and "1 / 4 / 2.33333" in result.output
        assert runner.invoke(app, ["rm", block_name]).exit_code == 1
    result = runner.invoke(app, ["inspect", block_name])
    assert result.exit_code == 1 and "did not become available" in result.output
    make_orphan(block_name)
    result = runner.invoke(app, ["clean"])
    assert result.exit_code == 0 and f"removed {block_name}" in result.output
    assert runner.invoke(app, ["rm", "../etc"]).exit_code == 1


def test_cli_diff(block_name: str, tmp_path: Path) -> None:
    with (
        Block.create(block_name, 2, np.float32, record=tmp_path) as writer,
        Block.open(block_name, timeout=1, record=tmp_path) as reader,
    ):
        writer.publish(np.ones(2, np.float32))
        reader.read(timeout=1)
    result = runner.invoke(app, ["diff", str(tmp_path)])
    assert result.exit_code == 0 and "1 transfer(s) matched, 0 mismatched" in result.output
    assert runner.invoke(app, ["diff", str(tmp_path / "missing")]).exit_code == 2


def test_owner_unlinks_at_interpreter_exit_without_close(block_name: str) -> None:
    code = (
        "import numpy as np\n"
        "from simbridge.shm import Block\n"
        f"b = Block.create({block_name!r}, 4, np.float32)\n"
        "b.publish(np.ones(4, np.float32))\n"
        "import sys; sys.exit(0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True)
    assert block_info(block_name) is None


def test_a_forked_child_neither_publishes_nor_unlinks_the_parents_block(block_name: str) -> None:
    with Block.create(block_name, 2, np.float32) as writer:
        writer.publish(np.ones(2, np.float32))
        code = (
            "import os, sys, numpy as np\n"
            "from simbridge.shm import Block\n"
            f"b = Block.create({block_name!r} + '-own', 2, np.float32)\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    try:\n"
            "        b.publish(np.zeros(2, np.float32))\n"
            "    except PermissionError:\n"
            "        sys.exit(7)\n"  # exits through atexit, as a careless child would
            "    sys.exit(0)\n"
            "_, status = os.waitpid(pid, 0)\n"
            "assert os.waitstatus_to_exitcode(status) == 7, status\n"
            f"assert os.path.exists('/dev/shm/simbridge.{block_name}-own'), 'the child unlinked it'\n"
            "b.publish(np.zeros(2, np.float32))\n"
            "print('parent ok')\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
        )
        assert "parent ok" in result.stdout, result.stderr[-2000:]
        assert block_info(f"{block_name}-own") is None  # the parent unlinked it at its own exit
