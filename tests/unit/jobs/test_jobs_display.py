"""What a person sees: the dashboard shows every case and beam and fits 80 columns with every
column's content, a signal death reads as one, durations are formatted by one helper, and the
error line says why."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from simbridge.jobs.control import BeamView, CaseView, beam_view
from simbridge.jobs.store import Store
from simbridge.processes import elapsed_text, end_text, last_line, log_tail
from simbridge.tui.dashboard import render


def _beam(name: str, state: str, **kw: object) -> BeamView:
    base: dict[str, object] = {
        "case": "c1",
        "beam": name,
        "name": name,
        "state": state,
        "gpu": None,
        "job_id": None,
        "tries": 0,
        "elapsed_s": None,
        "exit_code": None,
        "last_error": None,
        "progress": 0.0,
    }
    base.update(kw)
    return BeamView(**base)  # type: ignore[arg-type]


def _text(width: int, views: list[CaseView]) -> str:
    console = Console(record=True, width=width, color_system=None)
    console.print(render(views))
    return console.export_text()


VIEWS = [
    CaseView(
        case="case-2026-11-30-patient-0042-with-a-long-name",
        name="x",
        state="ACTIVE",
        created_at=0.0,
        beams=(
            _beam("beam_01_gantry_90_couch_270", "POSTPROCESSING", gpu="0,1", job_id="4194303",
                  elapsed_s=4000.0, tries=2, progress=0.9),
            _beam("beam_02", "FAILED", tries=3, elapsed_s=75.0,
                  last_error="running exited 75: CUDA out of memory\nstderr tail:\nCUDA out of memory"),
        ),
    )
]  # fmt: skip


@pytest.mark.parametrize("width", [80, 100, 160])
def test_dashboard_fits_the_width_with_gpu_job_time_and_tries(width: int) -> None:
    text = _text(width, VIEWS)
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines)
    header = next(line for line in lines if "state" in line)
    for column in ("beam", "state", "gpu", "job", "time", "tries", "why"):
        assert column in header.split(), (column, header)
    row = next(line for line in lines if "beam_01" in line or "beam_0…" in line).split()
    assert row[1:6] == ["POSTPROCESSING", "0,1", "4194303", "1h06m", "2"], row
    row = next(line for line in lines if "beam_02" in line).split()
    assert row[1:6] == ["FAILED", "-", "-", "75.0s", "3"], row
    assert "running exited 75" in text
    if width >= 120:
        assert "CUDA out of memory" in text  # the reason, not just "exited 75"
    case_row = next(line for line in lines if line.strip().startswith("case-"))
    assert "ACTIVE" in case_row


def test_elapsed_time_has_one_format() -> None:
    assert [elapsed_text(s) for s in (None, -1.0, 4.25, 119.9, 187.0, 7500.0)] == [
        "-", "0.0s", "4.2s", "119.9s", "3m07s", "2h05m",
    ]  # fmt: skip


def test_a_signal_death_is_never_an_exit_code() -> None:
    assert end_text(-9) == "killed by SIGKILL"
    assert end_text(-15) == "killed by SIGTERM"
    assert end_text(137) == "exited 137"
    assert end_text(-200) == "killed by signal 200"
    assert end_text(None) == "ended without an exit code"


def test_log_tail_and_its_last_line(tmp_path: Path) -> None:
    log = tmp_path / "x.err"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "\n\n")
    assert log_tail(log, 2) == "line 28\nline 29"
    assert last_line(log_tail(log)) == "line 29"
    assert last_line("x" * 300, 10) == "x" * 9 + "…"
    assert log_tail(tmp_path / "missing") == "" and last_line("") == ""


def test_status_view_names_the_signal_and_keeps_exit_codes(tmp_path: Path) -> None:
    with Store(url=f"sqlite:///{tmp_path / 'jobs.db'}") as store:
        store.add_case(
            key="c", name="c", source="s", root="r",
            beams_=[("b1", "b1", str(tmp_path)), ("b2", "b2", str(tmp_path))],
        )  # fmt: skip
        case = store.case("c")
        killed, exited = store.beams()
        store.update_beam(killed.id, killed.state, exit_code=-9)
        store.update_beam(exited.id, exited.state, exit_code=137)
        killed, exited = store.beams()
        view = beam_view(case, killed, now=0.0)
        assert view.signal == "SIGKILL" and view.exit_code is None
        view = beam_view(case, exited, now=0.0)
        assert view.signal is None and view.exit_code == 137


def test_dashboard_shows_each_beam() -> None:
    views = [
        CaseView(
            case="c1",
            name="c1",
            state="ACTIVE",
            created_at=0.0,
            beams=(
                _beam("beam_1", "RUNNING", gpu="3", job_id="4242", elapsed_s=75.0, progress=0.5),
                _beam("beam_2", "FAILED", last_error="running exited 3; stderr tail:\nboom"),
            ),
        ),
        CaseView(case="empty", name="empty", state="EMPTY", created_at=0.0, beams=()),
    ]
    console = Console(record=True, width=160)
    console.print(render(views))
    text = console.export_text()
    assert "2 case(s), 1 FAILED, 1 RUNNING" in text
    row = next(line for line in text.splitlines() if "beam_1" in line)
    assert "RUNNING" in row and "3" in row and "4242" in row and "75.0s" in row
    row = next(line for line in text.splitlines() if "beam_2" in line)
    assert "FAILED" in row and "running exited 3" in row and "boom" not in row
    assert "no beam folders" in text
