"""Building the settings (:func:`load_settings`) and turning every validation error into one short line
that says where the value came from (file or environment variable), the key and the fix."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_settings import SettingsError

from simbridge.config.files import FILE_IN_FORCE, config_file
from simbridge.config.settings import Settings
from simbridge.errors import ConfigError


def load_settings(*, config: Path | None = None, **overrides: Any) -> Settings:
    """Read the file (``config``, else the default one) and the environment; a bad value raises
    :class:`ConfigError` saying, one line per problem, where it came from, the key and the fix."""
    path = config_file(config)
    _check_env_sections()
    token = FILE_IN_FORCE.set(path)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, path)) from exc
    except SettingsError as exc:  # an env var holding a whole section that is not JSON
        field = re.search(r'field "(\w+)"', str(exc))
        env = f"SIMBRIDGE_{field.group(1).upper()}" if field else "a SIMBRIDGE_* variable"
        raise ConfigError(
            f"environment variable {env}: not a JSON object ({exc}); write it as JSON, "
            f"e.g. {env}='{{\"key\": value}}', or set one key at a time as {env}__KEY=value"
        ) from exc
    finally:
        FILE_IN_FORCE.reset(token)


def _check_env_sections() -> None:
    # pydantic-settings reads only the sections it knows: SIMBRIDGE_JBOS__WORKERS would be dropped
    # without a word. (Names without "__" are left alone: SIMBRIDGE_CONFIG, _RECORD, _INCLUDE...)
    sections = list(Settings.model_fields)
    for name in os.environ:
        if not name.upper().startswith("SIMBRIDGE_") or "__" not in name:
            continue
        section = name[len("SIMBRIDGE_") :].split("__", 1)[0].lower()
        if section not in sections:
            near = difflib.get_close_matches(section, sections, n=1)
            hint = (
                f"did you mean SIMBRIDGE_{near[0].upper()}__{name.split('__', 1)[1]}?"
                if near
                else f"sections are {', '.join(sections)}"
            )
            raise ConfigError(f"environment variable {name}: unknown section {section}; {hint}")


def _env_var_for(loc: tuple[str | int, ...]) -> str | None:
    """The SIMBRIDGE_* variable that set ``loc`` (or a section above it), if one is set."""
    present = {name.upper() for name in os.environ}
    if loc[:2] == ("shm", "record") and "SIMBRIDGE_RECORD" in present:
        return "SIMBRIDGE_RECORD"
    for depth in range(len(loc), 0, -1):
        name = "SIMBRIDGE_" + "__".join(str(part).upper() for part in loc[:depth])
        if name in present:
            return name
    return None


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The section model that holds the key at ``loc`` (for suggesting a spelling)."""
    model: type[BaseModel] = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _default_of(loc: tuple[str | int, ...]) -> str:
    model = _model_at(loc)
    field = model.model_fields.get(str(loc[-1])) if model is not None else None
    if field is None or isinstance(field.default, BaseModel):
        return ""
    return f" for the default ({field.default!r})"


def _explain(exc: ValidationError, path: Path | None) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(part) for part in loc)
        env = _env_var_for(loc)
        where = f"environment variable {env}" if env else str(path or "the defaults")
        if err["type"] == "extra_forbidden":
            model = _model_at(loc)
            known = list(model.model_fields) if model is not None else []
            near = difflib.get_close_matches(str(loc[-1]), known, n=1)
            prefix = key.rsplit(".", 1)[0] + "." if len(loc) > 1 else ""
            hint = f"did you mean {prefix}{near[0]}?" if near else f"known keys here: {', '.join(known)}"
            lines.append(f"{where}: unknown key {key}; {hint}")
            continue
        message = str(err["msg"]).removeprefix("Value error, ")
        if message.startswith(f"{key}.") or message.startswith(f"{key}:") or err["type"] == "value_error":
            lines.append(f"{where}: {message}")
            continue
        got = repr(err.get("input"))
        got = got if len(got) <= 60 else got[:57] + "..."
        fix = f"fix {key} in {path}" if env is None and path else f"fix {env or key}"
        lines.append(f"{where}: {key}: {message} (got {got}); {fix} or remove it{_default_of(loc)}")
    return "\n".join(lines)
