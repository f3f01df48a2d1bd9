"""The testbed's OpenSSH server on 127.0.0.1: its own host key, a client key only it accepts, a
known_hosts file for clients, Slurm's config and a counting `sbatch` in every session's environment."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

from tests.testbed._proc import (
    TestbedError,
    descendants,
    kill_and_wait,
    listening,
    pid_alive,
    read_pid,
    start_daemon,
    stop_pidfile,
    wait_for,
)
from tests.testbed.layout import Layout

SSHD = "/usr/sbin/sshd"
SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def write_keys(layout: Layout, *, port: int) -> None:
    """Host key, client key pair, authorized_keys (for root only) and known_hosts for [127.0.0.1]:port."""
    layout.ssh.mkdir(mode=0o700, parents=True, exist_ok=True)
    _keygen(layout.host_key, "simbridge-testbed-host")
    _keygen(layout.client_key, "simbridge-testbed-client")
    layout.authorized_keys.write_text(layout.client_key.with_suffix(".pub").read_text())
    host_pub = layout.host_key.with_suffix(".pub").read_text().split()
    layout.known_hosts.write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")


def write_sbatch_wrapper(layout: Layout) -> None:
    """bin/sbatch: one line per call appended to sbatch-calls.log, then the real sbatch.

    The count is taken on the cluster's side, so a test sees every submission whoever made it."""
    layout.bin.mkdir(parents=True, exist_ok=True)
    wrapper = layout.bin / "sbatch"
    # One short write per call with O_APPEND (>>): lines from concurrent calls never interleave.
    hold, held = shlex.quote(str(layout.sbatch_hold)), shlex.quote(str(layout.sbatch_held))
    wrapper.write_text(
        "#!/bin/sh\n"
        f'echo "$(date +%s.%N) $$" >> {shlex.quote(str(layout.sbatch_calls))}\n'
        f"if [ -e {hold} ]; then\n"
        f"    echo $$ >> {held}\n"
        "    _i=0\n"
        f'    while [ -e {hold} ] && [ "$_i" -lt 1200 ]; do sleep 0.1; _i=$((_i + 1)); done\n'
        "fi\n"
        'exec /usr/bin/sbatch "$@"\n'
    )
    wrapper.chmod(0o755)


def session_path(layout: Layout) -> str:
    return f"{layout.bin}:{SESSION_PATH}"


def start_sshd(layout: Layout, *, port: int, timeout_s: float) -> None:
    """sshd -D on 127.0.0.1:port; every session gets SLURM_CONF and the counting sbatch first on PATH."""
    for part in (str(layout.root),):
        if any(ch.isspace() or ch in "\"'\\" for ch in part):
            raise TestbedError(f"testbed: folder {part!r} must not hold spaces or quotes (sshd options)")
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)  # privilege separation dir
    argv = [
        SSHD,
        "-D",
        "-f",
        "/dev/null",
        "-E",
        str(layout.log("sshd")),
        "-p",
        str(port),
        "-o",
        "ListenAddress=127.0.0.1",
        "-o",
        f"HostKey={layout.host_key}",
        "-o",
        f"PidFile={layout.run / 'sshd.own.pid'}",
        "-o",
        "PermitRootLogin=prohibit-password",
        "-o",
        "PasswordAuthentication=no",
        "-o",
        "KbdInteractiveAuthentication=no",
        # Only this testbed's key, only for root: another user ("a wrong user") is refused.
        "-o",
        f"AuthorizedKeysFile={layout.ssh}/authorized_keys.%u",
        "-o",
        "AllowUsers=root",
        # The key file lives under /tmp, whose mode sshd's strict checks would reject.
        "-o",
        "StrictModes=no",
        "-o",
        "Subsystem=sftp internal-sftp",
        "-o",
        f"SetEnv=SLURM_CONF={layout.slurm_conf} PATH={session_path(layout)}",
        # Many beams open channels at once; the default 10:30:100 would refuse a burst of them.
        "-o",
        "MaxStartups=200",
        "-o",
        "MaxSessions=200",
        "-o",
        "UseDNS=no",
        "-o",
        "LogLevel=VERBOSE",
    ]
    proc = start_daemon(
        argv, pidfile=layout.pidfile("sshd"), log=layout.log("sshd.out"), env=dict(os.environ)
    )
    wait_for(
        f"sshd listening on 127.0.0.1:{port}",
        lambda: listening(proc.pid, port),
        timeout_s=timeout_s,
        logs=[layout.log("sshd"), layout.log("sshd.out")],
        alive=lambda: proc.poll() is None,
    )


def stop_sshd(layout: Layout) -> None:
    """Stop the listener and every connection it serves (open connections drop, as when a host goes
    away); commands started detached from a session (setsid nohup) are no sshd process and stay."""
    pid = read_pid(layout.pidfile("sshd"))
    if pid is not None and pid_alive(pid):
        sessions = [p for p in descendants(pid) if _is_sshd(p)]
        stop_pidfile(layout.pidfile("sshd"), comm="sshd")
        for child in sessions:
            if pid_alive(child) and _is_sshd(child):
                kill_and_wait(child, what=f"sshd session (pid {child})", timeout_s=5.0, sig=signal.SIGKILL)
    layout.pidfile("sshd").unlink(missing_ok=True)


def _is_sshd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"
    except OSError:
        return False
