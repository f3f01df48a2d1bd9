"""C peers of an installed simbridge find shm.h: the wheel ships it and get_include() points at it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tests.support import REPO
from typer.testing import CliRunner

from simbridge.shm import get_include
from simbridge.shm.cli import app

pytestmark = pytest.mark.integration


def test_get_include_and_the_cli_name_the_header_directory() -> None:
    include = get_include()
    assert (include / "simbridge" / "shm.h").read_bytes() == (REPO / "include/simbridge/shm.h").read_bytes()
    result = CliRunner().invoke(app, ["include"])
    assert result.exit_code == 0 and Path(result.output.strip()) == include


def test_the_wheel_ships_the_header_and_the_c_core(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", str(REPO), "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path)],
        check=True, timeout=600, capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("simbridge-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "simbridge/include/simbridge/shm.h" in names
    assert any(n.startswith("simbridge/shm/_core.") and n.endswith(".so") for n in names)
    shipped = zipfile.ZipFile(wheel).read("simbridge/include/simbridge/shm.h")
    assert shipped == (REPO / "include/simbridge/shm.h").read_bytes()
