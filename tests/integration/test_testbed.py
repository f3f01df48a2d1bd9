"""The loopback testbed itself: sbatch through sshd gets a job that completes, GPUs as generic
resources reach the job, the cluster side counts sbatch calls, sshd comes back with the same host key,
slurmctld restarts on its saved jobs, asyncssh sessions see Slurm's config, a tmpfs remote root fills."""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import asyncssh
import pytest
import yaml
from tests.support import wait_for
from tests.testbed import Testbed, _proc, core, sweep
from tests.testbed.__main__ import main as cli_main
from tests.testbed.delay_proxy import DelayProxy, delay_proxy_process
from tests.testbed.layout import Ports, Saved

from simbridge.config import ClusterSettings

pytestmark = pytest.mark.integration


def _job_state(testbed: Testbed, job_id: str) -> str:
    shown = subprocess.run(
        ["scontrol", "show", "job", job_id],
        env=testbed.env(),
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    found = [word for word in shown.stdout.split() if word.startswith("JobState=")]
    return found[0].removeprefix("JobState=") if found else ""


def _sbatch(testbed: Testbed, folder: Path, script: str) -> str:
    command = f"sbatch --parsable --chdir={folder} --output={folder}/slurm-%j.out {script}"
    done = testbed.ssh(command)
    job_id = done.stdout.strip().split(";")[0]
    assert job_id.isdigit(), done
    return job_id


def test_sbatch_through_sshd_runs_jobs_with_gpus_and_counts_calls(
    testbed: Testbed, tmp_remote_root: Path
) -> None:
    before = testbed.sbatch_calls()
    plain = _sbatch(testbed, tmp_remote_root, "--wrap true")
    gpus = _sbatch(
        testbed, tmp_remote_root, "--gres=gpu:2 --wrap 'echo \"$CUDA_VISIBLE_DEVICES\" > gpus.txt'"
    )
    # The wrapper first on the session's PATH counted both, on the cluster's side.
    assert testbed.sbatch_calls() == before + 2
    for job_id in (plain, gpus):
        wait_for(
            lambda job_id=job_id: _job_state(testbed, job_id) == "COMPLETED",  # type: ignore[misc]
            timeout=30,
            what=f"job {job_id} COMPLETED",
        )
    visible = (tmp_remote_root / "gpus.txt").read_text().strip().split(",")
    assert len(visible) == 2 and all(index.isdigit() for index in visible)


def test_sshd_stopped_and_started_keeps_port_and_host_key(testbed: Testbed, tmp_remote_root: Path) -> None:
    opened = tmp_remote_root / "opened"
    session = subprocess.Popen(testbed.ssh_argv(f"touch {opened}; exec sleep 60"), stdout=subprocess.DEVNULL)
    try:
        wait_for(opened.exists, timeout=30, what="an ssh session open")
        testbed.stop_sshd()
        # An open connection drops with the server (exit 255), as when a host goes away.
        assert session.wait(timeout=30) == 255
        assert testbed.ssh("true", check=False).returncode == 255
    finally:
        session.kill()
        session.wait(timeout=30)
        testbed.start_sshd()  # whatever happened: the next test needs sshd
    # StrictHostKeyChecking=yes against the same known_hosts: the key did not change.
    assert testbed.ssh("echo back").stdout.strip() == "back"


def test_slurmctld_restart_keeps_queued_jobs(testbed: Testbed, tmp_remote_root: Path) -> None:
    held = _sbatch(testbed, tmp_remote_root, "--hold --wrap true")
    testbed.restart_slurmctld()
    assert _job_state(testbed, held) == "PENDING"
    subprocess.run(["scancel", held], env=testbed.env(), check=True, timeout=15)


def test_asyncssh_session_sees_slurm_and_sftp_works(testbed: Testbed, tmp_remote_root: Path) -> None:
    async def session() -> tuple[str, bytes]:
        async with asyncssh.connect(
            testbed.host,
            port=testbed.port,
            username=testbed.user,
            client_keys=[str(testbed.identity_file)],
            known_hosts=str(testbed.known_hosts),
        ) as conn:
            ran = await conn.run("echo $SLURM_CONF; command -v sbatch", check=True, timeout=30)
            async with (
                conn.start_sftp_client() as sftp,
                sftp.open(str(tmp_remote_root / "hello"), "wb") as remote,
            ):
                await remote.write(b"hello over sftp")
            return str(ran.stdout), (tmp_remote_root / "hello").read_bytes()

    text, written = asyncio.run(asyncio.wait_for(session(), timeout=60))
    assert text.split() == [str(testbed.slurm_conf), str(testbed.root / "bin" / "sbatch")]
    assert written == b"hello over sftp"


def test_other_user_refused_and_tmpfs_root_fills(testbed: Testbed, tmpfs_remote_root: Path) -> None:
    wrong = subprocess.run(
        [*testbed.ssh_argv("true")[:-2], f"daemon@{testbed.host}", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert wrong.returncode == 255
    full = testbed.ssh(f"head -c 3000000 /dev/zero > {tmpfs_remote_root}/big", check=False)
    assert full.returncode != 0 and "No space left" in full.stderr


def test_a_dead_runs_testbed_is_stopped_with_its_jobs_and_detached_processes() -> None:
    # A second testbed whose "owner" (a pytest run) died: the next run's sweep must stop it and
    # every process it made, down to a job's `sleep` and a setsid'ed command started over ssh.
    # Below a private folder: the sweep of another pytest run on this host (glob /tmp/sbtb-*) must
    # not stop this deliberately orphaned testbed while the test still uses it.
    base = Path(tempfile.mkdtemp(prefix="sbtq-"))
    root = Path(tempfile.mkdtemp(prefix=sweep.STALE_PREFIX, dir=base))
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    (root / sweep.OWNER_FILE).write_text(f"{dead.pid}\n")
    other = Testbed.up(root, gpus=0, cpus=2)
    try:
        other.ssh("setsid nohup sleep 600 >/dev/null 2>&1 </dev/null &")
        job = _sbatch(other, other.remote_root, "--wrap 'touch started; exec sleep 600'")
        started = other.remote_root / "started"
        wait_for(started.exists, timeout=30, what=f"job {job} started")
        made = sweep.ours(other.layout, ssh_port=other.port)
        assert len(made) >= 3  # the detached sleep, the job's shell or sleep, its slurmstepd
    finally:
        stopped = sweep.stop_stale(base)
        shutil.rmtree(base, ignore_errors=True)
    assert root in stopped and not root.exists()
    assert not any(_alive(pid) for pid in made)


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_delay_proxy_adds_its_round_trip_and_carries_ssh(testbed: Testbed) -> None:
    async def exchange() -> tuple[float, bytes]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.read())  # everything until the client's half-close
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        target = server.sockets[0].getsockname()[1]
        async with server, DelayProxy(target_port=target, rtt_s=0.05) as proxy:
            loop = asyncio.get_running_loop()
            started = loop.time()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            payload = bytes(range(256)) * 4096  # 1 MB: several chunks each way
            writer.write(payload)
            writer.write_eof()
            back = await reader.read()
            writer.close()
            return loop.time() - started, back if back == payload else b""

    took, back = asyncio.run(asyncio.wait_for(exchange(), timeout=30))
    assert back  # the bytes came back whole, in order, through both delayed directions
    assert took >= 0.05  # a lower bound, never flaky: the reply cannot beat the added round trip
    # sshd through a proxy process: the host key is the testbed's, checked under its usual name.
    with delay_proxy_process(target_port=testbed.port, rtt_s=0.02) as port:
        argv = testbed.ssh_argv("echo through")
        argv[argv.index(str(testbed.port))] = str(port)
        argv[1:1] = ["-o", f"HostKeyAlias=[127.0.0.1]:{testbed.port}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.stdout.strip() == "through", done.stderr


def test_cli_prints_exports_and_a_cluster_entry_simbridge_accepts(
    testbed: Testbed, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["env", str(testbed.root), "--simbridge", "tb"]) == 0
    exports = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1)
        for line in capsys.readouterr().out.splitlines()
    )
    assert exports["SLURM_CONF"] == str(testbed.slurm_conf)
    assert exports["SIMBRIDGE_JOBS__EXECUTOR"] == "tb"
    entry = ClusterSettings.model_validate(json.loads(exports["SIMBRIDGE_CLUSTERS"])["tb"])
    assert (entry.port, entry.known_hosts) == (testbed.port, testbed.known_hosts)
    assert cli_main(["yaml", str(testbed.root), "plain", "--scheduler", "none"]) == 0
    plain = yaml.safe_load(capsys.readouterr().out)["clusters"]["plain"]
    assert ClusterSettings.model_validate(plain).gpus == testbed.gpus


def test_a_port_taken_before_the_bind_is_retried_and_a_half_state_stops(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Another testbed takes slurmctld's port between our probe and slurmctld's bind: the start
    # is retried on fresh ports instead of failing.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        draws = iter([_proc.free_port(), taken])
        monkeypatch.setattr(core, "free_port", lambda **_: next(draws, None) or _real_free_port())
        root = Path(tempfile.mkdtemp(prefix=sweep.STALE_PREFIX))
        try:
            with Testbed.up(root, gpus=0, cpus=2) as started:
                assert taken not in (started.ports.slurmctld, started.ports.ssh, started.ports.slurmd)
                assert "Address already in use" in (started.logs / "slurmctld.log").read_text()
        finally:
            shutil.rmtree(root, ignore_errors=True)
    # `down` on a folder where nothing (or only part) was started stops what is there, quietly.
    Saved(ports=Ports(ssh=1, slurmctld=2, slurmd=3), node="n", cluster="c", gpus=0, cpus=1).write(
        tmp_path / "testbed.json"
    )
    Testbed.attach(tmp_path).down()


_real_free_port = _proc.free_port
