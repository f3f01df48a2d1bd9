"""simbridge's one configuration model: a YAML file plus ``SIMBRIDGE_*`` environment variables.

Every configuration key of every package is declared here and nowhere else. Sections are nested
models (``shm``, ``gpus``, ...); an environment variable overrides the file with ``__`` between
levels, e.g. ``SIMBRIDGE_SHM__SPIN_US=20``. The file is ``$SIMBRIDGE_CONFIG`` or ``./simbridge.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from simbridge.errors import ConfigError

CONFIG_ENV = "SIMBRIDGE_CONFIG"
DEFAULT_CONFIG_FILE = Path("simbridge.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShmSettings(_Section):
    """The data plane: shared-memory blocks and rings."""

    record: Path | None = Field(
        default=None,
        description="Directory where every Block publish/read is recorded as NPZ "
        "(also settable as SIMBRIDGE_RECORD).",
    )
    spin_us: float = Field(
        default=50.0,
        ge=0,
        le=1_000_000,
        description="How long a reader spins before parking on the futex, in microseconds.",
    )
    peer_check_ms: float = Field(
        default=200.0,
        gt=0,
        le=10_000,
        description="How often a parked wait wakes to check that the writer is still alive.",
    )
    progress_every_s: float = Field(
        default=5.0, gt=0, description="Interval of the 'still waiting' log line."
    )
    mode: int = Field(
        default=0o600, ge=0, le=0o777, description="Permission bits of newly created segments."
    )


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="SIMBRIDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    shm: ShmSettings = ShmSettings()

    @model_validator(mode="before")
    @classmethod
    def _record_shortcut(cls, data: Any) -> Any:
        # SIMBRIDGE_RECORD=DIR is the documented short form of SIMBRIDGE_SHM__RECORD.
        short = os.environ.get("SIMBRIDGE_RECORD")
        if short and isinstance(data, dict):
            shm = dict(data.get("shm") or {})
            shm.setdefault("record", short)
            data = {**data, "shm": shm}
        return data

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)


def config_file() -> Path | None:
    """The YAML file in force: ``$SIMBRIDGE_CONFIG`` (must exist) or ``./simbridge.yaml`` if present."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigError(f"{CONFIG_ENV}={named!r} does not name a file; create it or unset it")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(**overrides: Any) -> Settings:
    """Read the file and the environment; raise :class:`ConfigError` naming each bad key and its fix."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from exc


def _explain(exc: ValidationError) -> str:
    where = config_file()
    lines = [f"invalid simbridge configuration ({where or 'no config file'} + SIMBRIDGE_* env):"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        env = "SIMBRIDGE_" + "__".join(str(part).upper() for part in err["loc"])
        got = err.get("input")
        lines.append(f"  {key}: {err['msg']} (got {got!r}); set a valid value in the file or in {env}")
    return "\n".join(lines)
