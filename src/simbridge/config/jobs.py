"""The ``jobs`` section: inbox, store, pipeline steps (command templates, checked here), timeouts,
retry policy and case limits."""

from __future__ import annotations

import shlex
import string
from pathlib import Path

from pydantic import Field, model_validator

from simbridge.config.sections import Section

# Fields a jobs step template may name (rendered per beam by simbridge.jobs.layout).
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


class JobsStepsSettings(Section):
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


class JobsTimeoutsSettings(Section):
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


class JobsRetrySettings(Section):
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


class JobsCaseLimitsSettings(Section):
    """Bounds of one case folder; a case past any of them is rejected (moved to inbox/.rejected)."""

    max_depth: int = Field(default=16, ge=2, le=128, description="Folder levels below the case folder.")
    max_files: int = Field(default=100_000, ge=1, description="Files in one case.")
    max_bytes: int = Field(default=64 << 30, ge=1, description="Total bytes of one case's files.")
    max_path_bytes: int = Field(
        default=1024, ge=64, le=4000, description="Bytes of one path relative to the case folder."
    )


class JobsSettings(Section):
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
