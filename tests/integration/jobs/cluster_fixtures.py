"""Helpers of the remote-cluster tests: a jobs work area whose config also names a cluster of the
loopback testbed (tests/testbed), tiny shell steps that say from the job's own side that they ran,
and readers of the store."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.integration.jobs.jobs_fixtures import JobsEnv

from simbridge.config import Settings, load_settings
from simbridge.jobs.store import Store

CLUSTER = "tb"
# Names that would run commands if any remote command took them unquoted.
HOSTILE_CASE = "case $(touch pwned) ; 'x\" `touch pwned`"
HOSTILE_BEAMS = ["beam; touch pwned", "b$(touch pwned)", "-n", "a'b\"c d", "x\ny"]


@dataclass
class ClusterEnv(JobsEnv):
    """A jobs work area (JobsEnv) plus a ``clusters:`` section and ``jobs.executor``."""

    clusters: dict[str, Any] = field(default_factory=dict)

    def configure(self, **jobs: Any) -> Settings:
        """Write the config (as JobsEnv does) with the clusters section added, and load it."""
        self.root.mkdir(parents=True, exist_ok=True)
        executor = jobs.pop("executor", None)
        # JobsEnv validates what it wrote: first without the cluster, then the whole file.
        self.jobs.pop("executor", None)
        JobsEnv.configure(self, **jobs)
        doc = yaml.safe_load(self.config_path.read_text())
        doc["clusters"] = self.clusters
        if executor is not None:
            doc["jobs"]["executor"] = executor
            self.jobs["executor"] = executor
        self.config_path.write_text(yaml.safe_dump(doc))
        os.environ["SIMBRIDGE_CONFIG"] = str(self.config_path)
        return load_settings()

    def lines(self, name: str) -> list[str]:
        """Sorted words of a file the jobs append to from their own side (missing: none)."""
        path = self.root / name
        return sorted(path.read_text().split()) if path.exists() else []

    def store(self) -> Store:
        return Store(url=self.db_url)


def tiny_steps(env: ClusterEnv, *, sleep_s: float = 0.0, fail: str = "") -> dict[str, Any]:
    """No prepare; a simulate that appends its beam to ``launches`` (on the job's side), sleeps,
    writes ``raw`` (and fails with a message on stderr for beam ``fail``); outputs: raw."""
    script = env.root / "sim.sh"
    script.write_text(
        'echo "$1" >> "$2/launches"\n'
        f'if [ "$1" = {fail!r} ]; then echo "dose engine: bad plan for $1" >&2; exit 3; fi\n'
        f"sleep {sleep_s}\n"
        'printf "%s" "$1" > raw\n'
    )
    return {
        "prepare": None,
        "simulate": f"sh {script} {{beam_id}} {env.root}",
        "postprocess": None,
        "outputs": ["raw"],
    }


def sbatch_job_ids(store: Store) -> set[str]:
    """Distinct Slurm job ids (array ids without their index) of every launched simulation."""
    ids = set()
    for beam in store.beams():
        for attempt in store.attempts(beam.id):
            if attempt.job_id and attempt.executor != "local":
                ids.add(attempt.job_id.split("_")[0])
    return ids


def results_of(env: ClusterEnv, case: str) -> dict[str, bytes]:
    """beam -> bytes of its downloaded ``raw``."""
    root: Path = env.results / case
    return {p.name: (p / "raw").read_bytes() for p in sorted(root.iterdir()) if (p / "raw").exists()}


@pytest.fixture
def cenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ClusterEnv:
    """A cluster work area in ``tmp_path/c`` (the rest of tmp_path stays the test's own), with a
    SQLite store and no SIMBRIDGE_CONFIG inherited from the environment."""
    monkeypatch.setenv("SIMBRIDGE_CONFIG", "")
    monkeypatch.delenv("SIMBRIDGE_CONFIG")
    root = tmp_path / "c"
    root.mkdir()
    return ClusterEnv(root=root, db_url=f"sqlite:///{root / 'work' / 'simbridge.db'}")
