"""The jobs commands: serve, submit, status, retry, cancel (mounted top-level by simbridge.cli).

They print (Rich); the library under them only logs. Errors from the library become one red line
and exit code 1; bad configuration names the key and the fix.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from simbridge.config import CONFIG_ENV, Settings, load_settings
from simbridge.errors import ConfigError, SimbridgeError
from simbridge.jobs import control
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.inbox import take_case
from simbridge.jobs.store import Store, default_actor
from simbridge.logs import enable_debug

app = typer.Typer(
    name="jobs",
    help="The durable case/beam pipeline.",
    no_args_is_help=True,
    add_completion=False,
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (else $SIMBRIDGE_CONFIG or ./simbridge.yaml)."),
]


def _settings(config: Path | None) -> Settings:
    if config is not None:
        os.environ[CONFIG_ENV] = str(config)
    return load_settings()


def _store(settings: Settings, role: str) -> Store:
    return Store(url=settings.jobs.db_url(), actor=default_actor(role))


def _fail(exc: Exception) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)  # one line, never wrapped
    return typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def serve(
    config: ConfigOpt = None,
    until_idle: Annotated[
        bool, typer.Option("--until-idle", help="Exit once every case taken so far has ended.")
    ] = False,
    max_s: Annotated[
        float | None, typer.Option("--max-seconds", help="Exit after this long in any case.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Watch the inbox and run every beam through the pipeline (resumes after any crash)."""
    if verbose:  # logging itself is configured once, by the `simbridge` entry point
        enable_debug()
    try:
        settings = _settings(config)
        with Dispatcher(settings=settings) as dispatcher:
            dispatcher.install_signal_handlers()
            err.print(
                f"serving: inbox {settings.jobs.inbox.resolve()}, "
                f"results {settings.jobs.results.resolve()}, db {dispatcher.store._safe_url()}",
                highlight=False,
            )
            idle = dispatcher.run(until_idle=until_idle, max_s=max_s)
            views = control.snapshot(dispatcher.store)
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    if until_idle:
        _print_cases(views)
        if not idle:
            raise typer.Exit(3)


def submit(
    case_dir: Annotated[Path, typer.Argument(help="A case folder: one sub-folder per beam.")],
    config: ConfigOpt = None,
) -> None:
    """Take a case folder now (no inbox wait); a running `serve` picks its beams up."""
    try:
        settings = _settings(config)
        with _store(settings, "submit") as store:
            taken = take_case(
                store,
                case_dir.resolve(),
                work_root=settings.jobs.work_root,
                ready_marker=settings.jobs.ready_marker,
            )
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    out.print(f"case {taken.key}: {len(taken.beams)} beam(s) {', '.join(taken.beams)}")


def status(
    case: Annotated[str | None, typer.Argument(help="A case key or folder name.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show cases (state derived from their beams) or the beams of one case."""
    try:
        settings = _settings(config)
        with _store(settings, "status") as store:
            views = control.snapshot(store, case)
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    if as_json:
        sys.stdout.write(json.dumps([v.as_dict() for v in views], indent=2) + "\n")
        return
    if case is None:
        _print_cases(views)
    else:
        _print_beams(views[0])


def retry(
    target: Annotated[str, typer.Argument(help="CASE or CASE/BEAM.")],
    failed: Annotated[
        bool, typer.Option("--failed/--no-failed", help="Rerun FAILED beams from their step.")
    ] = True,
    cancelled: Annotated[
        bool, typer.Option("--cancelled", help="Also restart CANCELLED beams from the start.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Put failed (and optionally cancelled) beams back in line; only those run again."""
    try:
        settings = _settings(config)
        with _store(settings, "retry") as store:
            keys = control.retry(store, target, failed=failed, cancelled=cancelled)
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    out.print(f"retrying {len(keys)} beam(s): {', '.join(keys) or '-'}")


def cancel(
    target: Annotated[str, typer.Argument(help="CASE or CASE/BEAM.")],
    config: ConfigOpt = None,
) -> None:
    """Cancel unfinished beams and kill their running processes (the whole process group)."""
    try:
        settings = _settings(config)
        with _store(settings, "cancel") as store:
            keys = control.cancel(
                store,
                target,
                work_root=settings.jobs.work_root,
                grace_s=settings.jobs.timeouts.kill_grace_s,
            )
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    out.print(f"cancelled {len(keys)} beam(s): {', '.join(keys) or '-'}")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _print_cases(views: list[control.CaseView]) -> None:
    table = Table(title="cases", title_justify="left")
    for col in ("case", "state", "beams", "taken"):
        table.add_column(col)
    for v in views:
        counts: dict[str, int] = {}
        for b in v.beams:
            counts[b.state] = counts.get(b.state, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
        table.add_row(v.case, v.state, summary, taken)
    out.print(table)


def _print_beams(view: control.CaseView) -> None:
    table = Table(title=f"case {view.case}: {view.state}", title_justify="left")
    for col in ("beam", "state", "gpu", "job", "tries", "elapsed", "last error"):
        table.add_column(col)
    for b in view.beams:
        error = (b.last_error or "").splitlines()[0][:80] if b.last_error else ""
        table.add_row(b.beam, b.state, b.gpu or "-", b.job_id or "-", str(b.tries), _age(b.elapsed_s), error)
    out.print(table)


COMMANDS: dict[str, Callable[..., None]] = {
    "serve": serve,
    "submit": submit,
    "status": status,
    "retry": retry,
    "cancel": cancel,
}
for _name, _fn in COMMANDS.items():
    app.command(_name)(_fn)


def register(root: typer.Typer) -> None:
    """Mount the jobs commands top-level on the ``simbridge`` app."""
    for name, fn in COMMANDS.items():
        root.command(name)(fn)
