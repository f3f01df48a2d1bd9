"""No-op beams through a real Slurm (the loopback testbed) via sshd: simbridge's Slurm executor vs submitit.

Run from the repository root (as root, the testbed needs it):

    PYTHONPATH=src:. python benchmarks/slurm_pipeline.py [--beams 500] [--e2e 100]

It starts the loopback testbed (tests/testbed: slurmctld + slurmd + sshd on 127.0.0.1), then measures

- submit rate, beams/s: one sbatch per beam vs one job array for all beams (simbridge through
  sshd; throttle raised out of the way, ``submit_per_s`` is a site limit, not a cost);
- the cost of one poll (one fresh look: squeue for all, markers for the ended) for 10 / 100 / 500 jobs;
- end to end per beam (submit, run, see it ended): simbridge single jobs and an array through sshd,
  against submitit driving the same Slurm from this machine (sbatch/sacct locally; submitit's own
  job also starts a Python interpreter to run the pickled no-op).

Prints the medians and ratios; results go in benchmarks/RESULTS.md by hand.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from simbridge.config import ClusterSettings
from simbridge.jobs.executors import JobRef, JobStatus, LaunchSpec
from simbridge.jobs.executors.slurm import SlurmExecutor
from simbridge.jobs.transport.ssh_connection import SshConnection

DEADLINE_S = 600.0


def noop() -> int:
    """submitit's payload."""
    return 0


def specs(root: Path, logs: Path, tag: str, count: int) -> list[LaunchSpec]:
    out = []
    for i in range(count):
        cwd = root / tag / f"b{i:04d}"
        cwd.mkdir(parents=True, exist_ok=True)
        out.append(
            LaunchSpec(
                token=f"sb-{uuid.uuid4().hex}",
                argv=("true",),
                cwd=cwd,
                log_prefix=logs / tag / f"b{i:04d}" / "running-1",
            )
        )
    return out


def wait_all(ex: SlurmExecutor, refs: Sequence[JobRef]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while True:
        infos = ex.poll(refs)
        if all(i.status is not JobStatus.RUNNING for i in infos.values()):
            bad = [i for i in infos.values() if i.code != 0]
            if bad:
                raise SystemExit(f"{len(bad)} job(s) failed, e.g. {bad[0]}")
            return
        if time.monotonic() > deadline:
            raise SystemExit("jobs did not end in time")
        time.sleep(0.05)


def refs_of(items: Sequence[LaunchSpec], ids: Sequence[str]) -> list[JobRef]:
    return [JobRef(token=s.token, log_prefix=s.log_prefix, job_id=j) for s, j in zip(items, ids, strict=True)]


def run_simbridge(
    ex: SlurmExecutor, root: Path, logs: Path, tag: str, count: int, *, array: bool
) -> tuple[float, float]:
    """(submit seconds, end-to-end seconds) for ``count`` no-op beams."""
    items = specs(root, logs, tag, count)
    start = time.perf_counter()
    if array:
        launched = ex.submit_many(items)
        ids = [getattr(x, "job_id") for x in launched]  # noqa: B009 (a LaunchError has none: fail loudly)
    else:
        ids = [ex.submit(s).job_id for s in items]
    submitted = time.perf_counter() - start
    wait_all(ex, refs_of(items, ids))
    return submitted, time.perf_counter() - start


def poll_costs(ex: SlurmExecutor, root: Path, logs: Path) -> dict[int, float]:
    """Median seconds of one fresh poll for 10/100/500 jobs (held pending, then released)."""
    items = specs(root, logs, "poll", 500)
    ids = [getattr(x, "job_id") for x in ex.submit_many(items)]  # noqa: B009
    refs = refs_of(items, ids)
    costs = {}
    for n in (10, 100, 500):
        times = []
        for _ in range(7):
            ex.watcher.invalidate()
            t = time.perf_counter()
            ex.poll(refs[:n])
            times.append(time.perf_counter() - t)
        costs[n] = statistics.median(times)
    wait_all(ex, refs)
    return costs


def run_submitit(folder: Path, count: int, *, array: bool) -> tuple[float, float]:
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), python=sys.executable)
    executor.update_parameters(time=10, use_srun=False)
    start = time.perf_counter()
    if array:
        jobs = executor.map_array(lambda _i: 0, range(count))
    else:
        jobs = [executor.submit(noop) for _ in range(count)]
    submitted = time.perf_counter() - start
    for job in jobs:
        job.result()
    return submitted, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=500, help="beams for the submit-rate and array runs")
    parser.add_argument("--e2e", type=int, default=100, help="beams for the single-job end-to-end runs")
    args = parser.parse_args()
    from tests.testbed.core import Testbed

    base = Path(tempfile.mkdtemp(prefix="sbbench-"))
    bed = Testbed.up(base)
    try:
        for key, value in bed.env().items():
            if key in {"SLURM_CONF", "PATH"}:
                os.environ[key] = value  # submitit drives the same cluster locally
        root = Path(bed.remote_root) / "bench"
        logs = base / "logs"
        entry = bed.cluster_settings("bench", remote_root=str(root))
        entry["slurm"] = {"submit_per_s": 10_000, "array_min": 2}
        entry["poll_s"] = 0.05
        settings = ClusterSettings.model_validate(entry)
        print(
            f"simbridge slurm_pipeline benchmark — {time.strftime('%Y-%m-%d %H:%M')} — "
            f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        )
        print(f"Slurm testbed through sshd 127.0.0.1:{bed.port}; load average {os.getloadavg()[0]:.2f}")
        with SshConnection.from_settings(settings, name="bench") as conn:
            ex = SlurmExecutor(name="bench", settings=settings, runner=conn)
            single_sub, single_e2e = run_simbridge(ex, root, logs, "single", args.e2e, array=False)
            array_sub, array_e2e = run_simbridge(ex, root, logs, "array", args.beams, array=True)
            costs = poll_costs(ex, root, logs)
        sub_single, sub_e2e = run_submitit(base / "submitit", args.e2e, array=False)
        sub_arr_sub, sub_arr_e2e = run_submitit(base / "submitit-array", args.beams, array=True)
    finally:
        bed.down()

    print("\nsubmit rate (beams/s)")
    print(f"  simbridge single jobs ({args.e2e})   {args.e2e / single_sub:9.1f}")
    print(f"  simbridge job array ({args.beams})    {args.beams / array_sub:9.1f}")
    print(f"  submitit submit ({args.e2e})          {args.e2e / sub_single:9.1f}")
    print(f"  submitit map_array ({args.beams})     {args.beams / sub_arr_sub:9.1f}")
    print("\none poll (fresh look), median of 7")
    for n, cost in costs.items():
        print(f"  {n:4d} jobs  {cost * 1000:8.1f} ms   ({cost / costs[10]:.2f}x the 10-job poll)")
    print("\nend to end per beam (submit .. seen ended), ms")
    per = {
        "simbridge single": single_e2e / args.e2e,
        "submitit single": sub_e2e / args.e2e,
        "simbridge array": array_e2e / args.beams,
        "submitit map_array": sub_arr_e2e / args.beams,
    }
    for name, value in per.items():
        print(f"  {name:20s} {value * 1000:8.1f}")
    print(f"  ratio single  simbridge/submitit {per['simbridge single'] / per['submitit single']:.2f}x")
    print(f"  ratio arrays  simbridge/submitit {per['simbridge array'] / per['submitit map_array']:.2f}x")


if __name__ == "__main__":
    main()
