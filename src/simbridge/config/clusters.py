"""The ``clusters`` section: one entry per remote host or Slurm cluster, reached over SSH."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Literal

from pydantic import Field, model_validator

from simbridge.config.sections import Section


class SlurmSettings(Section):
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


class ClusterSettings(Section):
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
