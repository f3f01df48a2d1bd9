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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from simbridge.config import ClusterSettings
from simbridge.jobs.executors import JobRef, JobStatus, LaunchSpec
from simbridge.jobs.executors.slurm import SlurmExecutor
from simbridge.jobs.transport import LocalRunner
from simbridge.jobs.transport.ssh_connection import SshConnection

DEADLINE_S = 600.0
WORKERS = 4  # jobs.workers default: the dispatcher submits from this many threads


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
    """(submit seconds, end-to-end seconds) for ``count`` no-op beams.

    Single jobs are submitted from WORKERS threads, as the dispatcher's step pool does.
    """
    items = specs(root, logs, tag, count)
    start = time.perf_counter()
    if array:
        launched = ex.submit_many(items)
        ids = [getattr(x, "job_id") for x in launched]  # noqa: B009 (a LaunchError has none: fail loudly)
    else:
        with ThreadPoolExecutor(WORKERS) as pool:
            ids = [x.job_id for x in pool.map(ex.submit, items)]
    submitted = time.perf_counter() - start
    wait_all(ex, refs_of(items, ids))
    return submitted, time.perf_counter() - start


def poll_costs(ex: SlurmExecutor, held: SlurmExecutor, root: Path, logs: Path) -> dict[str, float]:
    """Median seconds of one fresh poll: 10/100/500 held (pending) jobs, then 500 ended ones."""
    items = specs(root, logs, "poll", 500)
    ids = [getattr(x, "job_id") for x in held.submit_many(items)]  # noqa: B009
    refs = refs_of(items, ids)

    def median_poll(sub: Sequence[JobRef]) -> float:
        times = []
        for _ in range(7):
            ex.watcher.invalidate()
            t = time.perf_counter()
            ex.poll(sub)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    costs = {f"{n} pending": median_poll(refs[:n]) for n in (10, 100, 500)}
    array_id = ids[0].partition("_")[0]
    ex.runner.run(f"scontrol release {array_id}", timeout_s=60)
    wait_all(ex, refs)
    costs["500 ended (markers read)"] = median_poll(refs)
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
            f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}"
        )
        print(f"Slurm testbed through sshd 127.0.0.1:{bed.port}; load average {os.getloadavg()[0]:.2f}")
        held_settings = settings.model_copy(
            update={"slurm": settings.slurm.model_copy(update={"extra_args": ("--hold",)})}
        )
        runs: dict[str, tuple[int, float, float]] = {}
        with SshConnection.from_settings(settings, name="bench") as conn:
            ex = SlurmExecutor(name="bench", settings=settings, runner=conn)
            held = SlurmExecutor(name="bench", settings=held_settings, runner=conn)
            runs["simbridge ssh single"] = (
                args.e2e,
                *run_simbridge(ex, root, logs, "s1", args.e2e, array=False),
            )
            runs["simbridge ssh array"] = (
                args.beams,
                *run_simbridge(ex, root, logs, "s2", args.beams, array=True),
            )
            costs = poll_costs(ex, held, root, logs)
        local = SlurmExecutor(name="bench", settings=settings, runner=LocalRunner(env=bed.env()))
        runs["simbridge local single"] = (
            args.e2e,
            *run_simbridge(local, root, logs, "l1", args.e2e, array=False),
        )
        runs["simbridge local array"] = (
            args.beams,
            *run_simbridge(local, root, logs, "l2", args.beams, array=True),
        )
        runs["submitit single"] = (args.e2e, *run_submitit(base / "submitit", args.e2e, array=False))
        runs["submitit map_array"] = (args.beams, *run_submitit(base / "submitit-a", args.beams, array=True))
    finally:
        bed.down()

    print(f"\n{'run':26s} {'beams':>6s} {'submit/s':>9s} {'e2e ms/beam':>12s}")
    for name, (n, sub, e2e) in runs.items():
        print(f"{name:26s} {n:6d} {n / sub:9.1f} {e2e / n * 1000:12.1f}")
    print("\none poll (one fresh look), median of 7, through sshd")
    base_cost = costs["10 pending"]
    for name, cost in costs.items():
        print(f"  {name:26s} {cost * 1000:8.1f} ms   ({cost / base_cost:.2f}x the 10-job poll)")

    def per(name: str) -> float:
        n, _, e2e = runs[name]
        return e2e / n

    print("\nend to end per beam, simbridge / submitit (same Slurm, same machine)")
    for mine, theirs in (
        ("simbridge local single", "submitit single"),
        ("simbridge ssh single", "submitit single"),
        ("simbridge local array", "submitit map_array"),
        ("simbridge ssh array", "submitit map_array"),
    ):
        print(f"  {mine:24s} / {theirs:18s} {per(mine) / per(theirs):6.2f}x")


if __name__ == "__main__":
    main()
