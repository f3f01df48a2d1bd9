"""The Rich dashboard renders every case and beam with state, GPU, job id, progress and error."""

from __future__ import annotations

from rich.console import Console

from simbridge.jobs.control import BeamView, CaseView
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
