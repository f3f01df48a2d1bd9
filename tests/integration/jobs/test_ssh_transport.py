"""The SSH transport against the real loopback sshd of the testbed (tests/testbed)."""

from __future__ import annotations

import hashlib
import os
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from tests.testbed import Testbed
from tests.testbed.delay_proxy import delay_proxy_process

from simbridge.config import ClusterSettings
from simbridge.jobs.errors import (
    AuthError,
    ChecksumError,
    HostKeyError,
    HostUnreachableError,
    RemoteDiskFullError,
    RemotePathError,
    RemotePermissionError,
    TransferError,
    UnsafeFileError,
)
from simbridge.jobs.transport import ssh_stream
from simbridge.jobs.transport.ssh import SshConnection, SshTransport, close_all, connect
from simbridge.jobs.transport.ssh_files import Tuning

pytestmark = pytest.mark.integration

# Files of 1 MiB and more through the exec-channel streams (ssh_stream.py) instead of SFTP, uploaded
# in 1 MiB segments on channels of their own (each remote command costs a shell start: few of them).
STREAMED = Tuning(stream_min=1 << 20)
BIG_HOSTILE = "-b i'g\" $(touch PWNED);x"
HOSTILE = ["a b", "q'uote", 'd"q', "$(touch PWNED)", "ünï cödé", "-lead", "x;y|z&", "sub dir/in ner"]


def _conn(testbed: Testbed, **kw: object) -> SshConnection:
    opts: dict[str, object] = {
        "host": testbed.host,
        "port": testbed.port,
        "user": testbed.user,
        "identity_file": Path(testbed.identity_file),
        "known_hosts": Path(testbed.known_hosts),
        "connect_timeout_s": 10.0,
        "reconnect_s": 30.0,
    }
    opts.update(kw)
    return SshConnection(**opts)  # type: ignore[arg-type]


def _known_hosts_for(testbed: Testbed, port: int, tmp_path: Path) -> Path:
    """The testbed's host key listed for another port (the proxy's: known_hosts names host AND port)."""
    kh = tmp_path / "known_hosts_proxy"
    lines = Path(testbed.known_hosts).read_text().splitlines()
    kh.write_text("".join(line.replace(f":{testbed.port} ", f":{port} ") + "\n" for line in lines))
    return kh


@pytest.fixture
def conn(testbed: Testbed) -> Iterator[SshConnection]:
    with _conn(testbed) as c:
        yield c


def _tree(root: Path, names: list[str], size: int = 3000) -> dict[str, bytes]:
    out = {}
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = hashlib.sha256(f"{name}{i}".encode()).digest() * (size // 32) + name.encode()
        path.write_bytes(data)
        out[name] = data
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".sb-part.")
    }


@pytest.mark.parametrize("tuning", [Tuning(), STREAMED], ids=["sftp", "streamed"])
def test_round_trip_hostile_names(
    conn: SshConnection, tmp_remote_root: Path, tmp_path: Path, tuning: Tuning
) -> None:
    local = tmp_path / "in"
    want = _tree(local, HOSTILE)
    # Several 1 MiB segments (streamed: on channels of their own), and a file of no bytes.
    want[BIG_HOSTILE] = os.urandom((3 << 20) + 5)
    (local / BIG_HOSTILE).write_bytes(want[BIG_HOSTILE])
    want["empty"] = b""
    (local / "empty").write_bytes(b"")
    t = SshTransport(connection=conn, remote_root=PurePosixPath(tmp_remote_root), parallel=4, tuning=tuning)
    remote = t.beam_dir("case-1", "beam-1")
    report = t.upload_tree(local, remote)
    assert (report.files, report.sent, report.skipped) == (len(want), len(want), 0)
    assert _files(Path(remote)) == want
    assert not list(Path(remote).rglob(".sb-part.*"))
    got = t.download(remote, ["*", "sub dir/*"], tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in got) == sorted(want)
    assert _files(tmp_path / "out") == want
    # Nothing ran: no PWNED anywhere the remote shell could have created it.
    assert not list(Path(tmp_remote_root).rglob("PWNED*"))
    assert not (Path.home() / "PWNED").exists()
    with pytest.raises(TransferError, match="not found"):
        t.download(remote, ["*.nothing"], tmp_path / "out2")


