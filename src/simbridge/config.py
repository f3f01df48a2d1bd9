"""simbridge's one configuration model: a YAML file plus ``SIMBRIDGE_*`` environment variables.

Every configuration key of every package is declared here and nowhere else. Sections are nested
models (``shm``, ``gpus``, ...); an environment variable overrides the file with ``__`` between
levels, e.g. ``SIMBRIDGE_SHM__SPIN_US=20``. The file is ``-c FILE``, else ``$SIMBRIDGE_CONFIG``, else
``./simbridge.yaml``; a file named explicitly replaces the default one, it is never merged with it.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import string
from contextvars import ContextVar
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
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
        description=(
            "How long a reader spins before parking on the futex, in microseconds (50: chosen from"
            " the spin sweep of benchmarks/shm_block.py on a 2-core VM, see benchmarks/RESULTS.md)."
        ),
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
    mode: int = Field(default=0o600, ge=0, le=0o777, description="Permission bits of newly created segments.")


# Fields a jobs step template may name (rendered per beam by simbridge.jobs.pipeline).
JOB_TEMPLATE_FIELDS = frozenset(
    {"case_id", "beam_id", "beam_dir", "work_dir", "results_dir", "python", "config_dir"}
)


def _check_template(key: str, template: str | None) -> str | None:
    if template is None:
        return None
    try:
        words = shlex.split(template)
    except ValueError as exc:
        msg = f"{key}: cannot split {template!r} into words ({exc}); fix the quoting"
        raise ValueError(msg) from exc
    if not words:
        raise ValueError(f"{key}: empty command; give a program and its arguments or remove the key")
    for word in words:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(word) if name is not None]
        except ValueError as exc:
            msg = f"{key}: bad braces in {word!r} ({exc}); write literal braces as {{{{ }}}}"
            raise ValueError(msg) from exc
        unknown = sorted({f for f in fields if f not in JOB_TEMPLATE_FIELDS})
        if unknown:
            raise ValueError(
                f"{key}: unknown field(s) {unknown} in {template!r}; use only {sorted(JOB_TEMPLATE_FIELDS)}"
            )
    return template


class JobsStepsSettings(_Section):
    """Pipeline steps as command templates. Each is split into words like a shell would, then each
    word is filled in with ``{case_id} {beam_id} {beam_dir} {work_dir} {results_dir} {python}``;
    the result runs as an argv list, never through a shell. ``{config_dir}`` is the folder of the
    config file in force (the current folder without one), for programs shipped beside it."""

    prepare: str | None = Field(
        default=None,
        description="Local preprocessing, run in the beam's staging folder ({work_dir}); "
        "None skips it (the beam's files are staged as they are).",
    )
    simulate: str | None = Field(
        default=None,
        description="The simulation, run by the executor on a leased GPU in the beam's per-beam "
        "folder ({work_dir}) after upload. Required by `simbridge serve`.",
    )
    postprocess: str | None = Field(
        default=None,
        description="Run locally in {results_dir} after the outputs are downloaded; None skips it.",
    )
    outputs: tuple[str, ...] = Field(
        default=("raw",),
        min_length=1,
        description="Glob patterns (relative to the per-beam folder) downloaded into "
        "results/CASE/BEAM/; each must match at least one file.",
    )

    @model_validator(mode="after")
    def _templates_known(self) -> JobsStepsSettings:
        for key in ("prepare", "simulate", "postprocess"):
            _check_template(f"jobs.steps.{key}", getattr(self, key))
        for pattern in self.outputs:
            if pattern.startswith("/") or ".." in Path(pattern).parts:
                raise ValueError(f"jobs.steps.outputs: {pattern!r} must stay inside the beam folder")
        return self


class JobsTimeoutsSettings(_Section):
    """Wall-clock limits, in seconds, of each kind of wait in the pipeline."""

    prepare_s: float = Field(default=600.0, gt=0, description="Limit of the prepare command.")
    simulate_s: float = Field(default=86_400.0, gt=0, description="Limit of one simulation run.")
    postprocess_s: float = Field(default=600.0, gt=0, description="Limit of the postprocess command.")
    transfer_s: float = Field(
        default=600.0, gt=0, description="Time budget of an upload or download with its retries."
    )
    kill_grace_s: float = Field(
        default=5.0, ge=0, description="Between SIGTERM and SIGKILL when a step is stopped."
    )


class JobsRetrySettings(_Section):
    """Retry policy: transient failures retry with exponential backoff; others fail the beam."""

    max_attempts: int = Field(default=3, ge=1, le=100, description="Attempts per step per round.")
    backoff_initial_s: float = Field(default=2.0, ge=0, description="First backoff delay.")
    backoff_max_s: float = Field(default=300.0, ge=0, description="Cap of the backoff delay.")
    transient_exit_codes: tuple[int, ...] = Field(
        default=(75,),
        description="Exit codes that mean 'try again' (75 is EX_TEMPFAIL); others are permanent.",
    )
    retry_lost: bool = Field(
        default=True,
        description="Retry a process that vanished without an exit code (killed by a signal, OOM).",
    )
    retry_timeout: bool = Field(default=False, description="Retry a step that hit its timeout.")

    def backoff_s(self, attempt: int) -> float:
        """Delay before attempt number ``attempt + 1`` (attempt counts from 1)."""
        return float(min(self.backoff_max_s, self.backoff_initial_s * 2 ** max(0, attempt - 1)))


class JobsCaseLimitsSettings(_Section):
    """Bounds of one case folder; a case past any of them is rejected (moved to inbox/.rejected)."""

    max_depth: int = Field(default=16, ge=2, le=128, description="Folder levels below the case folder.")
    max_files: int = Field(default=100_000, ge=1, description="Files in one case.")
    max_bytes: int = Field(default=64 << 30, ge=1, description="Total bytes of one case's files.")
    max_path_bytes: int = Field(
        default=1024, ge=64, le=4000, description="Bytes of one path relative to the case folder."
    )


class SlurmSettings(_Section):
    """How beams are submitted to a Slurm cluster (``clusters.NAME.slurm``)."""

    partition: str | None = Field(default=None, description="sbatch --partition.")
    account: str | None = Field(default=None, description="sbatch --account.")
    qos: str | None = Field(default=None, description="sbatch --qos.")
    time: str | None = Field(default=None, description="sbatch --time, e.g. 04:00:00.")
    gres: str | None = Field(default=None, description="sbatch --gres per beam, e.g. gpu:1.")
    gpus: int | None = Field(default=None, ge=1, le=64, description="sbatch --gpus per beam.")
    extra_args: tuple[str, ...] = Field(default=(), description="More sbatch arguments, one word each.")
    job_name: str = Field(
        default="moqui_{beam_id}",
        description="Job name template (unique per beam: the job is found again by it after a crash); "
        "fields {beam_id} {case} {beam} {attempt}.",
    )
    arrays: bool = Field(default=True, description="Submit many ready beams as one job array.")
    array_min: int = Field(default=2, ge=2, description="Ready beams that make an array worth it.")
    array_parallel: int | None = Field(
        default=None, ge=1, description="At most this many tasks of one array at once (--array=0-N%T)."
    )
    requeue: tuple[str, ...] = Field(
        default=("NODE_FAIL", "PREEMPTED"),
        description="Slurm end states retried as a new attempt (never counted as the beam's fault).",
    )
    submit_per_s: float = Field(default=10.0, gt=0, description="At most this many sbatch calls a second.")


class ClusterSettings(_Section):
    """One remote host or cluster reached over SSH (``clusters.NAME``)."""

    host: str = Field(description="Host name or address of the login node (or the plain GPU host).")
    port: int = Field(default=22, ge=1, le=65535, description="SSH port.")
    user: str | None = Field(default=None, description="SSH user; default: the local user.")
    identity_file: Path | None = Field(
        default=None, description="Private key file; default: the SSH agent and ~/.ssh keys."
    )
    known_hosts: Path | None = Field(
        default=None,
        description="known_hosts file the host key is checked against (default ~/.ssh/known_hosts).",
    )
    accept_new_host_keys: bool = Field(
        default=False,
        description="Trust (and record) an unknown host's key on first connection; a changed key is "
        "always refused.",
    )
    proxy_jump: str | None = Field(default=None, description="[user@]host[:port] to tunnel through.")
    remote_root: PurePosixPath = Field(
        description="Absolute folder on the host under which every case/beam folder lives."
    )
    scheduler: Literal["slurm", "none"] = Field(
        default="slurm", description="slurm: one job per beam via sbatch; none: run.sh on the host itself."
    )
    slurm: SlurmSettings = SlurmSettings()
    gpus: int | Literal["discover"] | None = Field(
        default=None,
        description="GPUs of a plain host (scheduler: none): a count, or 'discover' (nvidia-smi over SSH).",
    )
    transfer_parallel: int = Field(default=8, ge=1, le=128, description="Files in flight per beam.")
    poll_s: float = Field(
        default=10.0, ge=0.05, le=3600, description="Least seconds between two status polls of this cluster."
    )
    connect_timeout_s: float = Field(default=15.0, gt=0, description="Limit of one SSH connection attempt.")
    keepalive_s: float = Field(default=15.0, gt=0, description="SSH keepalive interval.")
    command_timeout_s: float = Field(default=60.0, gt=0, description="Limit of one remote command.")
    cleanup: bool = Field(default=False, description="Remove a beam's remote folder after it completed.")
    run_template: Path | None = Field(
        default=None,
        description="Template of run.sh (string.Template, $-fields); default: the built-in one.",
    )
    env: dict[str, str] = Field(default_factory=dict, description="Environment set in run.sh.")

    @model_validator(mode="after")
    def _root_absolute(self) -> ClusterSettings:
        root = self.remote_root
        if not root.is_absolute() or ".." in root.parts or str(root) == "/":
            raise ValueError(f"remote_root: {str(root)!r} must be an absolute folder below / without '..'")
        if self.scheduler == "slurm" and self.gpus is not None:
            raise ValueError("gpus: only for scheduler: none (Slurm assigns GPUs through slurm.gres/gpus)")
        return self


class JobsSettings(_Section):
    """The control plane: inbox, store, pipeline steps, executor, limits."""

    inbox: Path = Field(default=Path(".work/inbox"), description="Folder watched for case folders.")
    results: Path = Field(
        default=Path(".work/results"), description="Results root: results/CASE/BEAM/<outputs>."
    )
    work_root: Path = Field(
        default=Path(".work/jobs"),
        description="Orchestrator state: case snapshots, staging, per-beam folders, logs, the DB.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL (sqlite:///PATH or postgresql+psycopg://...); "
        "default: SQLite file WORK_ROOT/simbridge.db in WAL mode.",
    )
    executor: str = Field(
        default="local",
        description="Where simulations run: local, or the name of an entry of the clusters section.",
    )
    gpus_per_beam: int = Field(default=1, ge=1, le=64, description="GPUs leased per simulation.")
    workers: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Threads running in-process step actions (copies, launches).",
    )
    max_preparing: int = Field(
        default=2,
        ge=1,
        le=256,
        description="Prepare/postprocess commands running at once (CPU work).",
    )
    poll_s: float = Field(
        default=0.5, gt=0, le=60, description="How often the dispatcher polls processes and the DB."
    )
    ready_marker: str | None = Field(
        default="READY",
        description="A file whose presence in a case folder marks it complete at once; "
        "None: completeness is only 'sizes stable for stable_s'.",
    )
    stable_s: float = Field(
        default=5.0,
        ge=0,
        description="A case without the marker is taken after this long unchanged.",
    )
    orchestrator_lease_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="One `serve` per database: a serve that stops renewing its lease (killed, host "
        "down) may be replaced after this long; at once when its pid is dead on the same host.",
    )
    steps: JobsStepsSettings = JobsStepsSettings()
    timeouts: JobsTimeoutsSettings = JobsTimeoutsSettings()
    retry: JobsRetrySettings = JobsRetrySettings()
    case_limits: JobsCaseLimitsSettings = JobsCaseLimitsSettings()

    @model_validator(mode="after")
    def _url_known(self) -> JobsSettings:
        url = self.database_url
        if url is not None and not url.startswith(("sqlite://", "postgresql")):
            raise ValueError(
                f"jobs.database_url: {url!r} is not sqlite:///PATH or postgresql+psycopg://...; "
                "fix it or remove it for the SQLite default"
            )
        if self.ready_marker is not None and ("/" in self.ready_marker or not self.ready_marker):
            raise ValueError("jobs.ready_marker: must be a plain file name, e.g. READY")
        return self

    def db_url(self) -> str:
        """The database URL in force (the SQLite default lives under the work root)."""
        return self.database_url or f"sqlite:///{(self.work_root / 'simbridge.db').resolve()}"


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
        "the same one. None: /dev/shm/simbridge-gpus-<uid> (else /tmp/...), private to the user "
        "and the same whatever TMPDIR a process has. To share GPUs "
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


class LogSettings(_Section):
    """How the command-line tools log (library code only emits, through `logging`; see simbridge.logs)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written; `-v` on the command line means debug."
    )
    format: Literal["console", "json"] = Field(
        default="console", description="Human-readable lines, or one JSON object per line."
    )


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
        path = _FILE_IN_FORCE.get() or config_file()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            sources.append(InitSettingsSource(settings_cls, init_kwargs=read_config_file(path)))
        return tuple(sources)


# The file load_settings(config=...) was asked to read, seen by settings_customise_sources.
_FILE_IN_FORCE: ContextVar[Path | None] = ContextVar("simbridge_config_file", default=None)


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


def load_settings(*, config: Path | None = None, **overrides: Any) -> Settings:
    """Read the file (``config``, else the default one) and the environment; a bad value raises
    :class:`ConfigError` saying, one line per problem, where it came from, the key and the fix."""
    path = config_file(config)
    _check_env_sections()
    token = _FILE_IN_FORCE.set(path)
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
        _FILE_IN_FORCE.reset(token)


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
