"""The whole configuration model: every section under one pydantic-settings root, read from the
environment (``SIMBRIDGE_*``, ``__`` between levels) over the YAML file in force."""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from simbridge.config.clusters import ClusterSettings
from simbridge.config.files import FILE_IN_FORCE, config_file, read_config_file
from simbridge.config.jobs import JobsSettings
from simbridge.config.sections import GpuSettings, LogSettings, ModelSettings, ShmSettings


class Settings(BaseSettings):
    """The whole configuration. Build it with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="SIMBRIDGE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    log: LogSettings = LogSettings()
    shm: ShmSettings = ShmSettings()
    gpus: GpuSettings = GpuSettings()
    models: ModelSettings = ModelSettings()
    jobs: JobsSettings = JobsSettings()
    clusters: dict[str, ClusterSettings] = Field(
        default_factory=dict,
        description="Remote hosts and Slurm clusters, by name (jobs.executor picks one).",
    )

    @model_validator(mode="after")
    def _executor_known(self) -> Settings:
        name = self.jobs.executor
        if name != "local" and name not in self.clusters:
            known = ", ".join(["local", *sorted(self.clusters)])
            raise ValueError(f"jobs.executor: {name!r} is neither local nor a cluster; use one of {known}")
        for cname in self.clusters:
            if cname == "local" or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", cname):
                raise ValueError(
                    f"clusters: name {cname!r} must be letters, digits, '_', '.', '-' (not 'local')"
                )
        return self

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
        path = FILE_IN_FORCE.get() or config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=read_config_file(path)))
        return tuple(sources)
