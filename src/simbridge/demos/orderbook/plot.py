"""The run's picture: mid price and order-book imbalance over time, from the recorded Parquet files.

matplotlib (the ``demos`` extra) is imported here only, with the Agg backend: no display needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from simbridge.demos.orderbook.errors import OrderBookError


class PlotUnavailable(OrderBookError, ImportError):
    """Raised when matplotlib is not installed; install the ``demos`` extra."""


def plot_run(columns: dict[str, np.ndarray[Any, Any]], path: Path, *, price_scale: int = 8) -> Path:
    """Draw mid price and OBI against seconds since the first event into a PNG at ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable("plotting needs matplotlib: pip install 'simbridge[demos]'") from exc
    bid, ask = columns["best_bid"], columns["best_ask"]
    both = (bid > 0) & (ask > 0)
    ts = columns["exchange_ts_ns"][both]
    seconds = (ts - ts.min()) / 1e9 if ts.size else ts
    # Exact integers until here; a float only for drawing.
    mid = (bid[both] + ask[both]) / 2 / 10**price_scale
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, layout="constrained")
    top.plot(seconds, mid, linewidth=0.8, color="tab:blue")
    top.set_ylabel("mid price")
    top.ticklabel_format(axis="y", useOffset=False)
    top.set_title(f"Order book over the run: {int(both.sum())} events")
    bottom.plot(seconds, columns["obi"][both], linewidth=0.6, color="tab:orange")
    bottom.axhline(0, color="0.6", linewidth=0.5)
    bottom.set_ylim(-1.05, 1.05)
    bottom.set_ylabel("order-book imbalance")
    bottom.set_xlabel("seconds (exchange time)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
