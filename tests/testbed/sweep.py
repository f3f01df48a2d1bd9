"""Leftovers of a testbed: its jobs, the processes its sessions left behind, and whole testbeds whose
pytest run died (kill -9) before it could stop them. Only what is provably this testbed's is touched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from tests.testbed._proc import descendants, kill_and_wait, pid_alive, read_pid
from tests.testbed.layout import Layout

OWNER_FILE = "owner.pid"
STALE_PREFIX = "sbtb-"


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {key.decode(errors="replace"): value.decode(errors="replace") for key, value in pairs}


def _ancestors() -> set[int]:
    found, pid = set(), os.getpid()
    while pid > 1:
        found.add(pid)
        pid = _parent(pid)
    return found


def ours(layout: Layout, *, ssh_port: int) -> list[int]:
    """Processes this testbed made: Slurm job steps and jobs (their environment holds this testbed's
    SLURM_CONF and a job id, or they are its slurmstepd) and commands started through its sshd
    (SSH_CONNECTION names its port), even detached ones (setsid nohup). Never this process or its
    parents: a shell that ran `eval $(python -m tests.testbed env DIR)` carries SLURM_CONF too."""
    conf = str(layout.slurm_conf)
    spare = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spare or int(entry.name) <= 1:
            continue
        env = _environ(int(entry.name))
        if env.get("SLURM_CONF") != conf:
            continue
        comm = _comm(int(entry.name))
        via_sshd = env.get("SSH_CONNECTION", "").endswith(f" {ssh_port}")
        if comm in ("slurmstepd", "slurmd", "slurmctld", "sshd") and not via_sshd:
            continue  # daemons are stopped by their pidfiles; their job steps below
        if via_sshd or "SLURM_JOB_ID" in env or comm == "slurmstepd":
            found.append(int(entry.name))
    # slurmd starts slurmstepd with an environment of its own: it is found as a job's parent.
    steps = {_parent(pid) for pid in found}
    return found + [pid for pid in steps if pid > 1 and pid not in found and _comm(pid) == "slurmstepd"]


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cancel_jobs(layout: Layout) -> None:
    """scancel every job of this cluster (only this cluster: its SLURM_CONF); best effort."""
    env = {**os.environ, "SLURM_CONF": str(layout.slurm_conf)}
    subprocess.run(
        ["scancel", "--user=root", "--full"], env=env, capture_output=True, timeout=15, check=False
    )


def kill_leftovers(layout: Layout, *, ssh_port: int) -> None:
    """SIGKILL what `ours` finds, children before parents, so no job outlives its testbed."""
    pids = ours(layout, ssh_port=ssh_port)
    for pid in sorted(set(pids) | {d for p in pids for d in descendants(p)}, reverse=True):
        if pid_alive(pid):
            kill_and_wait(pid, what=f"leftover process {pid}", timeout_s=5.0, sig=signal.SIGKILL)


def mark_owner(root: Path) -> None:
    """Record the pid of the pytest run that owns this testbed (for `stop_stale`)."""
    (root / OWNER_FILE).write_text(f"{os.getpid()}\n")


def stop_stale(base: Path | None = None) -> list[Path]:
    """Stop and remove testbeds under `base` (default: the temp dir) whose owning pytest run is gone
    (killed before its teardown). A testbed started by the CLI has no owner file and is never touched."""
    from tests.testbed.core import Testbed  # here: core imports this module

    stopped = []
    for root in (base or Path(tempfile.gettempdir())).glob(f"{STALE_PREFIX}*"):
        owner = read_pid(root / OWNER_FILE)
        if owner is None or pid_alive(owner) or not (root / "testbed.json").exists():
            continue
        try:
            Testbed.attach(root).down()
        except Exception:
            continue
        shutil.rmtree(root, ignore_errors=True)
        stopped.append(root)
    return stopped
