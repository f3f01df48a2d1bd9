"""The Rich live dashboard: every case and beam with state, GPU, job id, elapsed time and error.

It only reads the jobs store (through simbridge.jobs.control); it never changes anything.
"""

from simbridge.tui.dashboard import render, run_dashboard

__all__ = ["render", "run_dashboard"]
