"""The one-node Slurm cluster of a testbed: slurm.conf and gres.conf in its folder, fake GPU devices,
slurmctld then slurmd, and the wait until the node is idle."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.testbed._proc import (
    TestbedError,
    listening,
    pid_alive,
    read_pid,
    start_daemon,
    stop_pidfile,
    wait_for,
)
from tests.testbed.layout import Layout, Saved

# MinJobAge: how long a finished job stays visible in `scontrol show job` (there is no accounting
# storage, so no sacct). Slurm's default of 300 s is kept: the status watcher's "left the queue ->
# scontrol -> markers" path must see the real end state of a job even when a test (a slurmctld
# restart, a killed orchestrator) keeps the poller away for a while; markers remain the final word.
MIN_JOB_AGE_S = 300


def _slurm_conf(layout: Layout, saved: Saved, *, real_mb: int) -> str:
    node = saved.node
    gres_node = f" Gres=gpu:{saved.gpus}" if saved.gpus else ""
    lines = [
        f"ClusterName={saved.cluster}",
        # NodeAddr/SlurmctldHost addresses are loopback: nothing leaves 127.0.0.0/8.
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={saved.ports.slurmctld}",
        f"SlurmdPort={saved.ports.slurmd}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"StateSaveLocation={layout.statesave}",
        f"SlurmdSpoolDir={layout.spool}",
        f"SlurmctldPidFile={layout.run / 'slurmctld.own.pid'}",
        f"SlurmdPidFile={layout.run / 'slurmd.own.pid'}",
        f"SlurmctldLogFile={layout.log('slurmctld')}",
        f"SlurmdLogFile={layout.log('slurmd')}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # The node's CPUs come from this file, not the hardware: a 2-core host still runs many no-op
        # beams at once (arrays of 50 must not crawl two at a time; 64 by default).
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        f"MinJobAge={MIN_JOB_AGE_S}",
        # scancel: SIGTERM, then SIGKILL after KillWait; 30 s by default is a long test.
        "KillWait=5",
        "InactiveLimit=0",
        # Schedule every second (default 60 s main loop, 30 s backfill): measured here, 20 single jobs
        # drain in 0.5 s instead of 5.8 s, 50 array tasks in 1.2 s instead of 6 s (with 64 CPUs).
        "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=0",
        "GresTypes=gpu" if saved.gpus else "",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={saved.cpus} RealMemory={real_mb}{gres_node} State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def write_config(layout: Layout, saved: Saved) -> None:
    """slurm.conf, gres.conf and the fake GPU devices (character devices: Slurm rejects files)."""
    for folder in (layout.etc, layout.statesave, layout.spool, layout.run, layout.logs, layout.dev):
        folder.mkdir(parents=True, exist_ok=True)
    free_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    layout.slurm_conf.write_text(_slurm_conf(layout, saved, real_mb=max(256, min(4096, free_mb // 4))))
    if saved.gpus:
        for index in range(saved.gpus):
            device = layout.dev / f"fakegpu{index}"
            if not device.exists():
                # Major 1 minor 3 is /dev/null: a harmless device Slurm accepts as a GPU file.
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))
        files = f"{layout.dev}/fakegpu[0-{saved.gpus - 1}]"
        layout.gres_conf.write_text(f"AutoDetect=off\nNodeName={saved.node} Name=gpu File={files}\n")


def slurm_env(layout: Layout) -> dict[str, str]:
    """The environment of Slurm's daemons and of every client command aimed at this cluster."""
    return {**os.environ, "SLURM_CONF": str(layout.slurm_conf)}


def _ping(layout: Layout) -> bool:
    done = subprocess.run(
        ["scontrol", "ping"], env=slurm_env(layout), capture_output=True, text=True, timeout=15, check=False
    )
    return done.returncode == 0 and "UP" in done.stdout


