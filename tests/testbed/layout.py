"""Where each file of a testbed lives under its folder (one place, so `down DIR` finds what `up DIR`
made), and the ports and names it was started with (testbed.json)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "testbed.json"


@dataclass(frozen=True, kw_only=True)
class Ports:
    """The TCP ports one testbed listens on (all on this host)."""

    ssh: int
    slurmctld: int
    slurmd: int


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The paths of one testbed below its root folder."""

    root: Path

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def slurm_conf(self) -> Path:
        return self.etc / "slurm.conf"

    @property
    def gres_conf(self) -> Path:
        # Slurm reads gres.conf from the folder of slurm.conf.
        return self.etc / "gres.conf"

    @property
    def dev(self) -> Path:
        return self.root / "dev"

    @property
    def statesave(self) -> Path:
        return self.root / "slurmctld-state"

    @property
    def spool(self) -> Path:
        return self.root / "slurmd-spool"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def ssh(self) -> Path:
        return self.root / "ssh"

    @property
    def host_key(self) -> Path:
        return self.ssh / "host_ed25519"

    @property
    def client_key(self) -> Path:
        return self.ssh / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        # sshd's AuthorizedKeysFile is this path with %u, so only root (this file) gets in.
        return self.ssh / "authorized_keys.root"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def sbatch_calls(self) -> Path:
        return self.root / "sbatch-calls.log"

    @property
    def sbatch_hold(self) -> Path:
        # While this file exists every sbatch waits (bounded) before it submits: a test's window
        # to kill an orchestrator while its sbatch is in flight. Each held call appends its pid
        # to sbatch-held.log first.
        return self.root / "sbatch-hold"

    @property
    def sbatch_held(self) -> Path:
        return self.root / "sbatch-held.log"

    @property
    def remote_root(self) -> Path:
        return self.root / "remote"

    @property
    def tmpfs(self) -> Path:
        return self.root / "tmpfs"

    def pidfile(self, daemon: str) -> Path:
        return self.run / f"{daemon}.pid"

    def log(self, daemon: str) -> Path:
        return self.logs / f"{daemon}.log"


@dataclass(frozen=True, kw_only=True)
class Saved:
    """What `up` decided and `down`/`env` must know again: ports, node name, cluster name."""

    ports: Ports
    node: str
    cluster: str
    gpus: int
    cpus: int

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> Saved:
        raw = json.loads(path.read_text())
        return cls(
            ports=Ports(**raw["ports"]),
            node=str(raw["node"]),
            cluster=str(raw["cluster"]),
            gpus=int(raw["gpus"]),
            cpus=int(raw["cpus"]),
        )
