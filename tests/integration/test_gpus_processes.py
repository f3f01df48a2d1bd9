"""GPU leases across real processes: stress, SIGKILLed holders, inherited leases, FIFO order.

Every child is a fresh Python process using the same lock folder, as separate workers would.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import simbridge
from simbridge.gpus import GpuPool, LeaseTimeout

pytestmark = pytest.mark.integration

SRC = str(Path(simbridge.__file__).resolve().parents[1])
REPO = str(Path(__file__).resolve().parents[2])

# One worker: lease, prove exclusivity with an O_EXCL claim file, log the interval, release.
STRESS_WORKER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from simbridge.gpus import GpuPool
    lock_dir, claims, log_path = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cycles = int(sys.argv[4])
    pool = GpuPool(slots=8, lock_dir=lock_dir, poll_interval=0.002)
    violations = 0
    lines = []
    for _ in range(cycles):
        with pool.lease(timeout=120) as lease:
            (index,) = lease.indices
            start = time.monotonic_ns()
            claim = claims / f"gpu-{index}"
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                violations += 1
            else:
                os.close(fd)
                time.sleep(0.001)  # hold a moment, so a second holder would be caught
                os.unlink(claim)
            end = time.monotonic_ns()
            lines.append(f"{index} {start} {end}\\n")
    with open(log_path, "w") as out:
        out.write(f"violations {violations}\\n")
        out.writelines(lines)
    """
)

# Hold a lease and report; optionally hand the lease's fds to a child and record it.
HOLDER = textwrap.dedent(
    """
    import subprocess, sys, time
    from pathlib import Path
    from simbridge.gpus import GpuPool
    pool = GpuPool(slots=int(sys.argv[2]), lock_dir=Path(sys.argv[1]))
    lease = pool.lease(timeout=60)
    if sys.argv[3] == "child":
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            pass_fds=lease.fds, env={**__import__("os").environ, **lease.env},
        )
        lease.record_holder(child.pid)
        print("child", child.pid, flush=True)
    print("held", ",".join(map(str, lease.indices)), flush=True)
    time.sleep(600)
    """
)

