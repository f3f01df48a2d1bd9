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
from rich.text import Text

from simbridge.config import CONFIG_ENV, Settings, load_settings
from simbridge.errors import ConfigError, SimbridgeError
from simbridge.jobs import control
from simbridge.jobs.clusters import Clusters
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.errors import NotFoundError
from simbridge.jobs.intake import NOTE_PREFIX, InboxEntry, inbox_entries, take_case, tree_limits
from simbridge.jobs.store import Store, default_actor
from simbridge.logs import enable_debug
from simbridge.processes import elapsed_text

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


def _store(settings: Settings, role: str, *, migrate: bool = True) -> Store:
    # migrate=False: commands that only read or nudge rows never create the database or take
    # the write lock to migrate it; no schema there is "not initialised; run serve".
    return Store(url=settings.jobs.db_url(), actor=default_actor(role), migrate=migrate)


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
                limits=tree_limits(settings.jobs.case_limits),
            )
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    for note in taken.notes:
        err.print(Text(f"note: {note}"))
    out.print(f"case {taken.key}: {len(taken.beams)} beam(s) {', '.join(taken.beams)}")


def status(
    case: Annotated[str | None, typer.Argument(help="A case key or folder name.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Show cases (state derived from their beams) or the beams of one case.

    Also lists what the inbox holds that is not a case yet: REJECTED (moved to inbox/.rejected,
    with the reason), IGNORED (hidden names, plain files) and WAITING (not complete yet).
    """
    entries: list[InboxEntry] = []
    try:
        settings = _settings(config)
        inbox = settings.jobs.inbox
        with _store(settings, "status", migrate=False) as store:
            try:
                views = control.snapshot(store, case)
            except NotFoundError:
                # A name that never became a case: say why, if the inbox knows it.
                known = [e for e in _inbox_entries(settings, set()) if case in {e.name, e.name.strip()}]
                if not known:
                    raise
                views, entries = [], known
            else:
                if case is None:
                    entries = _inbox_entries(settings, {v.name for v in views})
            ids = {c.key: c.id for c in store.cases()} if views else {}
            notes = store.case_notes(NOTE_PREFIX) if views else {}
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    if not inbox.is_dir():
        err.print(
            Text(f"note: the inbox {inbox.resolve()} does not exist yet; `simbridge serve` creates it "
                 f"(or `mkdir -p {inbox}`)")
        )  # fmt: skip
    case_notes = {key: notes.get(case_id, []) for key, case_id in ids.items()}
    if as_json:
        docs = [dict(v.as_dict(), notes=case_notes.get(v.case, [])) for v in views]
        docs += [e.as_dict() for e in entries]
        sys.stdout.write(json.dumps(docs, indent=2) + "\n")
        return
    if case is None or not views:
        _print_cases(views, entries, case_notes)
    else:
        _print_beams(views[0], case_notes.get(views[0].case, []))


def _inbox_entries(settings: Settings, taken: set[str]) -> list[InboxEntry]:
    return inbox_entries(settings.jobs.inbox, taken=taken, ready_marker=settings.jobs.ready_marker)


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
        with _store(settings, "retry", migrate=False) as store:
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
        with (
            _store(settings, "cancel", migrate=False) as store,
            Clusters(settings=settings, store=store) as clusters,
        ):
            keys = control.cancel(
                store,
                target,
                work_root=settings.jobs.work_root,
                grace_s=settings.jobs.timeouts.kill_grace_s,
                clusters=clusters,
            )
    except SimbridgeError as exc:
        raise _fail(exc) from exc
    out.print(f"cancelled {len(keys)} beam(s): {', '.join(keys) or '-'}")


def _label(name: str) -> Text:
    """An outside name as plain text: never Rich markup, control characters escaped."""
    return Text(name if name.isprintable() else repr(name)[1:-1])


def _print_cases(
    views: list[control.CaseView],
    entries: list[InboxEntry] | None = None,
    notes: dict[str, list[str]] | None = None,
) -> None:
    table = Table(title="cases", title_justify="left")
    for col in ("case", "state", "beams", "taken"):
        table.add_column(col)
    for v in views:
        counts: dict[str, int] = {}
        for b in v.beams:
            counts[b.state] = counts.get(b.state, 0) + 1
        summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"
        ignored = len((notes or {}).get(v.case, []))
        if ignored:
            summary += f" ({ignored} ignored: `simbridge status {v.case}`)"
        taken = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at))
        # The folder name people gave; the key (used in paths and commands) when it differs.
        label = _label(v.name) if v.name == v.case else _label(v.name).append(f" ({v.case})", style="dim")
        table.add_row(label, v.state, summary, taken)
    for e in entries or []:
        table.add_row(_label(e.name), e.state, _label(e.reason), "-")
    out.print(table)


def _print_beams(view: control.CaseView, notes: list[str] | None = None) -> None:
    title = _label(f"case {view.name}: {view.state}")
    if view.name != view.case:
        title.append(f" (key {view.case})", style="dim")
    table = Table(title=title, title_justify="left")
    for col in ("beam", "state", "gpu", "job", "tries", "elapsed", "last error"):
        table.add_column(col)
    for b in view.beams:
        error = (b.last_error or "").splitlines()[0][:80] if b.last_error else ""
        label = _label(b.name) if b.name == b.beam else _label(b.name).append(f" ({b.beam})", style="dim")
        job = f"{b.job_id or '-'} {b.scheduler}" if b.scheduler else b.job_id or "-"
        row = (b.state, b.gpu or "-", job, str(b.tries), elapsed_text(b.elapsed_s))
        table.add_row(label, *row, _label(error))
    out.print(table)
    for note in notes or []:
        out.print(_label(f"note: {note}"))


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
