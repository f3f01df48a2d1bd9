"""The ``simbridge`` command: mounts each package's own sub-commands; nothing imports this module."""

from __future__ import annotations

import typer

from simbridge.gpus.cli import app as gpus_app
from simbridge.shm.cli import app as shm_app
from simbridge.shm.cli import demo_app

app = typer.Typer(
    name="simbridge",
    help="Drive GPU simulations and models from Python, on one machine and across a cluster.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(shm_app, name="shm", help="Shared-memory blocks: list, inspect, remove, clean, diff.")
app.add_typer(demo_app, name="demo", help="Small runnable demonstrations.")
app.add_typer(gpus_app, name="gpus", help="GPUs or slots: memory, utilisation, holder pid.")


def main() -> None:  # pragma: no cover - console entry point
    app()
