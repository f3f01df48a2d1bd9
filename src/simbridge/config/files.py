"""Which YAML file is in force (``-c FILE``, else ``$SIMBRIDGE_CONFIG``, else ``./simbridge.yaml``) and
reading it into a mapping of sections, with a :class:`ConfigError` naming the file on any problem."""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml

from simbridge.errors import ConfigError

CONFIG_ENV = "SIMBRIDGE_CONFIG"
DEFAULT_CONFIG_FILE = Path("simbridge.yaml")

# The file load_settings(config=...) was asked to read, seen by settings_customise_sources.
FILE_IN_FORCE: ContextVar[Path | None] = ContextVar("simbridge_config_file", default=None)


def config_file(explicit: Path | None = None) -> Path | None:
    """The YAML file in force: ``explicit`` (``-c``), else ``$SIMBRIDGE_CONFIG``, else
    ``./simbridge.yaml`` if present. A file named explicitly replaces the default one and must exist."""
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"--config {str(explicit)!r} does not name a file; create it or name another")
        return explicit
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={named!r} does not name a file; create it or unset it")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def read_config_file(path: Path) -> dict[str, Any]:
    """The file's sections as a mapping; a file that cannot be read, parsed, or is not a mapping
    raises :class:`ConfigError` naming the file (and the line, for a syntax error)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file ({exc.strerror}); fix it or name another"
        ) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem}); fix the syntax there") from exc
    if data is None:  # an empty file (or only comments) means all defaults
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: holds a YAML {type(data).__name__}, not a mapping of sections; "
            f"write sections as keys, e.g. 'jobs: {{workers: 4}}'"
        )
    return data
