"""The inversion's picture: true vs estimated emissions with the ensemble's spread, and the receptor fits.

matplotlib (the ``demos`` extra) is imported here only, with the Agg backend, so the rest of the demo
runs without it and plotting never needs a display.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from simbridge.demos.eki.driver import EkiResult
from simbridge.demos.eki.errors import EkiError
from simbridge.demos.eki.protocol import N_PARAMS, N_STEPS, STEP_SECONDS


class PlotUnavailable(EkiError, ImportError):
    """Raised when matplotlib is not installed; install the ``demos`` extra."""


def busiest_receptors(result: EkiResult, count: int = 4) -> list[int]:
    """The receptors that saw the most of the plume: their series show the fit best."""
    return [int(i) for i in np.argsort(result.clean.sum(axis=1))[::-1][:count]]


def plot_result(result: EkiResult, path: Path) -> Path:
    """Draw the result into a PNG at ``path`` and return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'simbridge[demos]' (or pip install matplotlib)"
        ) from exc

    params = result.truth.shape[0]
    hours_per_param = N_STEPS * STEP_SECONDS / 3600.0 / N_PARAMS
    edges = np.arange(params + 1) * hours_per_param
    lo, hi = np.percentile(result.ensemble, [5, 95], axis=1)
    prior_lo, prior_hi = np.percentile(result.prior, [5, 95], axis=1)

    fig = plt.figure(figsize=(12, 9), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=[1.3, 1, 1])
    ax = fig.add_subplot(grid[0, :])
    ax.fill_between(
        edges,
        np.append(prior_lo, prior_lo[-1]),
        np.append(prior_hi, prior_hi[-1]),
        step="post",
        color="0.85",
        label="prior 5-95 %",
    )
    ax.fill_between(
        edges,
        np.append(lo, lo[-1]),
        np.append(hi, hi[-1]),
        step="post",
        color="tab:blue",
        alpha=0.3,
        label="ensemble 5-95 %",
    )
    ax.stairs(result.truth, edges, color="black", linewidth=2, label="true")
    ax.stairs(result.estimate, edges, color="tab:blue", linewidth=2, linestyle="--", label="estimate (mean)")
    last = result.history[-1] if result.history else None
    ax.set_title(
        f"Emission rate: relative error {result.relative_error:.1%} "
        f"(prior {result.prior_relative_error:.1%}), {result.ensemble.shape[1]} members, "
        f"{len(result.history)} forward runs" + (f", misfit {last.misfit:.2f}" if last else "")
    )
    ax.set_xlabel("hours since release start")
    ax.set_ylabel("g/s")
    ax.legend(loc="upper right")

    hours = (np.arange(result.clean.shape[1]) + 1) * STEP_SECONDS / 3600.0
    for n, r in enumerate(busiest_receptors(result)):
        sub = fig.add_subplot(grid[1 + n // 2, n % 2])
        sub.plot(hours, result.observed[r], ".", color="0.5", markersize=3, label="observed")
        sub.plot(hours, result.clean[r], color="black", linewidth=1, label="noise-free")
        sub.plot(hours, result.fitted[r], color="tab:orange", linewidth=1.2, label="fitted (ensemble mean)")
        sub.set_title(f"receptor {r}")
        sub.set_xlabel("hours")
        sub.set_ylabel("ug/m3")
        if n == 0:
            sub.legend(loc="upper right", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
