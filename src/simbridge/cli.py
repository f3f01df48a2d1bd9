"""The ``simbridge`` command: mounts each package's own sub-commands; nothing imports this module.

Configuration, logging and the one-line errors around every command live in :mod:`simbridge.entry`.
"""

from __future__ import annotations

from simbridge.demos.eki.cli import eki_command
from simbridge.demos.orderbook.cli import orderbook_command
from simbridge.entry import entry_app
from simbridge.gpus.cli import app as gpus_app
from simbridge.jobs.cli import register as register_jobs
from simbridge.jobs.clusters_cli import app as clusters_app
from simbridge.shm.cli import app as shm_app
from simbridge.shm.cli import demo_app
from simbridge.tui.cli import dashboard

app = entry_app(help="Drive GPU simulations and models from Python, on one machine and across a cluster.")
app.add_typer(
    shm_app, name="shm", help="Shared-memory blocks and rings: list, inspect, remove, clean, diff, record."
)
demo_app.command("eki")(eki_command)
demo_app.command("orderbook")(orderbook_command)
app.add_typer(demo_app, name="demo", help="Small runnable demonstrations.")
app.add_typer(gpus_app, name="gpus", help="GPUs or slots: memory, utilisation, holder pid.")
register_jobs(app)  # serve, submit, status, retry, cancel
app.add_typer(clusters_app, name="clusters", help="Remote hosts and Slurm clusters: list, check.")
app.command("dashboard")(dashboard)


def main() -> None:
    """The console script ``simbridge``."""
    app()
