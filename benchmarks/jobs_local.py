"""Orchestrator overhead per beam: 2,000 beams with a no-op simulation, SQLite and PostgreSQL.

Every beam goes the whole durable way (events, attempt rows, GPU lease, detached launch through
the exit-code wrapper, collect, all committed), with 8 GPU slots. The anchor is measured in the
same run where it installs: Parsl running the same no-op command as a bash_app on its
ThreadPoolExecutor (Parsl reports about 5 ms per task); AiiDA's ~0.25 s per process is quoted.

"child cpu" is the CPU of the launch wrappers and the simulations they ran (reaped children), per
beam: less noisy than wall time on a shared machine.

Usage: python benchmarks/jobs_local.py [--beams 2000] [--no-postgres] [--no-parsl]
                                      [--wrapper c|perl|python] [--noop COMMAND]
(--wrapper: force that launch wrapper, as on a machine without the others; default: the executor's
pick. --noop: the no-op simulation, `/bin/true` by default.)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from simbridge.config import load_settings
from simbridge.jobs.dispatcher import Dispatcher
from simbridge.jobs.inbox import take_case
from simbridge.jobs.states import BeamState
from simbridge.jobs.store import Store

# A program, as a real simulation always is: `true` alone is a shell builtin, which a launch
# through `sh -c` (simbridge before 2026-12) never exec'd while a wrapper that execs its argv does;
# comparing those would time an exec on one side only.
NOOP = "/bin/true"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def postgres() -> Iterator[str | None]:
    """A throwaway PostgreSQL server (as the postgres user); None if it cannot run here."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found or os.getuid() != 0 or shutil.which("runuser") is None:
        yield None
        return
    bindir = Path(found[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="simbridge-bench-pg-"))
    root.chmod(0o755)
    (root / "sock").mkdir()
    shutil.chown(root, "postgres")
    shutil.chown(root / "sock", "postgres")
    port = _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"]
    data = str(root / "data")
    subprocess.run(
        [*as_pg, str(bindir / "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    # Durable settings (fsync on): the benchmark measures what a real deployment would pay.
    opts = f"-k {root / 'sock'} -p {port} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_pg, str(bindir / "pg_ctl"), "-D", data, "-o", opts, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_pg, str(bindir / "pg_ctl"), "-D", data, "-m", "fast", "-w", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_simbridge(beams: int, db_url: str | None, noop: str = NOOP) -> tuple[float, float, float, float]:
    """(s to take the case, s to run every beam to COMPLETED, our CPU s meanwhile, our reaped
    children's CPU s meanwhile: the launch wrappers and the simulations they ran)."""
    with tempfile.TemporaryDirectory(prefix="simbridge-bench-") as tmp:
        root = Path(tmp)
        case = root / "incoming" / "bench"
        for i in range(beams):
            (case / f"b{i:05d}").mkdir(parents=True)
            (case / f"b{i:05d}" / "plan.json").write_text("{}")
        config = {
            "gpus": {"discovery": "slots", "slots": 8, "lock_dir": str(root / "gpus")},
            "jobs": {
                "inbox": str(root / "inbox"),
                "results": str(root / "results"),
                "work_root": str(root / "work"),
                "database_url": db_url,
                "poll_s": 0.01,
                "workers": 8,
                "steps": {"simulate": noop, "outputs": ["plan.json"]},
            },
        }
        (root / "simbridge.yaml").write_text(yaml.safe_dump(config))
        os.environ["SIMBRIDGE_CONFIG"] = str(root / "simbridge.yaml")
        settings = load_settings()
        url = settings.jobs.db_url()
        with Store(url=url) as store:
            t0 = time.perf_counter()
            take_case(store, case, work_root=settings.jobs.work_root, ready_marker=None)
            take_s = time.perf_counter() - t0
        with Dispatcher(settings=settings, watch_inbox=False) as dispatcher:
            t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu_s()
            assert dispatcher.run(until_idle=True, max_s=1800), "did not finish"
            run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
            kids_s = _children_cpu_s() - k0
            done = dispatcher.store.beams(states=[BeamState.COMPLETED])
            assert len(done) == beams, f"only {len(done)} of {beams} completed"
        if db_url is not None:
            # Leave the shared server clean for the next run.
            import sqlalchemy as sa

            engine = sa.create_engine(db_url)
            with engine.begin() as conn:
                conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
            engine.dispose()
        return take_s, run_s, cpu_s, kids_s


def run_parsl(tasks: int, command: str = NOOP) -> tuple[float, float] | None:
    """Seconds for Parsl (ThreadPoolExecutor, 8 threads) to run ``tasks`` no-op bash_apps."""
    try:
        import parsl
        from parsl.app.app import bash_app
        from parsl.config import Config
        from parsl.executors.threads import ThreadPoolExecutor
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="parsl-bench-") as tmp:
        cfg = Config(executors=[ThreadPoolExecutor(max_threads=8)], run_dir=tmp)
        parsl.load(cfg)
        try:

            @bash_app  # type: ignore[untyped-decorator]
            def noop() -> str:
                return command

            noop().result()  # warm up
            t0, c0 = time.perf_counter(), time.process_time()
            futures = [noop() for _ in range(tasks)]
            for fut in futures:
                fut.result()
            return time.perf_counter() - t0, time.process_time() - c0
        finally:
            parsl.dfk().cleanup()
            parsl.clear()


def main() -> None:
    # Quiet library logs (they would be timed too); SIGTERM still runs the cleanups below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--beams", type=int, default=2000)
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-parsl", action="store_true")
    ap.add_argument("--wrapper", choices=["c", "perl", "python"], default=None)
    ap.add_argument("--noop", default=NOOP, help="the no-op simulation command (default: /bin/true)")
    args = ap.parse_args()
    from simbridge.jobs.executors import local

    chosen = local.wrapper_command(args.wrapper)
    if args.wrapper is not None:  # every executor of this run takes it (the dispatcher makes its own)
        local.wrapper_command = lambda kind=None: chosen
    load_before = os.getloadavg()[0]  # during the run our own threads would count in it
    n = args.beams
    rows: list[tuple[str, float, float, float | None]] = []
    kids: dict[str, float] = {}
    take_s, run_s, cpu_s, kids["simbridge, SQLite (WAL)"] = run_simbridge(n, None, args.noop)
    rows.append(("simbridge, SQLite (WAL)", run_s, cpu_s, take_s))
    if not args.no_postgres:
        with postgres() as url:
            if url is None:
                print("PostgreSQL: not available here (needs root and Debian's postgresql)")
            else:
                take_s, run_s, cpu_s, kids["simbridge, PostgreSQL 15"] = run_simbridge(n, url, args.noop)
                rows.append(("simbridge, PostgreSQL 15", run_s, cpu_s, take_s))
    parsl = None if args.no_parsl else run_parsl(n, args.noop)
    if parsl is not None:
        rows.append(("Parsl ThreadPool bash_app (same no-op)", parsl[0], parsl[1], None))
    cpu = platform.processor() or platform.machine()
    print(
        f"\njobs_local: {n} beams, no-op simulation `{args.noop}`, 8 GPU slots; {os.cpu_count()} cores, {cpu}"
    )
    head = f"{'what':42} {'total s':>9} {'ms/beam':>9} {'cpu ms/beam':>12} {'take ms/beam':>13}"
    print(f"{head} {'child cpu':>10}")
    for what, total, cpu, take in rows:
        take_txt = f"{take / n * 1000:13.2f}" if take is not None else f"{'-':>13}"
        kid_txt = f"{kids[what] / n * 1000:10.2f}" if what in kids else f"{'-':>10}"
        print(f"{what:42} {total:9.2f} {total / n * 1000:9.2f} {cpu / n * 1000:12.2f} {take_txt} {kid_txt}")
    print(f"{'Parsl, reported (anchor)':42} {'':9} {5.0:9.2f}")
    print(f"{'AiiDA, reported (anchor)':42} {'':9} {250.0:9.2f}")
    if parsl is not None:
        print(f"\nsimbridge SQLite / Parsl (same run): {rows[0][1] / parsl[0]:.2f}x the time")
    print(f"launch wrapper: {' '.join(chosen)}")
    print(f"load average before the run: {load_before:.1f} ({os.cpu_count()} cores, shared)")


if __name__ == "__main__":
    main()
