"""What every ``simbridge`` entry point does around a command: read the configuration a command's
``-c`` names, configure logging once from ``log.level``/``log.format``, and turn an error escaping
the command into one line ``simbridge: error: ...`` and an exit code (a traceback only with ``-v``).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from simbridge.config import load_settings
from simbridge.errors import ConfigError, SimbridgeError
from simbridge.logs import configure_logging

# Exit codes: 1 a command failed, 2 bad configuration or usage (as Click's own usage errors).
EXIT_FAILED = 1
EXIT_CONFIG = 2
_CONFIG_KEY = "simbridge.config"
_VERBOSE_KEY = "simbridge.verbose"
_HELP_KEY = "simbridge.help"


class _Root(TyperGroup):
    """The top-level group: sees a sub-command's ``-c`` before logging is configured, and turns
    errors escaping any command into one line."""

    # Typed loosely: Typer vendors its own Click, whose classes are not public API.
    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        # The root callback runs before the sub-command parses its options, but must read the
        # same file the command will: a `-c good.yaml` replaces a bad ./simbridge.yaml for both.
        ctx.meta[_CONFIG_KEY] = _peek_config(ctx, command, name, rest)
        # Help is answered whatever the configuration holds.
        ctx.meta[_HELP_KEY] = any(arg in ("--help", "-h") for arg in rest)
        return name, command, rest

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            _report(ctx, exc)
            raise typer.Exit(EXIT_CONFIG) from exc
        except (SimbridgeError, OSError) as exc:
            _report(ctx, exc)
            raise typer.Exit(EXIT_FAILED) from exc
        except (typer.Exit, typer.Abort, TyperException):
            raise  # Click's own exits and usage errors (exit 2 with the usage line)
        except Exception as exc:  # a bug: still one line, the traceback with -v
            _report(ctx, exc, bug=True)
            raise typer.Exit(EXIT_FAILED) from exc


def _peek_config(ctx: Any, command: Any, name: str | None, rest: list[str]) -> Any:
    if command is None or name is None:
        return None
    if not any(getattr(p, "name", None) == "config" for p in getattr(command, "params", ())):
        return None
    try:
        # resilient_parsing: no callbacks, no prompts; the real parse (and its errors) comes later.
        sub = command.make_context(name, list(rest), parent=ctx, resilient_parsing=True)
    except Exception:  # a peek only: the command's own parse reports bad usage
        return None
    return sub.params.get("config")


def _report(ctx: Any, exc: BaseException, *, bug: bool = False) -> None:
    if ctx.meta.get(_VERBOSE_KEY):
        traceback.print_exception(exc, file=sys.stderr)
    lines = str(exc).splitlines() or [""]
    if bug:
        hint = "" if ctx.meta.get(_VERBOSE_KEY) else "; run with -v for the traceback"
        lines = [f"unexpected {type(exc).__name__}: {lines[0]} (a bug in simbridge{hint}, please report it)"]
    # A configuration error has one line per bad key; anything else is cut to its first line.
    for line in lines if isinstance(exc, ConfigError) else lines[:1]:
        sys.stderr.write(f"simbridge: error: {line}\n")


def entry_app(*, help: str) -> typer.Typer:
    """A top-level ``simbridge`` app: mount commands on it; it does the rest."""
    app = typer.Typer(name="simbridge", cls=_Root, help=help, no_args_is_help=True, add_completion=False)
    app.callback(help=help)(_main_options)
    return app


def _main_options(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at debug level.")] = False,
) -> None:
    ctx.meta[_VERBOSE_KEY] = verbose
    if ctx.invoked_subcommand is None or ctx.resilient_parsing or ctx.meta.get(_HELP_KEY):
        return
    config: Path | None = ctx.meta.get(_CONFIG_KEY)
    # One logging setup for every sub-command: stderr, level and format from config.
    configure_logging(load_settings(config=config).log, verbose=verbose)
