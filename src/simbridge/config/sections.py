"""The sections of the configuration that are not the jobs' or the clusters': shm, gpus, models, log,
and :class:`Section`, the base of every section model (unknown keys refused, values frozen)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    """A configuration section: a frozen model that refuses unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ShmSettings(Section):
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


class GpuSettings(Section):
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


class ModelSettings(Section):
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


class LogSettings(Section):
    """How the command-line tools log (library code only emits, through `logging`; see simbridge.logs)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Lowest level written; `-v` on the command line means debug."
    )
    format: Literal["console", "json"] = Field(
        default="console", description="Human-readable lines, or one JSON object per line."
    )
