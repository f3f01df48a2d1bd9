"""The cluster factory and `clusters check` with real local parts: a LocalRunner (bash on this host)
as the cluster's command runner, real folders as remote_root."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from simbridge.config import ClusterSettings, Settings
from simbridge.jobs.clusters import BACKOFF_MAX_S, Backoff, Cluster, Clusters, is_fatal
from simbridge.jobs.clusters_cli import _df_free, check_cluster
from simbridge.jobs.errors import (
    AuthError,
    HostKeyError,
    HostUnreachableError,
    JobsConfigError,
    LaunchError,
    RemoteDiskFullError,
    RemoteError,
    RemotePathError,
)
from simbridge.jobs.executors.ssh import SshExecutor
from simbridge.jobs.remote import passing, remote_cause
from simbridge.jobs.transport import LocalRunner, LocalTransport


def _settings(root: Path, **extra: Any) -> Settings:
    entry = {"host": "127.0.0.1", "remote_root": str(root), "scheduler": "none", "gpus": 2, **extra}
    return Settings(clusters={"here": entry, "other": entry})


def _local_builder(built: list[str], closed: list[str]) -> Any:
    def build(name: str, settings: ClusterSettings, store: Any) -> Cluster:
        built.append(name)
        runner = LocalRunner()
        return Cluster(
            name=name,
            settings=settings,
            runner=runner,
            transport=LocalTransport(root=Path(str(settings.remote_root))),
            executor=SshExecutor(name=name, settings=settings, runner=runner, store=store),
            closers=[lambda: closed.append(f"{name}:runner"), lambda: closed.append(f"{name}:executor")],
        )

    return build


def test_one_cluster_per_name_shared_by_threads_and_closed_once(tmp_path: Path) -> None:
    built: list[str] = []
    closed: list[str] = []
    with Clusters(settings=_settings(tmp_path), builder=_local_builder(built, closed)) as clusters:
        got: list[Cluster] = []
        threads = [threading.Thread(target=lambda: got.append(clusters.get("here"))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(got) == 8 and all(c is got[0] for c in got)
        assert got[0].executor.name == "here"
        assert clusters.names() == ["here", "other"]
        with pytest.raises(JobsConfigError, match="'nowhere' is not in the clusters section"):
            clusters.get("nowhere")
    assert built == ["here"]
    # The executor before the connection it uses.
    assert closed == ["here:executor", "here:runner"]
    with pytest.raises(JobsConfigError, match="after the clusters were closed"):
        clusters.get("here")


def test_cluster_helpers_stay_inside_remote_root(tmp_path: Path) -> None:
    clusters = Clusters(settings=_settings(tmp_path), builder=_local_builder([], []))
    cluster = clusters.get("here")
    beam = tmp_path / "case" / "beam"
    beam.mkdir(parents=True)
    (beam / "run.err").write_text("".join(f"line {i}\n" for i in range(100)))
    assert cluster.tail(str(beam / "run.err"), lines=2) == "line 98\nline 99"
    assert cluster.tail(str(beam / "missing.err")) == ""
    assert cluster.exists(str(beam / "run.err")) and not cluster.exists(str(beam / "nope"))
    with pytest.raises(RemotePathError):
        cluster.exists("/etc/passwd")
    with pytest.raises(RemotePathError):
        cluster.remove_tree(str(tmp_path / "case" / ".." / ".."))
    cluster.remove_tree(str(beam))
    assert not beam.exists() and (tmp_path / "case").is_dir()
    clusters.close()


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    backoff = Backoff()
    delays = [backoff.failed(HostUnreachableError("x")) for _ in range(12)]
    assert delays[0] > 0 and delays == sorted(delays) and delays[-1] == BACKOFF_MAX_S
    assert backoff.waiting()
    backoff.ok()
    assert not backoff.waiting() and backoff.delay_s == 0


def test_which_remote_errors_pass_and_which_stop() -> None:
    assert is_fatal(HostKeyError("changed key")) and is_fatal(AuthError("no"))
    assert not is_fatal(HostUnreachableError("down"))
    dropped = HostUnreachableError("link dropped")
    wrapped = LaunchError("sbatch failed")
    wrapped.__cause__ = dropped
    assert remote_cause(wrapped) is dropped and passing(wrapped)
    assert passing(RemoteError("connection lost")) and passing(AuthError("no"))
    # The beam's own trouble: said on the beam, never backed off forever.
    assert not passing(RemoteDiskFullError("full")) and not passing(RemotePathError("escape"))
    assert not passing(LaunchError("bad template"))


def test_df_output_is_parsed_or_refused() -> None:
    text = "Filesystem 1024-blocks Used Available Capacity Mounted on\n/dev/x 100 40 60 40% /\n"
    assert _df_free(text) == 60 * 1024
    assert _df_free("") is None and _df_free("head\n/dev/x 1 2 lots 3% /\n") is None


def test_check_a_plain_host_here(tmp_path: Path) -> None:
    cfg = ClusterSettings(host="127.0.0.1", remote_root=str(tmp_path / "root"), scheduler="none", gpus=2)
    rows = check_cluster("here", cfg, connect=lambda _n, _c: LocalRunner())
    by = {r.check: r for r in rows}
    assert by["connect"].ok and by["remote_root writable"].ok and (tmp_path / "root").is_dir()
    assert by["free space"].ok is not False
    # No nvidia-smi here: with a configured count that is a warning, not a failure.
    assert by["gpus (nvidia-smi)"].ok in {True, None}


def test_check_says_what_is_wrong_and_how_to_fix_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    # A Slurm config sinfo refuses at once (a missing one is retried for 60 s).
    (tmp_path / "no-slurm.conf").write_text("\n")
    cfg = ClusterSettings(
        host="127.0.0.1", remote_root=str(blocker / "root"), scheduler="slurm", slurm={"partition": "gpu"}
    )
    rows = check_cluster(
        "hpc", cfg, connect=lambda _n, _c: LocalRunner(env={"SLURM_CONF": str(tmp_path / "no-slurm.conf")})
    )
    by = {r.check: r for r in rows}
    assert by["remote_root writable"].ok is False and "remote_root" in by["remote_root writable"].fix
    assert by["slurm (sinfo)"].ok is False and "sinfo" in by["slurm (sinfo)"].fix

    def refuse(_n: str, _c: ClusterSettings) -> Any:
        raise HostKeyError("[127.0.0.1]:22: unknown host key ssh-ed25519 SHA256:abc")

    [row] = check_cluster("hpc", cfg, connect=refuse)
    assert row.ok is False and "SHA256:abc" in row.result and "ssh-keyscan" in row.fix
