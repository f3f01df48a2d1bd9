"""The dispatcher's remote path with the login node on this host: the testbed's real Slurm reached
through a LocalRunner (bash here, SLURM_CONF of the testbed) and a LocalTransport into remote_root.
The SSH layer is left out on purpose, so these say whether the wiring itself (arrays, adoption,
cancel, status of the scheduler) is right; test_cluster_e2e.py runs the same through sshd."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tests.integration.jobs.cluster_fixtures import CLUSTER, ClusterEnv, sbatch_job_ids, tiny_steps
from tests.testbed import Testbed

from simbridge.config import ClusterSettings
from simbridge.jobs.clusters import Cluster, Clusters
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.executors.slurm import SlurmExecutor
from simbridge.jobs.states import BeamState
from simbridge.jobs.transport import LocalRunner, LocalTransport

pytestmark = pytest.mark.integration


def local_login(testbed: Testbed) -> Any:
    """A cluster builder: the testbed's Slurm, its login node being this host."""
    extra = {"SLURM_CONF": str(testbed.slurm_conf), "PATH": testbed.env()["PATH"]}

    def build(name: str, settings: ClusterSettings, _store: Any) -> Cluster:
        runner = LocalRunner(env=extra)
        return Cluster(
            name=name,
            settings=settings,
            runner=runner,
            transport=LocalTransport(root=Path(str(settings.remote_root))),
            executor=SlurmExecutor(name=name, settings=settings, runner=runner),
        )

    return build


@pytest.mark.parametrize("arrays", [True, False])
def test_beams_run_on_slurm_through_the_dispatcher(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path, arrays: bool
) -> None:
    names = ["b1", "b2", "b3", "b4"]
    cenv.clusters = {
        CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root), slurm={"arrays": arrays})
    }
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    cenv.make_case("c", {b: {"plan.json": "{}"} for b in names})
    before = testbed.sbatch_calls()
    clusters = Clusters(settings=settings, builder=local_login(testbed))
    with Dispatcher(settings=settings, clusters=clusters) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        store = dispatcher.store
        beams = store.beams()
        assert [b.state for b in beams] == [BeamState.COMPLETED] * len(names), [b.last_error for b in beams]
        jobs = sbatch_job_ids(store)
        ids = [b.hpc_job_id or "" for b in beams]
    assert cenv.lines("launches") == names
    assert testbed.sbatch_calls() - before == len(jobs)
    if arrays:
        assert len(jobs) == 1 and all("_" in i for i in ids), ids
    else:
        assert len(jobs) == len(names)
    for b in names:
        assert (cenv.results / "c" / b / "raw").read_text() == b