def test_resume_skips_matching_files(conn: SshConnection, tmp_remote_root: Path, tmp_path: Path) -> None:
    local = tmp_path / "in"
    _tree(local, [f"spot{i}.csv" for i in range(6)] + ["moqui_tps.in"])
    t = SshTransport(connection=conn, remote_root=PurePosixPath(tmp_remote_root))
    remote = t.beam_dir("c", "b")
    assert t.upload_tree(local, remote).sent == 7
    (local / "spot2.csv").write_bytes(b"changed")  # another size
    (Path(remote) / "spot4.csv").write_bytes(b"x" * 3000 + b"spot4.csv")  # same size, other bytes
    (Path(remote) / "spot5.csv").unlink()
    (Path(remote) / ".sb-part.0123").write_bytes(b"left by a killed upload")
    report = t.upload_tree(local, remote)
    assert (report.sent, report.skipped) == (3, 4)
    assert _files(Path(remote)) == _files(local)
    assert not list(Path(remote).glob(".sb-part.*"))
    assert t.upload(local, remote) == 7
    assert t.upload_tree(local, remote).sent == 0


def test_sshd_killed_mid_upload(testbed: Testbed, tmp_remote_root: Path, tmp_path: Path) -> None:
    local = tmp_path / "in"
    want = _tree(local, [f"f{i:02d}" for i in range(8)], size=768 * 1024)
    # Through a 20 ms delay proxy with small windows, so the upload is still running when sshd dies.
    with delay_proxy_process(target_port=testbed.port, rtt_s=0.02) as port:
        kh = _known_hosts_for(testbed, port, tmp_path)
        c = _conn(testbed, port=port, known_hosts=kh)
        t = SshTransport(
            connection=c, remote_root=PurePosixPath(tmp_remote_root), parallel=2, tuning=Tuning(32768, 4)
        )
        remote = t.beam_dir("c", "b")
        result: list[object] = []
        worker = threading.Thread(target=lambda: result.append(t.upload_tree(local, remote)))
        worker.start()
        deadline = time.monotonic() + 20
        while not (Path(remote).is_dir() and any(Path(remote).iterdir())):
            assert time.monotonic() < deadline, "upload never started"
            time.sleep(0.01)
        testbed.stop_sshd()
        testbed.start_sshd()
        worker.join(60)
        assert not worker.is_alive()
        assert result and getattr(result[0], "files", None) == len(want)
        assert c.connects >= 2
        c.close()
    assert _files(Path(remote)) == want


@pytest.mark.parametrize("tuning", [Tuning(), STREAMED], ids=["sftp", "streamed"])
def test_corrupted_remote_output(
    conn: SshConnection, tmp_remote_root: Path, tmp_path: Path, tuning: Tuning
) -> None:
    t = SshTransport(connection=conn, remote_root=PurePosixPath(tmp_remote_root), tuning=tuning)
    remote = t.beam_dir("c", "b")
    Path(remote).mkdir(parents=True)
    raw = Path(remote) / "raw"
    good, bad = b"good" * (300 << 10), b"bad!" * (300 << 10)  # 1.2 MB: streamed with STREAMED
    raw.write_bytes(good)

    def corrupt_once(name: str, attempt: int) -> None:
        raw.write_bytes(bad if attempt == 0 else good)

    t.before_fetch = corrupt_once
    (got,) = t.download(remote, ["raw"], tmp_path / "ok")
    assert got.read_bytes() == good

    t.before_fetch = lambda name, attempt: raw.write_bytes(bad)
    raw.write_bytes(good)
    with pytest.raises(ChecksumError, match="sha256"):
        t.download(remote, ["raw"], tmp_path / "bad")
    assert not [p for p in (tmp_path / "bad").rglob("*") if p.is_file()]


