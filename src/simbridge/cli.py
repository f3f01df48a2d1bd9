"""The ``simbridge`` command: mounts each package's own sub-commands; nothing imports this module."""

from __future__ import annotations

from typing import Annotated

import typer

from simbridge.config import configure_logging, load_settings
from simbridge.demos.eki.cli import eki_command
from simbridge.gpus.cli import app as gpus_app
from simbridge.jobs.cli import register as register_jobs
from simbridge.shm.cli import app as shm_app
from simbridge.shm.cli import demo_app
from simbridge.tui.cli import dashboard

app = typer.Typer(
    name="simbridge",
    help="Drive GPU simulations and models from Python, on one machine and across a cluster.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main_options(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at debug level.")] = False,
) -> None:
    """Drive GPU simulations and models from Python, on one machine and across a cluster."""
    # One logging setup for every sub-command: structlog to stderr, level and format from config.
    configure_logging(load_settings().log, verbose=verbose)


app.add_typer(shm_app, name="shm", help="Shared-memory blocks: list, inspect, remove, clean, diff.")
demo_app.command("eki")(eki_command)
app.add_typer(demo_app, name="demo", help="Small runnable demonstrations.")
app.add_typer(gpus_app, name="gpus", help="GPUs or slots: memory, utilisation, holder pid.")
register_jobs(app)  # serve, submit, status, retry, cancel
app.command("dashboard")(dashboard)


def main() -> None:  # pragma: no cover - console entry point
    app()
