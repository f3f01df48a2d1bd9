"""`simbridge demo orderbook` refuses bad options in one line, before it starts anything."""

from __future__ import annotations

from pathlib import Path

import typer
from typer.testing import CliRunner

from simbridge.demos.orderbook.cli import live_table, orderbook_command
from simbridge.demos.orderbook.options import LiveStats

app = typer.Typer()
app.command()(orderbook_command)
runner = CliRunner()


def test_a_cpu_this_process_may_not_use_is_one_line(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--cpus", "4095,0,0", "--output", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert "CPU 4095 is not one this process may run on" in result.output
    assert not (tmp_path / "run").exists()  # refused before anything was made


def test_cpus_needs_three_entries() -> None:
    result = runner.invoke(app, ["--cpus", "0,1"])
    assert result.exit_code == 2


def test_the_live_view_renders_before_any_number_arrived() -> None:
    table = live_table(LiveStats())
    assert table.row_count == 8
