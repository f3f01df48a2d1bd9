"""The ``simbridge dashboard`` command (mounted by simbridge.cli)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from simbridge.config import CONFIG_ENV, load_settings
from simbridge.errors import SimbridgeError
from simbridge.jobs.store import Store, default_actor
from simbridge.tui.dashboard import run_dashboard


def dashboard(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    refresh: Annotated[float, typer.Option("--refresh", help="Seconds between updates.")] = 1.0,
    max_s: Annotated[float | None, typer.Option("--max-seconds", help="Stop after this long.")] = None,
) -> None:
    """Live view of every case and beam: state, GPU, job id, elapsed, progress, last error."""
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    try:
        settings = load_settings()
        with Store(url=settings.jobs.db_url(), actor=default_actor("dashboard"), migrate=False) as store:
            run_dashboard(store, refresh_s=refresh, once=once, max_s=max_s)
    except SimbridgeError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
