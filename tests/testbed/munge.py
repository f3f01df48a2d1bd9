"""munge, the authentication Slurm's daemons and clients share: one machine-wide munged, started
only when none answers (several testbeds on one host use the same one and none stops it)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

from tests.testbed._proc import TestbedError, wait_for

RUN_DIR = Path("/run/munge")
KEY = Path("/etc/munge/munge.key")
LOG = Path("/var/log/munge/munged.log")


def munge_works() -> bool:
    """True when a credential made by `munge -n` is accepted by `unmunge`."""
    if shutil.which("munge") is None or shutil.which("unmunge") is None:
        return False
    try:
        made = subprocess.run(["munge", "-n"], capture_output=True, timeout=10, check=False)
        if made.returncode != 0:
            return False
        back = subprocess.run(["unmunge"], input=made.stdout, capture_output=True, timeout=10, check=False)
    except subprocess.TimeoutExpired:
        return False
    return back.returncode == 0


def ensure_munge(*, timeout_s: float = 20.0) -> None:
    """Make `munge -n | unmunge` work: create /run/munge (owned by munge) and start munged if needed.

    munged daemonizes itself and keeps its own pidfile in /run/munge; it is left running on purpose:
    other testbeds on this host may be using it."""
    if munge_works():
        return
    if not KEY.exists():
        raise TestbedError(f"testbed: {KEY} missing (install the Debian package munge: make system-packages)")
    try:
        owner = pwd.getpwnam("munge")
    except KeyError as exc:
        raise TestbedError("testbed: no user 'munge' (install the Debian package munge)") from exc
    RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    os.chown(RUN_DIR, owner.pw_uid, owner.pw_gid)
    LOG.parent.mkdir(parents=True, exist_ok=True)
    # --force: as root munged refuses to run over "insecure" log/dir ownership otherwise. A second
    # munged started at the same moment by another testbed finds the pidfile lock and exits; both
    # callers then see the first one answer.
    started = subprocess.run(
        ["/usr/sbin/munged", "--force"], capture_output=True, text=True, timeout=30, check=False
    )
    wait_for(
        f"munged answering (munged exit {started.returncode}: {started.stderr.strip()[:300]})",
        munge_works,
        timeout_s=timeout_s,
        logs=[LOG],
        interval_s=0.1,
    )