def test_host_keys(testbed: Testbed, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    with pytest.raises(HostKeyError, match=r"unknown host key .*SHA256:"):
        _conn(testbed, known_hosts=kh).open()
    with _conn(testbed, known_hosts=kh, accept_new_host_keys=True) as c:
        assert c.run("echo ok", timeout_s=10).stdout == b"ok\n"
    assert f"[127.0.0.1]:{testbed.port} ssh-ed25519" in kh.read_text()
    with _conn(testbed, known_hosts=kh) as c:  # recorded: trusted now
        assert c.run("true", timeout_s=10).ok
    other = tmp_path / "otherkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh.write_text(f"[127.0.0.1]:{testbed.port} {other.with_suffix('.pub').read_text()}")
    with pytest.raises(HostKeyError, match=r"CHANGED .*SHA256:"):
        _conn(testbed, known_hosts=kh, accept_new_host_keys=True).open()


def test_wrong_user_and_closed_port(testbed: Testbed) -> None:
    with pytest.raises(AuthError, match="daemon"):
        _conn(testbed, user="daemon").open()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(HostUnreachableError, match=str(free)):
        _conn(testbed, port=free, connect_timeout_s=1.0).open()


def test_read_only_remote(testbed: Testbed, conn: SshConnection, tmp_path: Path) -> None:
    folder = testbed.mount_tmpfs(size="1m")
    try:
        t = SshTransport(connection=conn, remote_root=PurePosixPath(folder))
        remote = t.beam_dir("c", "b")
        Path(remote).mkdir(parents=True)
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True, timeout=30)
        _tree(tmp_path / "in", ["a"])
        with pytest.raises(RemotePermissionError, match="Read-only"):
            t.upload(tmp_path / "in", remote)
        with pytest.raises(RemotePermissionError, match="Read-only"):
            t.upload(tmp_path / "in", t.beam_dir("c", "new"))
    finally:
        testbed.unmount(folder)


def test_an_upload_that_cannot_fit_is_refused_before_a_byte_is_written(
    conn: SshConnection, tmpfs_remote_root: Path, tmp_path: Path
) -> None:
    # Its partial files would fill the host's disk for everyone (other beams' jobs write there).
    local = tmp_path / "in"
    _tree(local, ["small"], size=1000)
    (local / "big").write_bytes(os.urandom(3 << 20))
    t = SshTransport(connection=conn, remote_root=PurePosixPath(tmpfs_remote_root))
    before = os.statvfs(tmpfs_remote_root).f_bavail
    need = sum(f.stat().st_size for f in local.rglob("*") if f.is_file())
    with pytest.raises(RemoteDiskFullError, match=rf"not enough room .* bytes free, {need} needed"):
        t.upload(local, t.beam_dir("c", "b"))
    assert not [p for p in Path(tmpfs_remote_root).rglob("*") if p.is_file()]
    assert os.statvfs(tmpfs_remote_root).f_bavail == before


@pytest.mark.parametrize("tuning", [Tuning(), STREAMED], ids=["sftp", "streamed"])
def test_full_remote_disk(
    conn: SshConnection,
    tmpfs_remote_root: Path,
    tmp_path: Path,
    tuning: Tuning,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The disk fills while the files are written (another writer took the room the check saw):
    # each write's failure is judged and typed, and nothing half-written is left.
    async def room_enough(*_: object) -> None:
        return None

    monkeypatch.setattr(SshTransport, "_check_room", room_enough)
    local = tmp_path / "in"
    _tree(local, ["small"], size=1000)
    (local / "big").write_bytes(os.urandom(3 << 20))
    t = SshTransport(connection=conn, remote_root=PurePosixPath(tmpfs_remote_root), tuning=tuning)
    with pytest.raises(RemoteDiskFullError, match=r"full|free"):
        t.upload(local, t.beam_dir("c", "b"))
    # Nothing half-written is left under a final name, and the temporary ones are gone.
    assert not [p for p in Path(tmpfs_remote_root).rglob("*") if p.is_file() and p.name == "big"]
    assert not list(Path(tmpfs_remote_root).rglob(".sb-part.*"))


def test_paths_confined(conn: SshConnection, tmp_remote_root: Path, tmp_path: Path) -> None:
    root = PurePosixPath(tmp_remote_root)
    t = SshTransport(connection=conn, remote_root=root)
    with pytest.raises(RemotePathError):
        t.beam_dir("..", "x")
    with pytest.raises(RemotePathError):
        t.beam_dir("c", "../../etc")
    _tree(tmp_path / "in", ["a"])
    with pytest.raises(RemotePathError):
        t.upload(tmp_path / "in", root / ".." / "elsewhere")
    with pytest.raises(RemotePathError):
        t.download(PurePosixPath("/etc"), ["passwd"], tmp_path / "out")
    with pytest.raises(TransferError, match=r"\.\."):
        t.download(root / "c", ["../*"], tmp_path / "out")
    with pytest.raises(RemotePathError):
        t.remove(root)
    remote = t.beam_dir("c", "b")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        t.upload(tmp_path / "linked", remote)
    assert not Path(remote).exists()  # refused before anything was sent
    t.upload(tmp_path / "in", remote)
    t.remove(remote)
    assert not Path(remote).exists() and Path(tmp_remote_root).is_dir()


def test_threads_share_one_connection(testbed: Testbed, tmp_remote_root: Path, tmp_path: Path) -> None:
    settings = ClusterSettings.model_validate(
        testbed.cluster_settings("share", scheduler="none", remote_root=str(tmp_remote_root))
    )
    try:
        conn = connect(settings, name="share")
        assert connect(settings) is conn
        errors: list[BaseException] = []

        def beam(i: int) -> None:
            try:
                t = SshTransport.from_settings(settings, name="share")
                local = tmp_path / f"in{i}"
                want = _tree(local, [f"x{i}_{j}" for j in range(3)])
                remote = t.beam_dir("case", f"beam{i}")
                t.upload(local, remote)
                t.download(remote, ["x*"], tmp_path / f"out{i}")
                assert _files(tmp_path / f"out{i}") == want
                for _ in range(2):
                    assert conn.run(f"echo {i}", timeout_s=20).stdout == f"{i}\n".encode()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=beam, args=(i,)) for i in range(6)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        assert not errors, errors
        assert conn.connects == 1
    finally:
        close_all()


