"""SSH transfer benchmark: simbridge's SshTransport vs paramiko SFTP vs OpenSSH scp, same run.

Workloads: one large file (1 GB; --quick 128 MB) and many small files (500 x 100 KB; --quick
100 x 100 KB), each uploaded and downloaded, once over plain loopback and once through the
testbed's delay proxy (tests/testbed/delay_proxy.py, 20 ms round trip: a link between sites).
The sshd is the loopback testbed's (started here, stopped at the end). Each figure is the median
of --repeats runs (1 at 20 ms for the slow anchors); the ratio columns divide by simbridge's time.

simbridge's times include everything its upload/download does: the remote listing, sha256 of
every file on both sides and the verification listing; the anchors verify nothing. Files of
64 MB and more move over exec channels (ssh_stream.py: ``cat`` down, ``dd`` segments on up to 4
channels up), smaller ones over pipelined SFTP. Connection
setup is excluded for simbridge and paramiko (one connection, reused); scp pays it per call, as
it does in use. OpenSSH 9's scp speaks SFTP underneath.

Run: PYTHONPATH=src:. .venv/bin/python benchmarks/ssh_transfer.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import paramiko
from tests.testbed import Testbed
from tests.testbed.delay_proxy import delay_proxy_process

from simbridge.jobs.transport.ssh import SshConnection, SshTransport


def _known_hosts(bed: Testbed, port: int, folder: Path) -> Path:
    kh = folder / f"known_hosts_{port}"
    lines = Path(bed.known_hosts).read_text().splitlines()
    kh.write_text("".join(line.replace(f":{bed.port} ", f":{port} ") + "\n" for line in lines))
    return kh


def _make_data(root: Path, *, big_mb: int, small_n: int) -> tuple[Path, Path]:
    big = root / "big"
    big.mkdir()
    with (big / "big.bin").open("wb") as f:
        block = os.urandom(1 << 20)
        for i in range(big_mb):
            f.write(block[i % 7 :] + block[: i % 7])
    small = root / "small"
    small.mkdir()
    for i in range(small_n):
        (small / f"spot_{i:04d}.csv").write_bytes(os.urandom(100 * 1024))
    return big, small


class Methods:
    """The three ways to move a folder, all to and from the same sshd (direct or through the proxy)."""

    def __init__(self, bed: Testbed, port: int, kh: Path, remote_root: Path) -> None:
        self.bed, self.port, self.kh, self.remote_root = bed, port, kh, remote_root
        self.conn = SshConnection(
            host="127.0.0.1",
            port=port,
            user="root",
            identity_file=Path(bed.identity_file),
            known_hosts=kh,
            connect_timeout_s=30,
            command_timeout_s=600,
        ).open()
        self.sb = SshTransport(connection=self.conn, remote_root=PurePosixPath(remote_root), parallel=8)
        self.pm = paramiko.SSHClient()
        self.pm.load_host_keys(str(kh))
        self.pm.connect(
            "127.0.0.1",
            port=port,
            username="root",
            key_filename=str(bed.identity_file),
            allow_agent=False,
            look_for_keys=False,
        )
        self.sftp = self.pm.open_sftp()
        self.ssh_opts = [
            "-P",
            str(port),
            "-i",
            str(bed.identity_file),
            "-o",
            f"UserKnownHostsFile={kh}",
            "-o",
            "BatchMode=yes",
            "-q",
        ]

    def ciphers(self) -> dict[str, str]:
        conn = self.conn.call(self.conn.connection, timeout_s=30)
        t = self.pm.get_transport()
        assert t is not None
        verbose = subprocess.run(
            [
                "ssh",
                "-v",
                "-p",
                str(self.port),
                "-i",
                str(self.bed.identity_file),
                "-o",
                f"UserKnownHostsFile={self.kh}",
                "-o",
                "BatchMode=yes",
                "root@127.0.0.1",
                "true",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stderr
        scp = next(
            (
                ln.split("cipher:")[1].split()[0]
                for ln in verbose.splitlines()
                if "client->server cipher:" in ln
            ),
            "?",
        )
        return {
            "simbridge": str(conn.get_extra_info("send_cipher")),
            "paramiko": str(t.local_cipher),
            "scp": scp,
        }

    def close(self) -> None:
        self.sftp.close()
        self.pm.close()
        self.conn.close()

    # upload: local folder -> remote_root/<method>; download: remote folder -> local
    def sb_up(self, src: Path, dst: Path) -> None:
        self.sb.upload(src, PurePosixPath(dst))

    def sb_down(self, src: Path, dst: Path) -> None:
        self.sb.download(PurePosixPath(src), ["*"], dst)

    def pm_up(self, src: Path, dst: Path) -> None:
        self.sftp.mkdir(str(dst))
        for f in sorted(src.iterdir()):
            self.sftp.put(str(f), str(dst / f.name))

    def pm_down(self, src: Path, dst: Path) -> None:
        dst.mkdir()
        for name in sorted(self.sftp.listdir(str(src))):
            self.sftp.get(str(src / name), str(dst / name))

    def scp_up(self, src: Path, dst: Path) -> None:
        subprocess.run(
            ["scp", "-r", *self.ssh_opts, str(src), f"root@127.0.0.1:{dst}"], check=True, timeout=3600
        )

    def scp_down(self, src: Path, dst: Path) -> None:
        subprocess.run(
            ["scp", "-r", *self.ssh_opts, f"root@127.0.0.1:{src}", str(dst)], check=True, timeout=3600
        )


def _time(fn: Callable[[Path, Path], None], src: Path, dst: Path) -> float:
    shutil.rmtree(dst, ignore_errors=True)
    t0 = time.perf_counter()
    fn(src, dst)
    return time.perf_counter() - t0


def run_link(bed: Testbed, port: int, label: str, data: dict[str, Path], work: Path, repeats: int) -> None:
    remote = bed.new_remote_root(f"bench-{label}-{os.getpid()}")
    m = Methods(bed, port, _known_hosts(bed, port, work), remote)
    try:
        print(f"\n== {label}; ciphers: {m.ciphers()}")
        for kind, src in data.items():
            nbytes = sum(f.stat().st_size for f in src.iterdir())
            nfiles = len(list(src.iterdir()))
            print(f"-- {kind}: {nfiles} file(s), {nbytes / 1e6:.0f} MB")
            print(f"{'method':<12}{'dir':<6}{'median s':>10}{'MB/s':>9}{'files/s':>9}{'x simbridge':>13}")
            for direction in ("up", "down"):
                times: dict[str, float] = {}
                for name, prefix in (("simbridge", "sb"), ("paramiko", "pm"), ("scp", "scp")):
                    fn = getattr(m, f"{prefix}_{direction}")
                    slow = label != "loopback" and name != "simbridge" and kind == "small"
                    runs = []
                    for _ in range(1 if slow else repeats):
                        remote_dir = remote / f"{kind}-{prefix}"
                        if direction == "up":
                            runs.append(_time(fn, src, remote_dir))
                        else:
                            runs.append(_time(fn, remote_dir, work / f"down-{kind}-{prefix}"))
                    times[name] = statistics.median(runs)
                for name, s in times.items():
                    ratio = s / times["simbridge"]
                    print(
                        f"{name:<12}{direction:<6}{s:>10.3f}{nbytes / 1e6 / s:>9.1f}{nfiles / s:>9.1f}"
                        f"{ratio:>12.2f}x"
                    )
                    sys.stdout.flush()
        _where_time_goes(m, data["large"], remote / "large-sb")
    finally:
        m.close()
        shutil.rmtree(remote, ignore_errors=True)


def _where_time_goes(m: Methods, big: Path, remote_big: Path) -> None:
    """The costs simbridge adds to a plain transfer: hashing on each side and one remote command."""
    (f,) = list(big.iterdir())
    t0 = time.perf_counter()
    with f.open("rb") as fh:
        hashlib.file_digest(fh, "sha256")
    local = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.conn.run("true", timeout_s=600)
    shell = time.perf_counter() - t0
    remote = {}
    for tool in ("sha256sum --", "openssl dgst -sha256 -r"):
        t0 = time.perf_counter()
        m.conn.run(f"{tool} {shlex.quote(str(remote_big / f.name))}", timeout_s=600)
        remote[tool.split()[0]] = time.perf_counter() - t0
    print(
        f"where time goes (large file): local sha256 {local:.3f} s; one remote command (`true`) "
        f"{shell:.3f} s; remote hash command: sha256sum {remote['sha256sum']:.3f} s, "
        f"openssl {remote['openssl']:.3f} s (the transport uses openssl where the host has it)"
    )


def _openssh_version() -> str:
    return subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 MB and 100 small files, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--only", choices=["loopback", "delay"], default=None)
    args = ap.parse_args()
    big_mb, small_n = (128, 100) if args.quick else (1024, 500)
    repeats = args.repeats or (1 if args.quick else 3)
    print(
        f"simbridge ssh_transfer — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC — "
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"paramiko {paramiko.__version__}, {_openssh_version()}"
    )
    print(f"load average before: {os.getloadavg()[0]:.2f}; repeats: {repeats}")
    with tempfile.TemporaryDirectory(prefix="sb-sshxfer-", dir="/tmp", ignore_cleanup_errors=True) as tmp:
        work = Path(tmp)
        big, small = _make_data(work, big_mb=big_mb, small_n=small_n)
        data = {"large": big, "small": small}
        with Testbed.up(work / "bed") as bed:
            if args.only in (None, "loopback"):
                run_link(bed, bed.port, "loopback", data, work, repeats)
            if args.only in (None, "delay"):
                with delay_proxy_process(target_port=bed.port, rtt_s=args.rtt_ms / 1000) as port:
                    run_link(bed, port, f"{args.rtt_ms:g} ms rtt (delay proxy)", data, work, repeats)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
