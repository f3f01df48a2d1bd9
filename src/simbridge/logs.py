"""Logging: every library module gets its logger here; only the command line chooses where lines go.

Library code emits key=value events (structlog) through the standard ``logging`` machinery and
installs nothing but a ``NullHandler``, so a program using simbridge sees no log line unless it
configures ``logging`` itself. :func:`configure_logging` is for the ``simbridge`` entry point alone.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from simbridge.config import LogSettings

ROOT = "simbridge"
# Attribute of a LogRecord carrying the event's key=value pairs, for the CLI's renderer.
_EVENT_ATTR = "simbridge_event"

# Without a handler anywhere in its hierarchy, `logging` would print warnings to stderr through
# its last-resort handler; a library must stay silent unless the application asks.
logging.getLogger(ROOT).addHandler(logging.NullHandler())


def _to_stdlib(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> Any:
    """Hand the event to ``logging``: a plain message for plain handlers, the pairs for ours."""
    exc_info = event_dict.pop("exc_info", None)
    stack_info = bool(event_dict.pop("stack_info", False))
    event = str(event_dict.get("event", ""))
    pairs = " ".join(f"{key}={value!r}" for key, value in event_dict.items() if key != "event")
    message = f"{event} {pairs}" if pairs else event
    return (message,), {"exc_info": exc_info, "stack_info": stack_info, "extra": {_EVENT_ATTR: event_dict}}


# filter_by_level first: an event below the logger's level costs one isEnabledFor call.
_PROCESSORS: list[Processor] = [
    structlog.stdlib.filter_by_level,
    structlog.stdlib.PositionalArgumentsFormatter(),
    structlog.contextvars.merge_contextvars,
    _to_stdlib,
]


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A structlog logger over ``logging.getLogger(name)``; independent of ``structlog.configure``."""
    return structlog.stdlib.BoundLogger(logging.getLogger(name), _PROCESSORS, {})


class _Stderr:
    """Whatever ``sys.stderr`` is at the time of writing (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


class _Formatter(logging.Formatter):
    """Renders a record as a console line or one JSON object, with the event's key=value pairs."""

    def __init__(self, fmt: Literal["console", "json"], *, colors: bool) -> None:
        super().__init__()
        self._json = fmt == "json"
        self._render: Any = (
            structlog.processors.JSONRenderer()
            if self._json
            else structlog.dev.ConsoleRenderer(
                colors=colors,
                # A traceback for a person: the frames, not every local variable of each.
                exception_formatter=structlog.dev.RichTracebackFormatter(
                    show_locals=False, color_system="truecolor" if colors else "auto"
                ),
            )
        )

    def format(self, record: logging.LogRecord) -> str:
        pairs = getattr(record, _EVENT_ATTR, None)
        event: EventDict = dict(pairs) if isinstance(pairs, dict) else {"event": record.getMessage()}
        event["timestamp"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat()
        event["level"] = record.levelname.lower()
        if not record.name.startswith(ROOT):
            event["logger"] = record.name
        if record.exc_info:
            event["exc_info"] = record.exc_info
            if self._json:
                event = structlog.processors.format_exc_info(None, "", event)
        return str(self._render(None, record.levelname.lower(), event))


class _CliHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler the command line installs (marked, so configuring twice replaces it)."""


def configure_logging(settings: LogSettings, *, verbose: bool = False) -> None:
    """Send log lines to stderr (stdout stays for results): simbridge's at ``log.level`` (debug with
    ``verbose``) in ``log.format``; other libraries' at warning and above.

    Called once by the command-line entry point, never by library code.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _CliHandler)]:
        root.removeHandler(handler)
    handler = _CliHandler(_Stderr())
    handler.setFormatter(_Formatter(settings.format, colors=sys.stderr.isatty()))
    root.addHandler(handler)
    # Other libraries (SQLAlchemy, alembic, watchdog) speak at warning and above only.
    if root.level == logging.NOTSET or root.level > logging.WARNING:
        root.setLevel(logging.WARNING)
    logging.getLogger(ROOT).setLevel(
        logging.DEBUG if verbose else logging.getLevelNamesMapping()[settings.level.upper()]
    )
    # Python warnings (a library's RuntimeWarning, e.g. watchdog re-adding a watch) become log
    # lines on the same handler, not free text on stderr.
    logging.captureWarnings(True)
    # SQLAlchemy's pool logs an error with a traceback when it cannot roll back a connection of a
    # database that just went away ("Exception during reset or similar"); the store reports that
    # fault itself, once per change (jobs.store_unavailable), so the pool's copy is noise (-v shows it).
    logging.getLogger("sqlalchemy.pool").setLevel(logging.WARNING if verbose else logging.CRITICAL)
    # Anything still built with structlog.get_logger (scripts, examples) takes the same road.
    structlog.configure(
        processors=_PROCESSORS,
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def enable_debug() -> None:
    """Lower simbridge's level to debug (a sub-command's own ``-v``)."""
    logging.getLogger(ROOT).setLevel(logging.DEBUG)
