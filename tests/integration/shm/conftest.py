"""Builds the C peer (tests/c/shm_peer.c) once per session with the machine's real compilers.

The same source is built as C11 and as C++17: a CUDA model includes shm.h from C++ host code.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tests.support import REPO, require, require_cc

WARNINGS = ("-O2", "-Wall", "-Wextra", "-Werror")


def build_peer(compiler: str, language: list[str], out: Path) -> Path:
    source = REPO / "tests" / "c" / "shm_peer.c"
    include = ["-I", str(REPO / "include")]
    command = [compiler, *language, *WARNINGS, *include, str(source), "-o", str(out), "-pthread"]
    subprocess.run(command, check=True, timeout=120)
    return out


@pytest.fixture(scope="session")
def c_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cpeer") / "shm_peer"
    return build_peer(require_cc(), ["-std=c11"], out)


@pytest.fixture(scope="session")
def cpp_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cxx = shutil.which("c++") or shutil.which("g++")
    require(cxx is not None, "a C++ compiler (c++)")
    assert cxx is not None
    out = tmp_path_factory.mktemp("cpppeer") / "shm_peer_cpp"
    return build_peer(cxx, ["-x", "c++", "-std=c++17"], out)
