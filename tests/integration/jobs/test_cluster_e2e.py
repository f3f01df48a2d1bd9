"""The example case and small cases through a real cluster: the loopback testbed's sshd + Slurm,
and its sshd alone as a plain GPU host (scheduler: none). Results are bit-identical to the local
executor's; a failing job says why (the remote stderr tail); cancel runs scancel; hostile case and
beam names pass through every remote command; a 50-beam case goes through one job array."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

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
from tests.integration.jobs.jobs_fixtures import EXAMPLE_STEPS, JobsEnv, wait_for
from tests.support import capture_events
from tests.testbed import Testbed

from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = pytest.mark.integration


def _local_reference(root: Path) -> dict[str, bytes]:
    """The example case's raw files as the local executor produces them."""
    root.mkdir(parents=True)
    local = JobsEnv(root=root, db_url=f"sqlite:///{root / 'work' / 'simbridge.db'}")
    settings = local.configure(steps=EXAMPLE_STEPS)
    local.drop_example("ref")
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=120)
    return {b: (local.results / "ref" / b / "raw").read_bytes() for b in ("beam_1", "beam_2", "beam_3")}


@pytest.mark.parametrize("scheduler", ["slurm", "none"])
def test_example_case_on_the_cluster_matches_local(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path, tmp_path: Path, scheduler: str
) -> None:
    reference = _local_reference(tmp_path / "local")
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, scheduler, remote_root=str(tmp_remote_root))}
    settings = cenv.configure(steps=EXAMPLE_STEPS, executor=CLUSTER)
    cenv.drop_example("case-1")
    before = testbed.sbatch_calls()
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=120)
        store = dispatcher.store
        beams = store.beams()
        assert [b.state for b in beams] == [BeamState.COMPLETED] * 3, [b.last_error for b in beams]
        for beam in beams:
            [run] = [a for a in store.attempts(beam.id) if a.step is BeamState.RUNNING]
            assert run.executor == CLUSTER and run.outcome == "ok" and run.job_id
            assert beam.hpc_job_id == run.job_id
            # Uploaded into {remote_root}/{case}/{beam}/ (and kept: cleanup is off).
            assert (tmp_remote_root / "case-1" / beam.key / "moqui_tps.in").is_file()
        jobs = sbatch_job_ids(store)
    assert results_of(cenv, "case-1") == reference
    if scheduler == "slurm":
        assert testbed.sbatch_calls() - before == len(jobs)
    else:
        assert testbed.sbatch_calls() == before


def test_failing_job_fails_with_the_remote_log_tail(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path
) -> None:
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root))}
    settings = cenv.configure(steps=tiny_steps(cenv, fail="b2"), executor=CLUSTER, retry={"max_attempts": 1})
    cenv.make_case("fails", {b: {"plan.json": "{}"} for b in ("b1", "b2")})
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=90)
    [case] = cenv.status()
    states = {b["beam"]: b for b in case["beams"]}
    assert states["b1"]["state"] == "COMPLETED"
    assert states["b2"]["state"] == "FAILED"
    assert "exited 3" in states["b2"]["last_error"]
    assert "dose engine: bad plan for b2" in states["b2"]["last_error"]


def _squeue_ids(testbed: Testbed) -> set[str]:
    done = subprocess.run(
        ["squeue", "-h", "-o", "%i"],
        env=testbed.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return {line.strip() for line in done.stdout.splitlines() if line.strip()}


def test_cancel_runs_scancel(cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path) -> None:
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root))}
    settings = cenv.configure(steps=tiny_steps(cenv, sleep_s=300), executor=CLUSTER)
    cenv.make_case("long", {"b1": {"plan.json": "{}"}})
    with Dispatcher(settings=settings) as dispatcher:
        dispatcher.run(max_s=0.1)

        def submitted() -> str | None:
            dispatcher.run(max_s=0.2)
            job = dispatcher.store.beams()[0].hpc_job_id
            return job if job and cenv.lines("launches") == ["b1"] else None

        wait_for(submitted, timeout=60, what="the long job to start on the cluster")
        job = submitted()
        assert job is not None and job in _squeue_ids(testbed)
        out = cenv.cli("cancel", "long")
        assert "cancelled 1 beam(s): b1" in out.stdout
        wait_for(lambda: job not in _squeue_ids(testbed), timeout=30, what=f"scancel of job {job}")
        dispatcher.run(max_s=0.5)
        assert dispatcher.store.beams()[0].state is BeamState.CANCELLED
        assert dispatcher.store.open_attempts() == []