def test_streamed_upload_corrupted_on_the_host(
    conn: SshConnection, tmp_remote_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segment that reads back other than it was sent is sent once more, then ChecksumError;
    nothing reaches the final name while its hash differs."""
    real = ssh_stream.segment_script
    corrupt = {"left": 1}

    def flaky(tmp: PurePosixPath, start: int, length: int) -> str:
        script = real(tmp, start, length)
        if corrupt["left"] <= 0:
            return script
        corrupt["left"] -= 1
        # The host's disk flips a byte between the write and the read-back.
        flip = f"printf X | dd of={shlex.quote(str(tmp))} bs=1 seek={start} conv=notrunc 2>/dev/null; "
        return script.replace("|| exit $?; ", "|| exit $?; " + flip, 1)

    monkeypatch.setattr(ssh_stream, "segment_script", flaky)
    local = tmp_path / "in"
    local.mkdir()
    data = os.urandom((2 << 20) + 3)
    (local / "raw").write_bytes(data)
    t = SshTransport(connection=conn, remote_root=PurePosixPath(tmp_remote_root), tuning=STREAMED)
    remote = t.beam_dir("c", "b")
    assert t.upload_tree(local, remote).sent == 1
    assert (Path(remote) / "raw").read_bytes() == data
    corrupt["left"] = 99
    (local / "raw").write_bytes(data[::-1])
    with pytest.raises(ChecksumError, match="second try"):
        t.upload(local, remote)
    assert (Path(remote) / "raw").read_bytes() == data  # the old file, never a corrupted one
    assert not list(Path(remote).glob(".sb-part.*"))


def test_sshd_killed_mid_stream(testbed: Testbed, tmp_remote_root: Path, tmp_path: Path) -> None:
    """A dropped link in the middle of a streamed file: reconnect, send (fetch) it again, verified."""
    local = tmp_path / "in"
    local.mkdir()
    data = os.urandom(24 << 20)
    (local / "raw").write_bytes(data)
    with delay_proxy_process(target_port=testbed.port, rtt_s=0.02) as port:
        c = _conn(testbed, port=port, known_hosts=_known_hosts_for(testbed, port, tmp_path))
        t = SshTransport(connection=c, remote_root=PurePosixPath(tmp_remote_root), tuning=STREAMED)
        remote = t.beam_dir("c", "b")
        Path(remote).mkdir(parents=True)
        for direction in ("up", "down"):
            result: list[object] = []

            def job(direction: str = direction, result: list[object] = result) -> None:
                try:
                    if direction == "up":
                        result.append(t.upload(local, remote))
                    else:
                        result.append(t.download(remote, ["raw"], tmp_path / "out"))
                except BaseException as exc:
                    result.append(exc)

            partials = Path(remote) if direction == "up" else tmp_path / "out"
            worker = threading.Thread(target=job)
            worker.start()
            deadline = time.monotonic() + 20
            while not any(partials.glob(".sb-part.*")):
                assert time.monotonic() < deadline and worker.is_alive(), f"{direction}: never started"
                time.sleep(0.01)
            testbed.stop_sshd()
            testbed.start_sshd()
            worker.join(60)
            assert not worker.is_alive()
            assert result and not isinstance(result[0], BaseException), (direction, result)
        assert c.connects >= 3
        c.close()
    assert (Path(remote) / "raw").read_bytes() == data
    assert (tmp_path / "out" / "raw").read_bytes() == data
    assert not list(Path(remote).glob(".sb-part.*"))
