"""Faults of a real cluster met by the whole pipeline (a case in the inbox, a Dispatcher, the
loopback testbed's sshd + Slurm): slurmctld restarted while jobs run and pend, a remote disk that
fills (an upload that cannot fit, then `simbridge retry` once space is freed; a job whose output
fills it), hostile case and beam names through the plain-SSH executor, and ``proxy_jump`` through the
testbed's sshd to itself. Runs are counted from the job's own side (each appends its beam to
``launches``) and sbatch calls by the testbed.

Not here: a Slurm TIMEOUT. Slurm's smallest time limit is one minute and slurmctld checks limits
every PERIODIC_TIMEOUT (30 s, compiled in; no slurm.conf key changes it), so one costs 60-90 s."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest
from tests.integration.jobs.cluster_fixtures import (
    CLUSTER,
    HOSTILE_BEAMS,
    HOSTILE_CASE,
    ClusterEnv,
    results_of,
    sbatch_job_ids,
    tiny_steps,
)
from tests.integration.jobs.jobs_fixtures import wait_for
from tests.support import capture_events
from tests.testbed import Testbed
from tests.testbed._proc import free_port

from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.errors import HostUnreachableError
from simbridge.jobs.states import BeamState
from simbridge.jobs.transport.ssh_connection import SshConnection

pytestmark = pytest.mark.integration


def gated_steps(env: ClusterEnv) -> dict[str, Any]:
    """Like tiny_steps, but each job waits (on its own side) until the test creates ``gate``."""
    script = env.root / "gated.sh"
    script.write_text(
        'echo "$1" >> "$2/launches"\n'
        'i=0; while [ ! -e "$2/gate" ] && [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done\n'
        'printf "%s" "$1" > raw\n'
    )
    return {
        "prepare": None,
        "simulate": f"sh {script} {{beam_id}} {env.root}",
        "postprocess": None,
        "outputs": ["raw"],
    }


def _squeue_states(testbed: Testbed) -> dict[str, str]:
    done = subprocess.run(
        ["squeue", "-h", "--array", "-o", "%i %T"],
        env=testbed.env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return dict(line.split(maxsplit=1) for line in done.stdout.splitlines() if line.strip())


def test_slurmctld_restarted_while_jobs_run_and_pend(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path
) -> None:
    # 4 GPUs per beam on the 8-GPU node: two beams run (held at a gate), the third pends.
    names = ["b1", "b2", "b3"]
    cenv.clusters = {
        CLUSTER: testbed.cluster_settings(
            CLUSTER,
            remote_root=str(tmp_remote_root),
            # Slurm's clients retry an absent controller for about 9 s: a short command limit
            # keeps each poll of the outage short (and a hung command is itself a fault to survive).
            command_timeout_s=3.0,
            slurm={"gres": "gpu:4"},
        )
    }
    settings = cenv.configure(steps=gated_steps(cenv), executor=CLUSTER)
    cenv.make_case("restart", {b: {"plan.json": "{}"} for b in names})
    before = testbed.sbatch_calls()
    ended: list[bool] = []
    with Dispatcher(settings=settings) as dispatcher:
        store = dispatcher.store
        thread = threading.Thread(target=lambda: ended.append(dispatcher.run(until_idle=True, max_s=120)))
        thread.start()
        try:
            wait_for(
                lambda: len(cenv.lines("launches")) == 2 and all(b.hpc_job_id for b in store.beams()),
                timeout=60,
                what="two jobs running and every beam submitted",
            )
            ids = {b.key: b.hpc_job_id for b in store.beams()}
            waiting = [k for k in names if k not in cenv.lines("launches")]
            wait_for(
                lambda: _squeue_states(testbed).get(str(ids[waiting[0]])) == "PENDING",
                timeout=30,
                what="the third job pending in Slurm",
            )
            with capture_events() as events:
                testbed.stop_slurmctld()
                try:
                    wait_for(
                        lambda: any(e.get("event") == "slurm.squeue_failed" for e in events),
                        timeout=60,
                        what="the watcher to meet the absent controller",
                    )
                    # The running jobs end while the controller is away (slurmd runs them).
                    (cenv.root / "gate").touch()
                    wait_for(
                        lambda: len(list(tmp_remote_root.rglob("*.exit"))) >= 2,
                        timeout=60,
                        what="the running jobs to end without the controller",
                    )
                    wait_for(
                        lambda: sum(e.get("event") == "slurm.squeue_failed" for e in events) >= 2,
                        timeout=60,
                        what="a poll after the jobs ended, still without the controller",
                    )
                    beams = store.beams()
                    assert BeamState.FAILED not in {b.state for b in beams}, [b.last_error for b in beams]
                    shown = {b["beam"]: b["job_id"] for b in cenv.status()[0]["beams"]}
                    assert shown == ids, "a job id changed while the controller was away"
                finally:
                    testbed.start_slurmctld()
        finally:
            (cenv.root / "gate").touch()
            thread.join(timeout=150)
        assert ended == [True]
        beams = store.beams()
        assert [b.state for b in beams] == [BeamState.COMPLETED] * len(names), [b.last_error for b in beams]
        assert {b.key: b.hpc_job_id for b in beams} == ids
        for beam in beams:
            ran = [a for a in store.attempts(beam.id) if a.outcome != "unlaunched"]
            assert [(a.step, a.job_id) for a in ran] == [(BeamState.RUNNING, ids[beam.key])]
        jobs = sbatch_job_ids(store)
    assert cenv.lines("launches") == names, "a job ran twice or not at all"
    assert testbed.sbatch_calls() - before == len(jobs), "a job was submitted twice"
    assert results_of(cenv, "restart") == {b: b.encode() for b in names}


def test_upload_that_cannot_fit_fails_clearly_then_retry_completes(
    cenv: ClusterEnv, testbed: Testbed, tmpfs_remote_root: Path
) -> None:
    # Most of the 2 MB disk is taken by someone else; the big beam's plan does not fit.
    filler = tmpfs_remote_root / "someone-elses-file"
    filler.write_bytes(b"\0" * (1536 << 10))
    big = os.urandom(1 << 20)
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, "none", remote_root=str(tmpfs_remote_root))}
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER, retry={"max_attempts": 1})
    folder = cenv.make_case("full", {b: {"plan.json": "{}"} for b in ("a", "big", "c")})
    (folder / "big" / "dose.bin").write_bytes(big)
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        store = dispatcher.store
        beams = {b.key: b for b in store.beams()}
        assert beams["a"].state is BeamState.COMPLETED and beams["c"].state is BeamState.COMPLETED
        failed = beams["big"]
        assert failed.state is BeamState.FAILED, failed
        assert failed.failed_step == BeamState.UPLOADING.value
        error = failed.last_error or ""
        assert "127.0.0.1" in error and str(tmpfs_remote_root) in error, error
        assert "full" in error and "free space" in error, error
        # Nothing lost here: the beam's files are where the pipeline found them.
        assert (Path(failed.path) / "dose.bin").read_bytes() == big
        assert cenv.lines("launches") == ["a", "c"]
    filler.unlink()
    out = cenv.cli("retry", "full")
    assert "big" in out.stdout, out.stdout
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        assert {b.key: b.state for b in dispatcher.store.beams()} == dict.fromkeys(
            ("a", "big", "c"), BeamState.COMPLETED
        )
    assert cenv.lines("launches") == ["a", "big", "c"]
    assert results_of(cenv, "full") == {"a": b"a", "big": b"big", "c": b"c"}


def test_job_whose_output_fills_the_disk_fails_with_its_log_tail(
    cenv: ClusterEnv, testbed: Testbed, tmpfs_remote_root: Path
) -> None:
    script = cenv.root / "fill.sh"
    script.write_text(
        'echo "$1" >> "$2/launches"\n'
        'if [ "$1" = fill ]; then echo "dose engine: writing 3 MB of dose" >&2; '
        "head -c 3000000 /dev/zero > raw || exit 4; fi\n"
        'printf "%s" "$1" > raw\n'
    )
    steps = {
        "prepare": None,
        "simulate": f"sh {script} {{beam_id}} {cenv.root}",
        "postprocess": None,
        "outputs": ["raw"],
    }
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmpfs_remote_root))}
    settings = cenv.configure(steps=steps, executor=CLUSTER, retry={"max_attempts": 1})
    cenv.make_case("out", {"fill": {"plan.json": "{}"}})
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        [beam] = dispatcher.store.beams()
    assert beam.state is BeamState.FAILED, beam
    error = beam.last_error or ""
    assert beam.failed_step == BeamState.RUNNING.value
    # The first line (what status shows) names the exit and the full disk; the job's own stderr
    # tail follows. run.sh could not write its marker on the full disk: the code is Slurm's.
    first, _, rest = error.partition("\n")
    assert "exited 4" in first and "No space left on device" in first, error
    assert "stderr tail:" in rest and "dose engine: writing 3 MB of dose" in rest, error
    assert cenv.lines("launches") == ["fill"]


def test_hostile_names_through_the_plain_ssh_executor(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path
) -> None:
    Path.home().joinpath("pwned").unlink(missing_ok=True)  # sshd starts commands in $HOME
    cenv.clusters = {
        CLUSTER: testbed.cluster_settings(CLUSTER, "none", remote_root=str(tmp_remote_root), cleanup=True)
    }
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    cenv.make_case(HOSTILE_CASE, {b: {"plan.json": "{}"} for b in HOSTILE_BEAMS})
    before = testbed.sbatch_calls()
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        store = dispatcher.store
        beams = store.beams()
        assert [b.state for b in beams] == [BeamState.COMPLETED] * len(HOSTILE_BEAMS), [
            b.last_error for b in beams
        ]
        for beam in beams:
            [run] = [a for a in store.attempts(beam.id) if a.outcome != "unlaunched"]
            assert run.step is BeamState.RUNNING and run.executor == CLUSTER and run.pid
        case_key = store.cases()[0].key
    assert testbed.sbatch_calls() == before  # no scheduler: nothing went through Slurm
    # A name that reached a shell unquoted would have made a file named exactly "pwned" in the
    # folder that shell ran in ($HOME for sshd, the beam folder, our work area).
    assert not Path.home().joinpath("pwned").exists()
    for where in (tmp_remote_root, cenv.root):
        assert not list(where.rglob("pwned")), f"a name reached a shell unquoted (in {where})"
    # Nothing of this case went beside its remote_root (other tests' folders live there too).
    assert not [p for p in testbed.remote_root.iterdir() if "pwned" in p.name]
    # Each job ran once (it appends its beam's key from its own side).
    assert cenv.lines("launches") == sorted(b.key for b in beams)
    for beam in beams:
        assert (cenv.results / case_key / beam.key / "raw").read_bytes() == beam.key.encode()
    # cleanup: every beam folder went; nothing was written outside remote_root's case folder.
    assert sorted(p.name for p in tmp_remote_root.iterdir() if not p.name.startswith(".")) == [case_key]
    assert list((tmp_remote_root / case_key).iterdir()) == []


def test_proxy_jump_through_the_testbed_sshd_to_itself(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path
) -> None:
    jump = f"{testbed.user}@{testbed.host}:{testbed.port}"
    cenv.clusters = {
        CLUSTER: testbed.cluster_settings(CLUSTER, "none", remote_root=str(tmp_remote_root), proxy_jump=jump)
    }
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    cenv.make_case("jump", {b: {"plan.json": "{}"} for b in ("b1", "b2")})
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        beams = dispatcher.store.beams()
        assert [b.state for b in beams] == [BeamState.COMPLETED] * 2, [b.last_error for b in beams]
    assert results_of(cenv, "jump") == {"b1": b"b1", "b2": b"b2"}
    # The jump is really taken: the same host through a jump host that is not there is refused,
    # and the error names the jump (a closed port on loopback: refused at once).
    closed = free_port()
    via_nowhere = SshConnection(
        host=testbed.host,
        port=testbed.port,
        user=testbed.user,
        identity_file=testbed.identity_file,
        known_hosts=testbed.known_hosts,
        proxy_jump=f"{testbed.user}@{testbed.host}:{closed}",
        connect_timeout_s=5.0,
        reconnect_s=1.0,
    )
    with via_nowhere, pytest.raises(HostUnreachableError, match=rf"127\.0\.0\.1:{closed}.*proxy_jump"):
        via_nowhere.run("true", timeout_s=30)
