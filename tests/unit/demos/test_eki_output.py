"""What the demo leaves behind: the breakdown table, the saved results and the plot, from a known result."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from tests.support import require

from simbridge.demos.eki.cli import breakdown_table
from simbridge.demos.eki.driver import EkiResult, IterationStats
from simbridge.demos.eki.eki import true_emissions


def known_result() -> EkiResult:
    rng = np.random.default_rng(0)
    truth = true_emissions(24)
    clean = np.zeros((16, 216))
    clean[5, 40:60] = 100.0  # receptor 5 saw the plume most
    clean[2, 100:105] = 20.0
    history = [
        IterationStats(
            iteration=k,
            members=30,
            eki_s=0.01 * (k < 3),
            wait_s=0.3,
            forward_s=0.29,
            python_publish_s=0.0001,
            python_read_s=0.0004,
            model_read_s=0.0001,
            model_publish_s=0.0004,
            total_s=0.32,
            misfit=40.0 / k**3,
            spread=10.0 / k,
        )
        for k in (1, 2, 3)
    ]
    return EkiResult(
        truth=truth,
        prior=rng.lognormal(np.log(15.0), 0.8, (24, 30)),
        ensemble=truth[:, None] * rng.normal(1.0, 0.02, (24, 30)),
        clean=clean,
        observed=clean + rng.normal(0, 1, clean.shape),
        sigma=np.ones_like(clean),
        fitted=clean,
        history=history,
        stopped="ran the 2 iterations asked for",
        log_path=Path("/tmp/forward_model.log"),
        model_status="exit status 0 (OK)",
    )


def test_breakdown_lists_every_iteration_and_a_mean(tmp_path: Path) -> None:
    console = Console(width=100, record=True)
    console.print(breakdown_table(known_result()))
    text = console.export_text()
    assert "30 members" in text
    rows = [line for line in text.splitlines() if line.strip().startswith(("│", "┃"))]
    assert [r.split("│")[1].strip() for r in rows if "│" in r] == ["1", "2", "3", "mean"]
    assert "0.31" in text  # 1 ms of communication in 0.32 s is 0.31 %
    assert "40.000" in text and "1.481" in text  # the misfits of iterations 1 and 3


def test_save_writes_arrays_and_history(tmp_path: Path) -> None:
    result = known_result()
    summary = json.loads(result.save(tmp_path).read_text())
    assert summary["relative_error"] == result.relative_error < 0.05
    assert [it["iteration"] for it in summary["iterations"]] == [1, 2, 3]
    assert summary["iterations"][0]["communication_s"] == pytest.approx(0.001)
    with np.load(tmp_path / "result.npz") as saved:
        np.testing.assert_array_equal(saved["truth"], result.truth)
        assert saved["ensemble"].shape == (24, 30)


def test_plot_draws_a_png_of_the_busiest_receptors(tmp_path: Path) -> None:
    require(importlib.util.find_spec("matplotlib") is not None, "matplotlib (pip install 'simbridge[demos]')")
    from simbridge.demos.eki.plot import busiest_receptors, plot_result

    result = known_result()
    assert busiest_receptors(result)[:2] == [5, 2]
    png = plot_result(result, tmp_path / "sub" / "eki.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000  # four panels and a band, not an empty canvas