# Wait in line for one slot; on getting it, append our tag to the order file.
WAITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from simbridge.gpus import GpuPool
    pool = GpuPool(slots=1, lock_dir=Path(sys.argv[1]), poll_interval=0.002)
    with pool.lease(timeout=120):
        with open(sys.argv[2], "a") as out:
            out.write(sys.argv[3] + "\\n")
    """
)


@pytest.fixture(autouse=True)
def _no_inherited_gpu_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    # REPO too: view workers import the FAKE NVML from tests/unit/gpus/nvml_fake.py.
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + REPO + (os.pathsep + path if path else "")}
    # Pools stay inside an inherited CUDA_VISIBLE_DEVICES (slots too); the views are set per worker.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _python(code: str, *args: object, stdout: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=_env(),
        stdout=stdout,
        text=True,
    )


def _wait_for(condition: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def test_32_processes_x_200_cycles_over_8_slots_never_share(tmp_path: Path) -> None:
    lock_dir, claims = tmp_path / "locks", tmp_path / "claims"
    claims.mkdir()
    procs = [_python(STRESS_WORKER, lock_dir, claims, tmp_path / f"log-{n}", 200) for n in range(32)]
    for proc in procs:
        assert proc.wait(timeout=280) == 0
    intervals: dict[int, list[tuple[int, int]]] = {}
    cycles = 0
    for n in range(32):
        head, *rows = (tmp_path / f"log-{n}").read_text().splitlines()
        assert head == "violations 0", f"worker {n} found a GPU already claimed"
        for row in rows:
            index, start, end = map(int, row.split())
            intervals.setdefault(index, []).append((start, end))
            cycles += 1
    assert cycles == 32 * 200
    assert set(intervals) <= set(range(8))
    # CLOCK_MONOTONIC is system-wide, so intervals from different processes compare.
    for index, spans in intervals.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"GPU {index} held by two processes at once"


def test_sigkilled_holder_frees_its_gpu(tmp_path: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=tmp_path)
    holder = _python(HOLDER, tmp_path, 1, "self", stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().split() == ["held", "0"]
        (shown,) = pool.holders()
        assert shown.held and shown.pid == holder.pid
        with pytest.raises(LeaseTimeout, match=f"pids \\[{holder.pid}\\]"):
            pool.lease(timeout=0)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with pool.lease(timeout=30) as lease:
        assert lease.indices == (0,)


def test_a_child_keeps_the_gpu_after_its_orchestrator_is_killed(tmp_path: Path) -> None:
    pool = GpuPool(slots=1, lock_dir=tmp_path)
    orchestrator = _python(HOLDER, tmp_path, 1, "child", stdout=subprocess.PIPE)
    child_pid = None
    try:
        assert orchestrator.stdout is not None
        tag, pid = orchestrator.stdout.readline().split()
        assert tag == "child"
        child_pid = int(pid)
        assert orchestrator.stdout.readline().split() == ["held", "0"]
        orchestrator.send_signal(signal.SIGKILL)
        orchestrator.wait(timeout=30)
        # The child inherited the locked file description: the GPU is still held, by it.
        (shown,) = pool.holders()
        assert shown.held
        assert shown.pid == child_pid
        assert shown.pids == (orchestrator.pid, child_pid)
        with pytest.raises(LeaseTimeout):
            pool.lease(timeout=0.2)
    finally:
        if child_pid is not None:
            os.kill(child_pid, signal.SIGKILL)
        orchestrator.kill()
        orchestrator.wait(timeout=30)
    # The child was re-parented away from us; wait until the kernel has dropped its lock.
    _wait_for(lambda: not pool.holders()[0].held, "the killed child's lock to go")
    with pool.lease(timeout=30) as lease:
        assert lease.indices == (0,)


def test_processes_are_served_in_arrival_order(tmp_path: Path) -> None:
    lock_dir, order = tmp_path / "locks", tmp_path / "order"
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    blocker = pool.lease()
    waiters = []
    for n in range(5):
        waiters.append(_python(WAITER, lock_dir, order, n))
        _wait_for(lambda n=n: pool.waiting() == n + 1, f"waiter {n} to stand in line")
    blocker.release()
    for waiter in waiters:
        assert waiter.wait(timeout=60) == 0
    assert order.read_text().split() == ["0", "1", "2", "3", "4"]


def test_a_killed_waiter_does_not_block_the_line(tmp_path: Path) -> None:
    lock_dir, order = tmp_path / "locks", tmp_path / "order"
    pool = GpuPool(slots=1, lock_dir=lock_dir)
    blocker = pool.lease()
    doomed = _python(WAITER, lock_dir, order, "doomed")
    _wait_for(lambda: pool.waiting() == 1, "the doomed waiter to stand in line")
    survivor = _python(WAITER, lock_dir, order, "survivor")
    _wait_for(lambda: pool.waiting() == 2, "the survivor to stand in line")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    blocker.release()
    assert survivor.wait(timeout=60) == 0
    assert order.read_text().split() == ["survivor"]
    assert pool.waiting() == 0
    assert list((lock_dir / "queue").iterdir()) == []


# A worker with its own view of four FAKE GPUs (this machine has none): the boards NVML shows it
# (all, or a container's subset numbered from 0) and its CUDA_VISIBLE_DEVICES. It leases 1 or 2,
# claims each leased GPU by UUID (a claim left by a dead or zombie holder is stale), and loops
# until the stop file appears. A live claimant found on a leased GPU is a violation.
VIEW_WORKER = textwrap.dedent(
    """
    import os, random, sys
    from pathlib import Path
    from tests.unit.gpus.nvml_fake import board, install
    lock_dir, claims, stop, log_path = map(Path, sys.argv[1:5])
    shown, visible = sys.argv[5], sys.argv[6]
    uuids = ["GPU-0000", "GPU-1111", "GPU-2222", "GPU-3333"]
    install([board(uuids[int(n)]) for n in shown.split(",")])
    if visible != "-":
        os.environ["CUDA_VISIBLE_DEVICES"] = visible
    from simbridge.gpus import GpuPool, NvmlSource
    pool = GpuPool(source=NvmlSource(), lock_dir=lock_dir, poll_interval=0.002)

    def live(pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as status:
                return status.read().rpartition(b")")[2].split()[:1] != [b"Z"]
        except OSError:
            return False

    with open(log_path, "a") as log:
        while not stop.exists():
            count = random.choice([1, 1, 2]) if len(pool.gpus) > 1 else 1
            with pool.lease(count, timeout=120) as lease:
                held = [g.uuid for g in lease.gpus]
                assert len(set(held)) == len(held)
                for uuid in held:
                    claim = claims / uuid
                    try:
                        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        text = claim.read_text()
                        if text and live(int(text)):
                            log.write(f"violation {uuid} held by {text}\\n")
                        claim.unlink()
                        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    os.write(fd, str(os.getpid()).encode())
                    os.close(fd)
                for uuid in held:
                    (claims / uuid).unlink()
            log.write("cycle\\n")
            log.flush()
    """
)

# (boards NVML shows, CUDA_VISIBLE_DEVICES): overlapping views of the same four GPUs.
VIEWS = [
    ("0,1,2,3", "-"),
    ("2,3", "-"),  # a container: GPUs 2 and 3 are its 0 and 1
    ("0,1,2,3", "1,2"),
    ("0,1,2,3", "GPU-3333,0"),
    ("1,2,3", "0,1"),  # a container's 0,1 = GPUs 1 and 2
    ("0,1,2,3", "GPU-2222"),
    ("3,2,1,0", "-"),  # enumerated in another order
    ("1,3", "1"),  # the container's 1 = GPU 3
]


def test_16_processes_with_overlapping_views_and_sigkills_never_share_a_gpu(tmp_path: Path) -> None:
    lock_dir, claims, stop = tmp_path / "locks", tmp_path / "claims", tmp_path / "stop"
    claims.mkdir()
    chaos = random.Random(9)
    logs: list[Path] = []

    def start(slot: int) -> subprocess.Popen[str]:
        shown, visible = VIEWS[slot % len(VIEWS)]
        log = tmp_path / f"log-{slot}-{len(logs)}"
        logs.append(log)
        return _python(VIEW_WORKER, lock_dir, claims, stop, log, shown, visible)

    def cycles() -> int:
        return sum(p.read_text().count("cycle") for p in logs if p.exists())

    workers = [start(slot) for slot in range(16)]
    try:
        for kill in range(30):
            goal = cycles() + 5
            _wait_for(lambda goal=goal: cycles() >= goal, f"progress before kill {kill}", timeout=120)
            slot = chaos.randrange(len(workers))
            workers[slot].send_signal(signal.SIGKILL)
            workers[slot].wait(timeout=30)
            workers[slot] = start(slot)
        goal = cycles() + 50
        _wait_for(lambda: cycles() >= goal, "progress after the last kill", timeout=120)
    finally:
        stop.touch()
        for worker in workers:
            try:
                worker.wait(timeout=120)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=30)
    violations = [
        line for p in logs if p.exists() for line in p.read_text().splitlines() if "violation" in line
    ]
    assert violations == []
    assert all(w.returncode == 0 for w in workers), [w.returncode for w in workers]
    assert cycles() >= 200
