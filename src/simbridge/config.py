"""simbridge's one configuration model: a YAML file plus ``SIMBRIDGE_*`` environment variables.

Every configuration key of every package is declared here and nowhere else. Sections are nested
models (``shm``, ``gpus``, ...); an environment variable overrides the file with ``__`` between
levels, e.g. ``SIMBRIDGE_SHM__SPIN_US=20``. The file is ``$SIMBRIDGE_CONFIG`` or ``./simbridge.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

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
    open_timeout_s: float = Field(
        default=30.0, ge=0, description="Default time Block.open waits for a block to appear."
    )
    read_timeout_s: float = Field(
        default=300.0, gt=0, description="Default time Block.read waits for a new iteration."
    )
    progress_every_s: float = Field(
        default=5.0, gt=0, description="Interval of the 'still waiting' log line."
    )
    mode: int = Field(
        default=0o600, ge=0, le=0o777, description="Permission bits of newly created segments."
    )


class GpuSettings(_Section):
    """The resource plane's GPUs: how they are found and how leases wait for them."""

    discovery: Literal["auto", "nvml", "slots"] = Field(
        default="auto",
        description="'auto': NVML when a driver and a GPU answer, else `slots`; "
        "'nvml': NVML or fail; 'slots': never ask NVML.",
    )
    slots: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="How many GPU slots the pool leases when NVML is absent or discovery='slots'.",
    )
    lock_dir: Path | None = Field(
        default=None,
        description="Folder of the per-GPU lock files; every process sharing the GPUs must name "
        "the same one. None: <tmp>/simbridge-gpus-<uid>, private to the user. To share GPUs "
        "between users, name a folder they can all write and set lock_mode=0o666.",
    )
    lock_mode: int = Field(
        default=0o600,
        ge=0,
        le=0o777,
        description="Permission bits of new lock files (the folder gets the matching x bits).",
    )
    lease_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="How long GpuPool.lease waits by default before raising LeaseTimeout.",
    )
    poll_ms: float = Field(
        default=5.0,
        gt=0,
        le=1000,
        description="Longest pause between two looks at busy GPUs; waits back off up to this.",
    )


class ModelSettings(_Section):
    """The model manager: concurrency caps, timeouts, idle unloading, batching defaults."""

    max_concurrent: int = Field(
        default=10, ge=1, le=100_000, description="Callers using one model at once; more wait."
    )
    max_waiting: int = Field(
        default=1000,
        ge=0,
        description="Callers queued for one model beyond which use() fails at once (ModelBusy).",
    )
    access_timeout_s: float = Field(
        default=30.0,
        ge=0,
        description="How long a caller waits for a free slot while max_concurrent are in use.",
    )
    wait_timeout_s: float = Field(
        default=300.0, ge=0, description="How long a caller waits for a model that is loading."
    )
    load_timeout_s: float = Field(
        default=300.0,
        gt=0,
        description="Limit of one load; past it the load is abandoned and its waiters fail.",
    )
    idle_unload_s: float | None = Field(
        default=None,
        gt=0,
        description="Unload a model unused for this long (never while in use); None keeps it.",
    )
    cpu_fallback: bool = Field(
        default=True,
        description="Load on the CPU when a device='auto' load runs out of GPU memory "
        "(never when CUDA was asked for explicitly).",
    )
    batch_max_size: int = Field(
        default=64, ge=1, le=100_000, description="Default largest batch of manager.batched()."
    )
    batch_max_wait_ms: float = Field(
        default=5.0,
        ge=0,
        le=60_000,
        description="Default wait of manager.batched() for a batch to fill after its first item.",
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
    gpus: GpuSettings = GpuSettings()
    models: ModelSettings = ModelSettings()

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
