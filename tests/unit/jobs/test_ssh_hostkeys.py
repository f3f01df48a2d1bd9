"""Host key decisions against a known_hosts file: trusted, unknown, recorded, changed."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from simbridge.jobs.errors import HostKeyError
from simbridge.jobs.transport.ssh_hostkeys import HostKeyPolicy, known_hosts_name


def _line(name: str, key: asyncssh.SSHKey) -> str:
    return f"{name} {key.export_public_key('openssh').decode().strip()}\n"


def test_policy(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    other = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    kh = tmp_path / "nested" / "known_hosts"

    strict = HostKeyPolicy(known_hosts=kh, accept_new=False)
    assert not strict.validate("h", "127.0.0.1", 2222, key)
    assert isinstance(strict.refusal, HostKeyError)
    assert key.get_fingerprint("sha256") in str(strict.refusal)
    assert "unknown host key" in str(strict.refusal) and not kh.exists()

    tofu = HostKeyPolicy(known_hosts=kh, accept_new=True)
    assert tofu.validate("h", "127.0.0.1", 2222, key)
    assert kh.read_text() == _line("[h]:2222", key)
    assert oct(kh.stat().st_mode & 0o777) == "0o600"
    assert HostKeyPolicy(known_hosts=kh, accept_new=False).validate("h", "127.0.0.1", 2222, key)
    assert HostKeyPolicy(known_hosts=kh, accept_new=False).host_key_algs("h", 2222) == ["ssh-ed25519"]

    changed = HostKeyPolicy(known_hosts=kh, accept_new=True)
    assert not changed.validate("h", "127.0.0.1", 2222, other)
    message = str(changed.refusal)
    assert "CHANGED" in message and other.get_fingerprint("sha256") in message
    assert key.get_fingerprint("sha256") in message and "ssh-keygen -R" in message
    assert kh.read_text() == _line("[h]:2222", key)  # nothing recorded


def test_port_22_and_names(tmp_path: Path) -> None:
    key = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
    kh = tmp_path / "kh"
    kh.write_text(_line("gw.example", key))
    assert known_hosts_name("gw.example", 22) == "gw.example"
    assert known_hosts_name("gw.example", 2200) == "[gw.example]:2200"
    policy = HostKeyPolicy(known_hosts=kh, accept_new=False)
    assert policy.validate("gw.example", "10.0.0.1", 22, key)
    assert not policy.validate("other.example", "10.0.0.2", 22, key)


def test_unreadable_known_hosts(tmp_path: Path) -> None:
    kh = tmp_path / "dir_not_file"
    kh.mkdir()
    with pytest.raises(HostKeyError, match="cannot read"):
        HostKeyPolicy(known_hosts=kh, accept_new=False).listed_keys("h", "h", 22)
