"""simbridge's one configuration model: a YAML file plus ``SIMBRIDGE_*`` environment variables.

Every configuration key of every package is declared in this package and nowhere else. Sections are
nested models (``shm``, ``gpus``, ...); an environment variable overrides the file with ``__`` between
levels, e.g. ``SIMBRIDGE_SHM__SPIN_US=20``. The file is ``-c FILE``, else ``$SIMBRIDGE_CONFIG``, else
``./simbridge.yaml``; a file named explicitly replaces the default one, it is never merged with it.

One module a job: ``sections`` (shm, gpus, models, log), ``jobs``, ``clusters``, ``settings`` (the
root model), ``files`` (which file, read how) and ``loading`` (load_settings and its error messages).
Import every name from here, ``simbridge.config``.
"""

from __future__ import annotations

from simbridge.config.clusters import ClusterSettings, SlurmSettings
from simbridge.config.files import CONFIG_ENV, DEFAULT_CONFIG_FILE, config_file, read_config_file
from simbridge.config.jobs import (
    JOB_TEMPLATE_FIELDS,
    JobsCaseLimitsSettings,
    JobsRetrySettings,
    JobsSettings,
    JobsStepsSettings,
    JobsTimeoutsSettings,
)
from simbridge.config.loading import load_settings
from simbridge.config.sections import GpuSettings, LogSettings, ModelSettings, ShmSettings
from simbridge.config.settings import Settings

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_FILE",
    "JOB_TEMPLATE_FIELDS",
    "ClusterSettings",
    "GpuSettings",
    "JobsCaseLimitsSettings",
    "JobsRetrySettings",
    "JobsSettings",
    "JobsStepsSettings",
    "JobsTimeoutsSettings",
    "LogSettings",
    "ModelSettings",
    "Settings",
    "ShmSettings",
    "SlurmSettings",
    "config_file",
    "load_settings",
    "read_config_file",
]
