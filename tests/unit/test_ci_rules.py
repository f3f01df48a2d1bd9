"""The rules tests/conftest.py and pyproject's pytest options enforce, each run on a tiny test file by a
real pytest in a subprocess: a skipped integration test fails under CI=true, a branch that did not run
is listed, an assertion inside a thread fails its test."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tests.support import REPO


def _pytest_options() -> str:
    text = (REPO / "pyproject.toml").read_text()
    match = re.search(r"^\[tool\.pytest\.ini_options\]\n(?:(?!^\[).*\n)*", text, re.MULTILINE)
    assert match is not None
    return match.group(0)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with this repository's conftest.py and pytest options, and nothing else."""
    (tmp_path / "pyproject.toml").write_text(_pytest_options())
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "conftest.py").write_text((REPO / "tests" / "conftest.py").read_text())
    return tmp_path


def run_pytest(folder: Path, files: dict[str, str], *, ci: bool) -> subprocess.CompletedProcess[str]:
    for name, body in files.items():
        path = folder / "tests" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(body))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


SKIPS = {
    "integration/test_skips.py": """
        import pytest

        @pytest.fixture
        def daemon():
            pytest.skip("no daemon here")

        @pytest.mark.integration
        def test_skips_itself():
            pytest.skip("slurmctld is missing")

        @pytest.mark.integration
        def test_skipped_by_a_fixture(daemon):
            pass

        @pytest.mark.integration
        @pytest.mark.skip(reason="by marker")
        def test_skipped_by_marker():
            pass

        @pytest.mark.integration
        @pytest.mark.xfail(reason="known", strict=True)
        def test_expected_failure():
            raise AssertionError

        def test_unit_skip():
            pytest.skip("fine outside integration")
        """,
}
MODULE_SKIP = {
    "integration/test_module_skip.py": """
        import pytest
        pytest.importorskip("a_module_that_is_not_installed")

        def test_never_collected():
            pass
        """,
}


def test_under_ci_a_skipped_integration_test_fails(project: Path) -> None:
    result = run_pytest(project, SKIPS, ci=True)
    out = result.stdout
    assert result.returncode == 1, out
    # A skip in setup (fixture, marker) reports as an error, one in the test as a failure.
    assert "1 failed" in out and "2 errors" in out and "1 skipped" in out and "1 xfailed" in out, out
    assert "CI=true: integration test skipped" in out and "slurmctld is missing" in out


def test_under_ci_a_skipped_integration_module_fails(project: Path) -> None:
    result = run_pytest(project, MODULE_SKIP, ci=True)
    assert result.returncode != 0, result.stdout
    assert "CI=true: integration module skipped" in result.stdout


def test_outside_ci_skips_stay_skips(project: Path) -> None:
    result = run_pytest(project, {**SKIPS, **MODULE_SKIP}, ci=False)
    assert result.returncode == 0, result.stdout
    assert "5 skipped" in result.stdout and "1 xfailed" in result.stdout


def test_an_assertion_inside_a_thread_fails_the_test(project: Path) -> None:
    body = """
        import threading

        def test_thread():
            def work():
                assert 1 == 2, "wrong inside the thread"
            thread = threading.Thread(target=work)
            thread.start()
            thread.join(timeout=30)
        """
    result = run_pytest(project, {"test_thread.py": body}, ci=False)
    assert result.returncode == 1, result.stdout
    assert "1 failed" in result.stdout and "wrong inside the thread" in result.stdout


def test_a_branch_not_run_is_listed_in_the_summary(project: Path) -> None:
    body = """
        def test_fast_path(not_run_here):
            not_run_here("the folded CRC path: this CPU lacks VPCLMULQDQ")
        """
    result = run_pytest(project, {"test_branch.py": body}, ci=False)
    assert result.returncode == 0, result.stdout
    assert (
        "not run here: tests/test_branch.py::test_fast_path: the folded CRC path: this CPU lacks VPCLMULQDQ"
        in result.stdout
    )