# Each would create a file named "pwned" (in whatever folder a shell ran it) if it ever reached a
# shell unquoted; none may contain "/" (a path separator cannot be in a folder name).


def test_hostile_names_through_every_remote_command(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path
) -> None:
    Path.home().joinpath("pwned").unlink(missing_ok=True)  # sshd starts commands in $HOME
    cenv.clusters = {
        CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root), cleanup=True)
    }
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    cenv.make_case(HOSTILE_CASE, {b: {"plan.json": "{}"} for b in HOSTILE_BEAMS})
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=90)
        beams = dispatcher.store.beams()
        assert [b.state for b in beams] == [BeamState.COMPLETED] * len(HOSTILE_BEAMS), [
            b.last_error for b in beams
        ]
        case_key = dispatcher.store.cases()[0].key
    for where in (Path.home(), tmp_remote_root, cenv.root):
        assert not list(where.rglob("pwned")), f"a name reached a shell unquoted (in {where})"
    for beam in beams:
        assert (cenv.results / case_key / beam.key / "raw").read_bytes() == beam.key.encode()
    # cleanup: every beam folder went; nothing was ever written outside remote_root's case folder.
    # (hidden: the executor's own folders, e.g. job-array logs)
    assert sorted(p.name for p in tmp_remote_root.iterdir() if not p.name.startswith(".")) == [case_key]
    assert list((tmp_remote_root / case_key).iterdir()) == []


def test_fifty_beams_through_a_job_array(cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path) -> None:
    names = [f"b{i:02d}" for i in range(50)]
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root))}
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER, workers=8)
    cenv.make_case("fifty", {b: {"plan.json": "{}"} for b in names})
    before = testbed.sbatch_calls()
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=120)
        store = dispatcher.store
        assert {b.state for b in store.beams()} == {BeamState.COMPLETED}
        arrays = sbatch_job_ids(store)
        ids = [b.hpc_job_id for b in store.beams()]
    assert all(i is not None for i in ids), ids
    # Each array element keeps its {jobid}_{index}. A beam whose upload ended after the others'
    # array went out (the gather waits at most ARRAY_GATHER_S) may go alone: below array_min
    # ready beams a job is its own, so a lone straggler is a plain job id (seen under load).
    elements = [i for i in ids if i is not None and "_" in i]
    assert len(elements) >= len(names) - 5, ids
    calls = testbed.sbatch_calls() - before
    assert calls == len(arrays) and calls <= 10, f"{calls} sbatch calls for 50 beams"
    assert cenv.lines("launches") == names
    with Store(url=cenv.db_url) as store:
        assert store.open_attempts() == []


def test_sshd_down_mid_run_is_waited_out(cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path) -> None:
    names = ["b1", "b2"]
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root))}
    settings = cenv.configure(steps=tiny_steps(cenv, sleep_s=1.0), executor=CLUSTER)
    cenv.make_case("drop", {b: {"plan.json": "{}"} for b in names})
    ended: list[bool] = []
    with Dispatcher(settings=settings) as dispatcher:
        thread = threading.Thread(target=lambda: ended.append(dispatcher.run(until_idle=True, max_s=120)))
        thread.start()
        try:
            wait_for(lambda: cenv.lines("launches"), timeout=60, what="a job running on the cluster")
            with capture_events() as events:
                testbed.stop_sshd()
                try:
                    # Every job ends on the cluster while serve cannot reach it, and serve has
                    # failed to ask (a poll or a step met the closed port): then sshd returns.
                    wait_for(
                        lambda: len(list(tmp_remote_root.rglob("*.exit"))) >= len(names),
                        timeout=60,
                        what="the jobs to end on the cluster",
                    )
                    wait_for(
                        lambda: any("connect" in str(e.get("error", "")) for e in events),
                        timeout=60,
                        what="serve to meet the closed sshd",
                    )
                    # Nothing failed meanwhile: the beams wait.
                    assert BeamState.FAILED not in {b.state for b in dispatcher.store.beams()}
                finally:
                    testbed.start_sshd()
        finally:
            thread.join(timeout=150)
        assert ended == [True]
        assert [b.state for b in dispatcher.store.beams()] == [BeamState.COMPLETED] * len(names)
    assert cenv.lines("launches") == names
