"""Builds the C peer (tests/c/shm_peer.c) once per session with the machine's real compiler."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from tests.support import REPO, require_cc


@pytest.fixture(scope="session")
def c_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = require_cc()
    out = tmp_path_factory.mktemp("cpeer") / "shm_peer"
    subprocess.run(
        [
            cc,
            "-std=c11",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(REPO / "include"),
            str(REPO / "tests" / "c" / "shm_peer.c"),
            "-o",
            str(out),
            "-pthread",
        ],
        check=True,
        timeout=120,
    )
    return out
