"""Testbed: a one-node Slurm cluster, munge and an sshd on loopback, in one folder, started and stopped
as a whole (and by parts, for the failure tests: sshd down and up, slurmctld restarted)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from tests.testbed import slurm, sshd, sweep
from tests.testbed._proc import TestbedError, free_port, pid_alive, read_pid, stop_pidfile
from tests.testbed.layout import Layout, Ports, Saved
from tests.testbed.munge import ensure_munge

_PORT_ATTEMPTS = 3
DAEMONS = ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/bin/sbatch", "/usr/sbin/sshd", "/usr/sbin/munged")


def missing_requirements() -> str | None:
    """Why a testbed cannot start here (not root, a package missing), or None when it can."""
    if os.geteuid() != 0:
        return "the loopback Slurm + sshd testbed needs root (it mounts tmpfs, runs sshd and slurmd as root)"
    absent = [path for path in DAEMONS if not Path(path).exists()]
    absent += [tool for tool in ("ssh", "ssh-keygen", "munge", "unmunge") if shutil.which(tool) is None]
    if absent:
        return (
            f"missing {', '.join(absent)}: install the Debian packages slurmctld slurmd slurm-client "
            "munge openssh-server (make system-packages)"
        )
    return None


def _fresh(*, gpus: int, cpus: int, cluster: str) -> Saved:
    ssh_port = free_port()
    ctld_port = free_port(taken=[ssh_port])
    return Saved(
        ports=Ports(ssh=ssh_port, slurmctld=ctld_port, slurmd=free_port(taken=[ssh_port, ctld_port])),
        node=socket.gethostname(),
        cluster=cluster,
        gpus=gpus,
        cpus=cpus,
    )


def _running(layout: Layout, daemon: str) -> bool:
    pid = read_pid(layout.pidfile(daemon))
    return pid is not None and pid_alive(pid)


class Testbed:
    """A running testbed below `root`. Start one with `Testbed.up(root)`; attach to one started
    elsewhere (the CLI) with `Testbed.attach(root)`. A context manager: leaving it stops everything."""

    __test__ = False

    host = "127.0.0.1"
    user = "root"

    def __init__(self, *, root: Path, saved: Saved) -> None:
        self.layout = Layout(root=root.resolve())
        self.saved = saved

    # ---- the facts a test needs ---------------------------------------------------------------

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def port(self) -> int:
        """sshd's port on 127.0.0.1."""
        return self.saved.ports.ssh

    @property
    def ports(self) -> Ports:
        return self.saved.ports

    @property
    def node(self) -> str:
        """The Slurm node name (this host's name)."""
        return self.saved.node

    @property
    def gpus(self) -> int:
        return self.saved.gpus

    @property
    def identity_file(self) -> Path:
        return self.layout.client_key

    @property
    def known_hosts(self) -> Path:
        return self.layout.known_hosts

    @property
    def slurm_conf(self) -> Path:
        return self.layout.slurm_conf

    @property
    def remote_root(self) -> Path:
        """A folder on the 'remote' side (this host) for beams; created by `up`."""
        return self.layout.remote_root

    @property
    def logs(self) -> Path:
        return self.layout.logs

    # ---- start and stop -----------------------------------------------------------------------

    @classmethod
    def up(cls, root: Path, *, gpus: int = 8, cpus: int = 64, timeout_s: float = 60.0) -> Testbed:
        """Start munge (if none answers), slurmctld, slurmd and sshd under `root`; wait until the node
        is idle and sshd accepts. On any failure whatever started is stopped before the error rises.

        Ports are drawn at random and probed, but another testbed on this host may take one between the
        probe and the daemon's bind: then everything is stopped and started again on fresh ports."""
        why = missing_requirements()
        if why:
            raise TestbedError(f"testbed: {why}")
        root.mkdir(parents=True, exist_ok=True)
        running = [d for d in ("sshd", "slurmd", "slurmctld") if _running(Layout(root=root), d)]
        if running:
            raise TestbedError(
                f"testbed: {', '.join(running)} already running under {root}; stop it first (down)"
            )
        # A testbed stopped earlier in this folder left slurmctld's saved state under its own cluster
        # name, which a new slurmctld refuses ("CLUSTER NAME MISMATCH"): nothing of it runs, so start
        # from an empty state folder (this folder is the testbed's own, never a user's).
        layout = Layout(root=root)
        shutil.rmtree(layout.statesave, ignore_errors=True)
        shutil.rmtree(layout.spool, ignore_errors=True)
        ensure_munge()
        # One cluster name for every attempt: slurmctld refuses a state folder saved under another.
        cluster = f"tb{uuid.uuid4().hex[:8]}"
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            testbed = cls(root=root, saved=_fresh(gpus=gpus, cpus=cpus, cluster=cluster))
            try:
                testbed._start(timeout_s=timeout_s)
            except TestbedError as exc:
                if attempt < _PORT_ATTEMPTS and "Address already in use" in str(exc):
                    continue
                raise
            return testbed
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _start(self, *, timeout_s: float) -> None:
        layout, saved = self.layout, self.saved
        slurm.check_spool_path(layout)
        try:
            saved.write(layout.state)  # first: `down` can find the pidfiles even of a half start
            slurm.write_config(layout, saved)
            sshd.write_keys(layout, port=saved.ports.ssh)
            sshd.write_sbatch_wrapper(layout)
            layout.sbatch_calls.touch()
            layout.remote_root.mkdir(parents=True, exist_ok=True)
            slurm.start_slurmctld(layout, timeout_s=timeout_s, clean=True)
            slurm.start_slurmd(layout, saved, timeout_s=timeout_s)
            sshd.start_sshd(layout, port=saved.ports.ssh, timeout_s=timeout_s)
        except BaseException:
            self.down()
            raise

    @classmethod
    def attach(cls, root: Path) -> Testbed:
        """The testbed `up` started below `root` (in this process or another one)."""
        layout = Layout(root=root.resolve())
        if not layout.state.exists():
            raise TestbedError(f"testbed: no {layout.state}: nothing was started under {root}")
        return cls(root=root, saved=Saved.read(layout.state))

    def down(self) -> None:
        """Stop everything this testbed runs, by pidfiles, and works on a half-started one too: its
        jobs are cancelled, sshd stops, leftover job and session processes (even detached ones) are
        killed, then slurmd, slurmctld; its tmpfs folders are unmounted. munged stays: other testbeds
        on this host may share it. The folder itself is kept (logs, remote files)."""
        layout, port = self.layout, self.saved.ports.ssh
        steps: list[tuple[str, Callable[[], None]]] = [
            ("cancel jobs", lambda: sweep.cancel_jobs(layout) if slurm.slurmctld_running(layout) else None),
            ("stop sshd", lambda: sshd.stop_sshd(layout)),
            ("kill job and session processes", lambda: sweep.kill_leftovers(layout, ssh_port=port)),
            ("stop slurmd and slurmctld", lambda: slurm.stop_slurm(layout)),
            ("kill leftover job steps", lambda: sweep.kill_leftovers(layout, ssh_port=port)),
            ("unmount tmpfs", self.unmount_all),
        ]
        errors: list[str] = []
        for what, step in steps:
            try:
                step()
            except (TestbedError, OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{what}: {exc}")
        if errors:
            raise TestbedError("testbed: stopping failed:\n" + "\n".join(errors))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    # ---- operations for the failure tests -----------------------------------------------------

    def stop_sshd(self) -> None:
        """sshd gone: the listener and every open connection (a detached remote job keeps running)."""
        sshd.stop_sshd(self.layout)

    def start_sshd(self, *, timeout_s: float = 30.0) -> None:
        """sshd back on the same port with the same host key (nothing to do when it runs)."""
        if _running(self.layout, "sshd"):
            return
        sshd.start_sshd(self.layout, port=self.port, timeout_s=timeout_s)

    def restart_slurmctld(self, *, timeout_s: float = 30.0) -> None:
        """slurmctld stopped and started again on its saved state (jobs survive)."""
        slurm.restart_slurmctld(self.layout, timeout_s=timeout_s)

    def stop_slurmctld(self) -> None:
        """slurmctld gone (until `start_slurmctld`): squeue and sbatch fail meanwhile."""
        stop_pidfile(self.layout.pidfile("slurmctld"), comm="slurmctld")

    def start_slurmctld(self, *, timeout_s: float = 30.0) -> None:
        slurm.start_slurmctld(self.layout, timeout_s=timeout_s, clean=False)

    def sbatch_calls(self) -> int:
        """How many times `sbatch` was run on the cluster side (through sshd, or locally with env())."""
        try:
            return len(self.layout.sbatch_calls.read_bytes().splitlines())
        except FileNotFoundError:
            return 0

    @contextlib.contextmanager
    def sbatch_held(self) -> Iterator[Callable[[float], int]]:
        """Every sbatch waits (at most 120 s) until the block ends. Yields ``wait(timeout_s)``:
        the pid of the first held sbatch once one waits (its call already counted)."""
        layout = self.layout
        layout.sbatch_held.unlink(missing_ok=True)
        layout.sbatch_hold.touch()

        def wait(timeout_s: float) -> int:
            deadline = time.monotonic() + timeout_s
            while True:
                with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                    return int(layout.sbatch_held.read_text().split()[0])
                if time.monotonic() > deadline:
                    raise TestbedError(f"no sbatch came to the hold within {timeout_s} s")
                time.sleep(0.02)

        try:
            yield wait
        finally:
            layout.sbatch_hold.unlink(missing_ok=True)

    def max_array_size(self) -> int:
        return int(slurm.scontrol_value(self.layout, "MaxArraySize"))

    # ---- remote roots -------------------------------------------------------------------------

    def new_remote_root(self, name: str | None = None) -> Path:
        """A fresh folder below remote_root (one per test keeps tests on the shared cluster apart)."""
        folder = self.remote_root / (name or uuid.uuid4().hex[:12])
        folder.mkdir(parents=True)
        return folder

    def mount_tmpfs(self, *, size: str = "2m") -> Path:
        """A fresh folder on a small tmpfs of its own (a remote disk that fills up); unmounted by
        `unmount(path)` or at `down`."""
        folder = self.layout.tmpfs / uuid.uuid4().hex[:12]
        folder.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(folder)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            folder.rmdir()
            raise TestbedError(f"testbed: mount -t tmpfs on {folder} failed: {done.stderr.strip()}")
        return folder

    def unmount(self, folder: Path) -> None:
        done = subprocess.run(
            ["umount", str(folder)], capture_output=True, text=True, timeout=30, check=False
        )
        if done.returncode != 0:
            # Busy (a process still has a file open there): detach it now, the kernel frees it later.
            lazy = subprocess.run(
                ["umount", "-l", str(folder)], capture_output=True, text=True, timeout=30, check=False
            )
            if lazy.returncode != 0:
                raise TestbedError(f"testbed: umount {folder}: {done.stderr.strip()} / {lazy.stderr.strip()}")
        folder.rmdir()

    def unmount_all(self) -> None:
        """Every mount below this testbed's folder (read from /proc/self/mounts: robust to a crash)."""
        prefix = str(self.root) + "/"
        mounts: list[Path] = []
        for line in Path("/proc/self/mounts").read_text().splitlines():
            field = line.split()[1].replace("\\040", " ")
            if field.startswith(prefix):
                mounts.append(Path(field))
        for point in sorted(mounts, key=lambda p: len(p.parts), reverse=True):
            self.unmount(point)

    # ---- what clients need --------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """Environment for local client commands on this cluster (sinfo, squeue, submitit's sbatch)."""
        return {
            **os.environ,
            "SLURM_CONF": str(self.slurm_conf),
            "PATH": f"{self.layout.bin}:{os.environ.get('PATH', sshd.SESSION_PATH)}",
        }

    def ssh_argv(self, *command: str) -> list[str]:
        """`ssh` with this testbed's key and known_hosts; command words are joined as ssh does."""
        return [
            "ssh", "-i", str(self.identity_file),
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            "-p", str(self.port), f"{self.user}@{self.host}", *command,
        ]  # fmt: skip

    def ssh(
        self, command: str, *, timeout_s: float = 60.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run one shell command on the 'remote' side through sshd."""
        done = subprocess.run(
            self.ssh_argv(command), capture_output=True, text=True, timeout=timeout_s, check=False
        )
        if check and done.returncode != 0:
            raise TestbedError(
                f"testbed: ssh {command!r} exit {done.returncode}: {done.stderr.strip()[:500]}"
            )
        return done

    def cluster_settings(
        self, name: str = "testbed", scheduler: Literal["slurm", "none"] = "slurm", **overrides: Any
    ) -> dict[str, Any]:
        """One `clusters:` entry (as YAML-ready data) for this testbed; `overrides` replace keys.
        scheduler 'none' is the plain GPU host: it gets the testbed's GPU count (fake, no nvidia-smi)."""
        del name  # the caller puts the entry under its name: {"clusters": {name: settings}}
        entry: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "identity_file": str(self.identity_file),
            "known_hosts": str(self.known_hosts),
            "remote_root": str(self.remote_root),
            "scheduler": scheduler,
            "poll_s": 0.2,
            "connect_timeout_s": 10.0,
            "command_timeout_s": 30.0,
        }
        if scheduler == "none":
            entry["gpus"] = self.gpus or 1
        entry.update(overrides)
        return entry

    def shell_exports(self) -> str:
        """`export` lines for a shell that should talk to this cluster."""
        return (
            f"export SLURM_CONF={shlex.quote(str(self.slurm_conf))}\n"
            f'export PATH={shlex.quote(str(self.layout.bin))}:"$PATH"\n'
        )
