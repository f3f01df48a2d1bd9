"""`simbridge clusters check` and `serve` against the loopback testbed: a healthy cluster passes; an
unknown host key and a wrong user each give a clear one-line error (exit 1, no traceback) in
`clusters check` and in `serve`, and nothing is lost (the beams wait where they were)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.integration.jobs.cluster_fixtures import CLUSTER, ClusterEnv, tiny_steps
from tests.testbed import Testbed

from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

pytestmark = pytest.mark.integration


def test_check_passes_on_the_testbed(cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path) -> None:
    cenv.clusters = {
        CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root)),
        "plain": testbed.cluster_settings("plain", "none", remote_root=str(tmp_remote_root)),
    }
    cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    out = cenv.cli("clusters", "check")
    assert "host key verified" in out.stdout
    assert "sinfo" in out.stdout and "FAIL" not in out.stdout
    assert "host tools" in out.stdout and "flock" in out.stdout
    listed = cenv.cli("clusters", "list").stdout
    assert CLUSTER in listed and "plain" in listed and "jobs.executor" in listed


@pytest.mark.parametrize("problem", ["unknown host key", "wrong user"])
def test_refused_connection_is_one_clear_error(
    cenv: ClusterEnv, testbed: Testbed, tmp_remote_root: Path, problem: str
) -> None:
    if problem == "unknown host key":
        empty = cenv.root / "known_hosts"
        empty.write_text("")
        entry = testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root), known_hosts=str(empty))
        expected = ("host key", "fingerprint")
    else:
        entry = testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root), user="daemon")
        expected = ("daemon",)
    cenv.clusters = {CLUSTER: entry}
    cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    check = cenv.cli("clusters", "check", CLUSTER, check=False)
    assert check.returncode == 1, check.stdout + check.stderr
    assert "FAIL" in check.stdout and "Traceback" not in check.stderr + check.stdout
    assert all(word in (check.stdout + check.stderr).lower() for word in expected), check.stdout

    cenv.make_case("kept", {"b1": {"plan.json": "{}"}})
    serve = cenv.cli("serve", "--until-idle", "--max-seconds", "30", check=False)
    assert serve.returncode == 1, serve.stdout + serve.stderr
    errors = [line for line in serve.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in serve.stderr, serve.stderr
    assert all(word in errors[0].lower() for word in expected), errors[0]
    # Nothing lost: the beam waits (not FAILED) and runs once the cluster lets us in.
    with Store(url=cenv.db_url) as store:
        assert [b.state for b in store.beams()] == [BeamState.PENDING]
    cenv.clusters = {CLUSTER: testbed.cluster_settings(CLUSTER, remote_root=str(tmp_remote_root))}
    settings = cenv.configure(steps=tiny_steps(cenv), executor=CLUSTER)
    with Dispatcher(settings=settings) as dispatcher:
        assert dispatcher.run(until_idle=True, max_s=60)
        assert [b.state for b in dispatcher.store.beams()] == [BeamState.COMPLETED]
