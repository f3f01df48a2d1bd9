"""Host key checks of the SSH transport, against an OpenSSH ``known_hosts`` file.

A key listed for the host is trusted. An unknown host is refused with the offered key's SHA256
fingerprint in the error, unless the cluster sets ``accept_new_host_keys`` (trust on first use:
the key is appended to the file). A host that is listed with other keys than the one offered has
CHANGED its key and is refused always: that is what a man in the middle looks like.
"""

from __future__ import annotations

import ipaddress
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from simbridge.jobs.errors import HostKeyError
from simbridge.logs import get_logger

log = get_logger(__name__)
# Appends from two connections (two clusters sharing a file) must not interleave.
_APPEND_LOCK = threading.Lock()


def known_hosts_name(host: str, port: int) -> str:
    """The name a host is listed under in known_hosts (``[host]:port`` off port 22)."""
    return host if port == 22 else f"[{host}]:{port}"


@dataclass
class HostKeyPolicy:
    """Decides whether one offered host key is trusted; remembers why it refused."""

    known_hosts: Path
    accept_new: bool
    refusal: HostKeyError | None = None

    def _load(self) -> asyncssh.SSHKnownHosts | None:
        try:
            text = self.known_hosts.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HostKeyError(
                f"cannot read known_hosts {self.known_hosts}: {exc}; fix its permissions or "
                "point clusters.*.known_hosts elsewhere"
            ) from exc
        return asyncssh.import_known_hosts(text)

    def listed_keys(self, host: str, addr: str, port: int) -> list[asyncssh.SSHKey]:
        """The keys known_hosts lists for this host (by name, address and port)."""
        known = self._load()
        if known is None:
            return []
        # asyncssh's own convention: entries without a port are port 22's.
        trusted = known.match(host, addr, None if port == 22 else port)[0]
        return list(trusted)

    def host_key_algs(self, host: str, port: int) -> list[str]:
        """Algorithms of the listed keys, so the server offers the key we know (as OpenSSH does)."""
        algs: list[str] = []
        try:
            addr = str(ipaddress.ip_address(host))
        except ValueError:
            addr = ""  # a name: its address is not known before connecting
        for key in self.listed_keys(host, addr, port):
            for alg in key.sig_algorithms:
                name = alg.decode()
                if name not in algs:
                    algs.append(name)
        return algs

    def validate(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        """True if ``key`` may be used for ``host``; records the refusal otherwise."""
        listed = self.listed_keys(host, addr, port)
        fingerprint = key.get_fingerprint("sha256")
        name = known_hosts_name(host, port)
        if any(k.public_data == key.public_data for k in listed):
            return True
        if listed:
            known = ", ".join(k.get_fingerprint("sha256") for k in listed)
            self.refusal = HostKeyError(
                f"{name}: the host key CHANGED (offered {key.get_algorithm()} {fingerprint}; "
                f"{self.known_hosts} lists {known}). Someone may be intercepting the connection. "
                f"If the host was reinstalled, confirm the new fingerprint with its admin and run "
                f"`ssh-keygen -R '{name}' -f {self.known_hosts}`; accept_new_host_keys never "
                "accepts a changed key"
            )
            return False
        if not self.accept_new:
            self.refusal = HostKeyError(
                f"{name}: unknown host key {key.get_algorithm()} {fingerprint} (not in "
                f"{self.known_hosts}). Confirm the fingerprint with the host's admin, then run "
                f"`ssh-keyscan -p {port} {host} >> {self.known_hosts}` (or `ssh -p {port} {host}` "
                "once), or set accept_new_host_keys: true for this cluster"
            )
            return False
        if not self._record(name, key):
            return False
        log.info("jobs.ssh_host_key_recorded", host=name, fingerprint=fingerprint, file=str(self.known_hosts))
        return True

    def _record(self, name: str, key: asyncssh.SSHKey) -> bool:
        line = f"{name} {key.export_public_key('openssh').decode().strip()}\n"
        try:
            with _APPEND_LOCK:
                self.known_hosts.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.known_hosts, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)
        except OSError as exc:
            self.refusal = HostKeyError(
                f"{name}: cannot record the new host key in {self.known_hosts}: {exc}; fix the "
                "file's permissions or point clusters.*.known_hosts elsewhere"
            )
            return False
        return True