def node_state(layout: Layout, node: str) -> str:
    """The node's state as sinfo prints it (e.g. idle, mix, down*, inval), '' when unreachable."""
    done = subprocess.run(
        ["sinfo", "--noheader", "--Node", "--nodes", node, "--format=%t"],
        env=slurm_env(layout),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else ""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _running(proc: subprocess.Popen[bytes], log: Path, offset: int) -> Callable[[], bool]:
    """Alive until the process exits or logs `fatal:` past `offset` (a Slurm daemon that logged a
    fatal error, e.g. a port taken, may take 10 s more to exit; the start fails at once instead)."""

    def alive() -> bool:
        if proc.poll() is not None:
            return False
        try:
            with log.open("rb") as text:
                text.seek(offset)
                return b"fatal:" not in text.read()
        except FileNotFoundError:
            return True

    return alive


def start_slurmctld(layout: Layout, *, timeout_s: float, clean: bool) -> None:
    """slurmctld in the foreground of its own session; `clean` (-c) drops saved jobs, a restart keeps them."""
    argv = ["/usr/sbin/slurmctld", "-D", "-f", str(layout.slurm_conf)] + (["-c"] if clean else [])
    offset = _size(layout.log("slurmctld"))
    proc = start_daemon(
        argv, pidfile=layout.pidfile("slurmctld"), log=layout.log("slurmctld.out"), env=slurm_env(layout)
    )
    port = int(scontrol_conf_value(layout, "SlurmctldPort"))
    wait_for(
        f"slurmctld listening on port {port} and answering `scontrol ping`",
        # Our own listening socket first: a ping to a port someone else took would hang 10 s.
        lambda: listening(proc.pid, port) and _ping(layout),
        timeout_s=timeout_s,
        logs=[layout.log("slurmctld"), layout.log("slurmctld.out")],
        alive=_running(proc, layout.log("slurmctld"), offset),
        interval_s=0.1,
    )


def start_slurmd(layout: Layout, saved: Saved, *, timeout_s: float) -> None:
    """slurmd for the one node, then wait until sinfo shows it idle (or mixed: jobs may run already)."""
    argv = ["/usr/sbin/slurmd", "-D", "-f", str(layout.slurm_conf), "-N", saved.node]
    offset = _size(layout.log("slurmd"))
    proc = start_daemon(
        argv, pidfile=layout.pidfile("slurmd"), log=layout.log("slurmd.out"), env=slurm_env(layout)
    )
    seen: list[str] = []

    def idle() -> bool:
        if not listening(proc.pid, saved.ports.slurmd):
            return False
        seen.append(node_state(layout, saved.node))
        return seen[-1] in ("idle", "mix", "alloc")

    try:
        wait_for(
            f"node {saved.node} idle in sinfo",
            idle,
            timeout_s=timeout_s,
            logs=[layout.log("slurmd"), layout.log("slurmd.out"), layout.log("slurmctld")],
            alive=_running(proc, layout.log("slurmd"), offset),
            interval_s=0.1,
        )
    except TestbedError as exc:
        raise TestbedError(f"{exc}\n(last node state seen: {seen[-1] if seen else '?'!r})") from None


def stop_slurm(layout: Layout) -> None:
    """slurmd first (it reports to slurmctld on the way out), then slurmctld; both by pidfile."""
    stop_pidfile(layout.pidfile("slurmd"), comm="slurmd")
    stop_pidfile(layout.pidfile("slurmctld"), comm="slurmctld")


def restart_slurmctld(layout: Layout, *, timeout_s: float) -> None:
    """Stop slurmctld and start it again on its saved state: queued and running jobs survive."""
    stop_pidfile(layout.pidfile("slurmctld"), comm="slurmctld")
    start_slurmctld(layout, timeout_s=timeout_s, clean=False)


def slurmctld_running(layout: Layout) -> bool:
    pid = read_pid(layout.pidfile("slurmctld"))
    return pid is not None and pid_alive(pid)


def check_spool_path(layout: Layout) -> None:
    # slurmstepd makes unix sockets `<spool>/<node>_<job>.<step>` (sun_path holds 108 bytes).
    if len(str(layout.spool)) > 60:
        raise TestbedError(
            f"testbed: folder {layout.root} is too long a path for slurmd's sockets; use a shorter one"
        )


def scontrol_conf_value(layout: Layout, key: str) -> str:
    """One KEY=value of this testbed's own slurm.conf."""
    for line in layout.slurm_conf.read_text().splitlines():
        name, _, value = line.partition("=")
        if name == key:
            return value
    raise TestbedError(f"testbed: {key} not in {layout.slurm_conf}")


def scontrol_value(layout: Layout, key: str) -> str:
    """One value of `scontrol show config` (e.g. MaxArraySize)."""
    done = subprocess.run(
        ["scontrol", "show", "config"],
        env=slurm_env(layout),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    for line in done.stdout.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return value.strip()
    raise TestbedError(f"testbed: {key} not in `scontrol show config` ({done.stderr.strip()[:200]})")
