"""GpuPool lease/release latency against a plain flock anchor, in one run.

uncontended  one process, lease + release of a free slot, vs open + flock + close of one file
contended    P processes x C cycles over S slots: pool (FIFO line, any free slot) vs each process
             blocking in flock on a fixed slot file (no line, no choice of slot: the bare minimum)

Run: python benchmarks/gpu_lease.py [--cycles 2000] [--procs 16] [--slots 4]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import simbridge
from simbridge.gpus import GpuPool

SRC = str(Path(simbridge.__file__).resolve().parents[1])

POOL_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from simbridge.gpus import GpuPool
    pool = GpuPool(slots=int(sys.argv[2]), lock_dir=Path(sys.argv[1]), poll_interval=0.002)
    for _ in range(int(sys.argv[3])):
        with pool.lease(timeout=600):
            pass
    """
)

FLOCK_WORKER = textwrap.dedent(
    """
    import fcntl, os, sys
    slot = int(sys.argv[4]) % int(sys.argv[2])
    path = os.path.join(sys.argv[1], f"anchor-{slot}.lock")
    for _ in range(int(sys.argv[3])):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
    """
)


def uncontended(folder: Path, cycles: int) -> tuple[list[float], list[float]]:
    pool = GpuPool(slots=8, lock_dir=folder / "pool")
    anchor = folder / "anchor.lock"
    pool_us, flock_us = [], []
    for _ in range(cycles):
        t0 = time.perf_counter()
        with pool.lease(timeout=10):
            pass
        pool_us.append((time.perf_counter() - t0) * 1e6)
        t0 = time.perf_counter()
        fd = os.open(anchor, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.close(fd)
        flock_us.append((time.perf_counter() - t0) * 1e6)
    return pool_us, flock_us


def contended(folder: Path, code: str, procs: int, cycles: int, slots: int) -> float:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    folder.mkdir(parents=True, exist_ok=True)
    args = [str(folder), str(slots), str(cycles)]
    children = [subprocess.Popen([sys.executable, "-c", code, *args, str(n)], env=env) for n in range(procs)]
    t0 = time.perf_counter()
    for child in children:
        if child.wait(timeout=600) != 0:
            raise SystemExit(f"a {procs}-process worker failed")
    # Interpreter start-up is in both numbers alike; the difference is the locking.
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=2000)
    parser.add_argument("--procs", type=int, default=16)
    parser.add_argument("--proc-cycles", type=int, default=200)
    parser.add_argument("--slots", type=int, default=4)
    args = parser.parse_args()
    # Sampled before starting: during the run the worker processes count in it too.
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        pool_us, flock_us = uncontended(folder, args.cycles)
        pool_s = contended(folder / "c-pool", POOL_WORKER, args.procs, args.proc_cycles, args.slots)
        flock_s = contended(folder / "c-flock", FLOCK_WORKER, args.procs, args.proc_cycles, args.slots)
    print(
        f"gpu_lease: {platform.machine()} {os.cpu_count()} cores, load average before the run {load}, "
        f"{datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC"
    )
    header = f"{'uncontended, us':<28}{'mean':>9}{'p50':>9}{'p99':>9}"
    print(header)
    print("-" * len(header))
    for name, values in (("GpuPool.lease+release", pool_us), ("plain flock (anchor)", flock_us)):
        ordered = sorted(values)
        p99 = ordered[int(len(ordered) * 0.99)]
        print(f"{name:<28}{statistics.fmean(values):>9.1f}{statistics.median(values):>9.1f}{p99:>9.1f}")
    ratio = statistics.median(pool_us) / statistics.median(flock_us)
    print(f"pool / anchor (p50): {ratio:.1f}x")
    total = args.procs * args.proc_cycles
    print(
        f"contended, {args.procs} procs x {args.proc_cycles} cycles over {args.slots} slots: "
        f"pool {total / pool_s:,.0f} leases/s ({pool_s:.2f} s), "
        f"plain flock {total / flock_s:,.0f} locks/s ({flock_s:.2f} s), "
        f"ratio {flock_s / pool_s:.2f}x"
    )


if __name__ == "__main__":
    main()
