"""Benchmark: simbridge Blocks against multiprocessing.Queue/Pipe, 1-second polling and np.copyto.

Workloads (the original EKI coupling's): a float32 array of 1,382,400 bytes (100 x 16 x 216) and one
of 9,600 bytes (24 x 100), delivered one way from a writer process into the reader's numpy array;
and a 64-byte ping-pong round trip, with the same round trip in C on shm.h as the floor.

One-way delivery: the writer stamps time.perf_counter_ns() (CLOCK_MONOTONIC, shared by processes) into
the array's first 8 bytes just before sending; the reader subtracts it once the data sits in its array.
The writer waits for an acknowledgement and 1 ms before the next send, so a reader that parks has
parked. Methods run in interleaved rounds; each figure is the median of per-round medians.
Run: .venv/bin/python benchmarks/shm_block.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
BIG = (100, 16, 216)  # 1,382,400 bytes of float32
SMALL = (24, 100)  # 9,600 bytes
PING = (16,)  # 64 bytes
SPIN_FOREVER_US = 1_000_000  # "spin" mode: the reader never parks within a round (the max allowed)
CTX = mp.get_context("fork")


def stamp(array: np.ndarray) -> None:
    array.reshape(-1).view(np.int64)[0] = time.perf_counter_ns()


def stamped(array: np.ndarray) -> int:
    return int(array.reshape(-1).view(np.int64)[0])


# --------------------------------------------------------------------------- one-way readers


def reader_simbridge(
    name: str, shape: tuple[int, ...], n: int, spin_us: int, copy: bool, ack: Connection
) -> None:
    os.environ["SIMBRIDGE_SHM__SPIN_US"] = str(spin_us)
    from simbridge.shm import Block

    lat = []
    with Block.open(name, timeout=30) as block:
        out = np.empty(shape, np.float32)
        ack.send("ready")
        for it in range(1, n + 1):
            snap = block.read(after=it - 1, timeout=30, out=out, copy=copy)
            lat.append(time.perf_counter_ns() - stamped(snap.array))
            ack.send(None)
    ack.send(lat)


def reader_pipe(conn: Connection, shape: tuple[int, ...], n: int, ack: Connection) -> None:
    out = np.empty(shape, np.float32)
    raw = memoryview(out).cast("B")
    lat = []
    ack.send("ready")
    for _ in range(n):
        conn.recv_bytes_into(raw)  # straight into the reader's array: Pipe's best case
        lat.append(time.perf_counter_ns() - stamped(out))
        ack.send(None)
    ack.send(lat)


def reader_queue(queue: Any, shape: tuple[int, ...], n: int, ack: Connection) -> None:
    lat = []
    ack.send("ready")
    for _ in range(n):
        arr = queue.get(timeout=30)
        lat.append(time.perf_counter_ns() - stamped(arr))
        ack.send(None)
    ack.send(lat)


def reader_polling(shm_name: str, shape: tuple[int, ...], n: int, ack: Connection) -> None:
    """The design simbridge replaces: a status flag and an iteration id, polled every second."""
    shm = SharedMemory(shm_name)
    status = np.ndarray((2,), np.int64, shm.buf[:16])
    data = np.ndarray(shape, np.float32, shm.buf[64:])
    out = np.empty(shape, np.float32)
    lat = []
    ack.send("ready")
    for it in range(1, n + 1):
        while not (status[0] == 1 and status[1] >= it):
            time.sleep(1.0)
        np.copyto(out, data)
        lat.append(time.perf_counter_ns() - stamped(out))
        ack.send(None)
    ack.send(lat)
    del status, data
    shm.close()


def reader_cross_core_copy(
    shm_name: str, shape: tuple[int, ...], n: int, go: Connection, ack: Connection
) -> None:
    """The physical floor: time only np.copyto of an array the other process has just written."""
    shm = SharedMemory(shm_name)
    data = np.ndarray(shape, np.float32, shm.buf)
    out = np.empty(shape, np.float32)
    took = []
    ack.send("ready")
    for _ in range(n):
        go.recv()  # the writer has finished writing: its cache lines are modified in its core
        t0 = time.perf_counter_ns()
        np.copyto(out, data)
        took.append(time.perf_counter_ns() - t0)
        ack.send(None)
    ack.send(took)
    del data
    shm.close()


def one_way(method: str, shape: tuple[int, ...], n: int) -> list[int]:
    """Run one round of ``n`` deliveries with ``method``; return the latencies in ns."""
    src = np.random.default_rng(0).random(shape, dtype=np.float32)
    ack_r, ack_w = CTX.Pipe(duplex=False)
    send: Callable[[int], None]
    cleanup: Callable[[], None] = nothing
    if method.startswith("simbridge"):
        from simbridge.shm import Block

        copy = "view" not in method
        spin = SPIN_FOREVER_US if "spin" in method else 0
        block = Block.create(
            f"bench-{os.getpid()}-{method}", shape, np.float32, checksum="nocrc" not in method
        )
        proc = CTX.Process(target=reader_simbridge, args=(block.name, shape, n, spin, copy, ack_w))

        def send(it: int) -> None:
            with block.loan(iteration=it) as view:  # no intermediate copy: same work as publish
                np.copyto(view, src)
                stamp(view)

        send = send_publish(block, src) if "publish" in method else send
        cleanup = block.close
    elif method == "mp.Pipe":
        r, w = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=reader_pipe, args=(r, shape, n, ack_w))

        def send(it: int) -> None:
            stamp(src)
            w.send_bytes(src)
    elif method == "mp.Queue":
        queue = CTX.Queue()
        proc = CTX.Process(target=reader_queue, args=(queue, shape, n, ack_w))

        def send(it: int) -> None:
            stamp(src)
            queue.put(src)
    elif method == "cross-core copy":
        shm = SharedMemory(create=True, size=src.nbytes)
        data = np.ndarray(shape, np.float32, shm.buf)
        go_r, go_w = CTX.Pipe(duplex=False)
        proc = CTX.Process(target=reader_cross_core_copy, args=(shm.name, shape, n, go_r, ack_w))

        def send(it: int) -> None:
            np.copyto(data, src)
            stamp(data)
            go_w.send(None)

        def cleanup() -> None:
            nonlocal data
            del data
            shm.close()
            shm.unlink()
    elif method == "1-s polling":
        shm = SharedMemory(create=True, size=64 + src.nbytes)
        status = np.ndarray((2,), np.int64, shm.buf[:16])
        data = np.ndarray(shape, np.float32, shm.buf[64:])
        proc = CTX.Process(target=reader_polling, args=(shm.name, shape, n, ack_w))

        def send(it: int) -> None:
            status[0] = 0
            np.copyto(data, src)
            stamp(data)
            status[1] = it
            status[0] = 1

        def cleanup() -> None:
            nonlocal status, data
            del status, data
            shm.close()
            shm.unlink()
    else:
        raise ValueError(method)
    proc.start()
    try:
        if not ack_r.poll(30):
            raise TimeoutError(f"{method}: reader did not start")
        assert ack_r.recv() == "ready"
        for it in range(1, n + 1):
            time.sleep(0.001)
            send(it)
            if not ack_r.poll(30):
                raise TimeoutError(f"{method}: no acknowledgement for delivery {it}")
            ack_r.recv()
        if not ack_r.poll(30):
            raise TimeoutError(f"{method}: no results")
        lat: list[int] = ack_r.recv()
    finally:
        proc.join(timeout=30)
        cleanup()
    return lat


def nothing() -> None:
    """The cleanup of methods that leave nothing behind."""


def send_publish(block: Any, src: np.ndarray) -> Callable[[int], None]:
    def send(it: int) -> None:
        stamp(src)
        block.publish(src, iteration=it)

    return send


def copyto_reference(shape: tuple[int, ...], n: int, idle_s: float = 0.0) -> list[int]:
    """np.copyto in a hot loop, or after ``idle_s`` asleep (as every delivery here is sent)."""
    src = np.random.default_rng(0).random(shape, dtype=np.float32)
    dst = np.empty_like(src)
    out = []
    for _ in range(n):
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        out.append(time.perf_counter_ns() - t0)
    return out


# --------------------------------------------------------------------------- ping-pong


def echo_simbridge(prefix: str, n: int, spin_us: int, delay_ns: int = 0) -> None:
    os.environ["SIMBRIDGE_SHM__SPIN_US"] = str(spin_us)
    from simbridge.shm import Block

    with (
        Block.create(f"{prefix}.pong", PING, np.float32) as pong,
        Block.open(f"{prefix}.ping", timeout=30) as ping,
    ):
        buf = np.empty(PING, np.float32)
        for it in range(1, n + 1):
            ping.read(after=it - 1, timeout=30, out=buf)
            if delay_ns:  # the model "computes" before answering
                until = time.perf_counter_ns() + delay_ns
                while time.perf_counter_ns() < until:
                    pass
            pong.publish(buf, iteration=it)
        ping.read(after=n, timeout=30)  # until the driver is done with pong


def pingpong_simbridge(n: int, spin_us: int, delay_ns: int = 0, cpu: list[float] | None = None) -> list[int]:
    """Round trips in ns; appends the driver's CPU seconds per round trip to ``cpu`` if given."""
    os.environ["SIMBRIDGE_SHM__SPIN_US"] = str(spin_us)
    from simbridge.shm import Block

    prefix = f"bench-pp-{os.getpid()}-{spin_us}-{delay_ns}"
    rtt = []
    with Block.create(f"{prefix}.ping", PING, np.float32) as ping:
        proc = CTX.Process(target=echo_simbridge, args=(prefix, n, spin_us, delay_ns))
        proc.start()
        with Block.open(f"{prefix}.pong", timeout=30) as pong:
            msg = np.zeros(PING, np.float32)
            buf = np.empty(PING, np.float32)
            cpu0 = time.process_time()
            for it in range(1, n + 1):
                t0 = time.perf_counter_ns()
                ping.publish(msg, iteration=it)
                pong.read(after=it - 1, timeout=30, out=buf)
                rtt.append(time.perf_counter_ns() - t0)
            if cpu is not None:
                cpu.append((time.process_time() - cpu0) / n)
            ping.publish(msg, iteration=n + 1)
            proc.join(timeout=30)
    return rtt


def spin_sweep(rounds: int, n: int) -> str:
    """Round trip and the waiting side's CPU for several spin budgets: the data behind the default."""
    budgets = (0, 10, 50, 200, 1000)
    delays = (0, 200_000)
    cells: dict[tuple[int, int], tuple[list[float], list[float]]] = {
        (b, d): ([], []) for b in budgets for d in delays
    }
    for _ in range(rounds):
        for (budget, delay), (rtts, cpus) in cells.items():
            rtts.append(statistics.median(pingpong_simbridge(n, budget, delay, cpus)))
    lines = [
        "\nspin budget sweep (64-byte ping-pong; the answer comes at once, or after 200 us of work)",
        f"{'spin budget':<14}{'RTT at once':>14}{'CPU/RTT':>12}{'RTT +200us':>14}{'CPU/RTT':>12}",
    ]
    for budget in budgets:
        row = f"{str(budget) + ' us':<14}"
        for delay in delays:
            rtts, cpus = cells[(budget, delay)]
            row += f"{statistics.median(rtts) / 1e3:>11.1f} us{statistics.median(cpus) * 1e6:>9.1f} us"
        lines.append(row)
    return "\n".join(lines)


def echo_pipe(conn: Connection, n: int) -> None:
    buf = bytearray(64)
    for _ in range(n):
        conn.recv_bytes_into(buf)
        conn.send_bytes(buf)


def pingpong_pipe(n: int) -> list[int]:
    a, b = CTX.Pipe()
    proc = CTX.Process(target=echo_pipe, args=(b, n))
    proc.start()
    msg, buf, rtt = bytes(64), bytearray(64), []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        a.send_bytes(msg)
        a.recv_bytes_into(buf)
        rtt.append(time.perf_counter_ns() - t0)
    proc.join(timeout=30)
    return rtt


def echo_queue(q_in: Any, q_out: Any, n: int) -> None:
    for _ in range(n):
        q_out.put(q_in.get(timeout=30))


def pingpong_queue(n: int) -> list[int]:
    q_in, q_out = CTX.Queue(), CTX.Queue()
    proc = CTX.Process(target=echo_queue, args=(q_in, q_out, n))
    proc.start()
    msg, rtt = np.zeros(PING, np.float32), []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        q_in.put(msg)
        q_out.get(timeout=30)
        rtt.append(time.perf_counter_ns() - t0)
    proc.join(timeout=30)
    return rtt


def build_c_floor() -> Path:
    out = Path(tempfile.mkdtemp()) / "pingpong"
    subprocess.run(
        [
            "cc",
            "-std=c11",
            "-O2",
            "-I",
            str(REPO / "include"),
            str(REPO / "benchmarks/c/pingpong.c"),
            "-o",
            str(out),
            "-pthread",
        ],
        check=True,
    )
    return out


def c_floor_spread(binary: Path, n: int) -> str:
    """The C spin round trip is bimodal on a shared VM (a core lost to another process costs ~7 us)."""
    runs = []
    for _ in range(3):
        out = subprocess.run(
            [str(binary), str(n), "10000000"], capture_output=True, text=True, check=True, timeout=120
        ).stdout.split()
        runs.append(f"{out[1]}/{out[0]}/{out[2]}")
    return ", ".join(runs)


def pingpong_c(binary: Path, n: int, spin_ns: int) -> list[int]:
    median = subprocess.run(
        [str(binary), str(n), str(spin_ns)], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()[0]
    return [int(median)]


# --------------------------------------------------------------------------- driver


def interleaved(methods: dict[str, Callable[[], list[int]]], rounds: int) -> dict[str, float]:
    per_round: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for name, run in methods.items():
            per_round[name].append(statistics.median(run()))
    return {m: statistics.median(v) for m, v in per_round.items()}


def table(title: str, results: dict[str, float], anchor: str, unit_ns: float, unit: str) -> str:
    lines = [f"\n{title}", f"{'method':<34}{'median ' + unit:>16}{'vs ' + anchor:>22}"]
    base = results[anchor]
    for name, value in results.items():
        lines.append(f"{name:<34}{value / unit_ns:>16.2f}{value / base:>21.2f}x")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--polling", type=int, default=3, help="deliveries for the 1-s polling anchor")
    args = parser.parse_args()
    from simbridge.shm import _core

    rounds, n, pp = (2, 30, 500) if args.quick else (5, 200, 5000)
    print(
        f"simbridge shm_block benchmark — {time.strftime('%Y-%m-%d %H:%M')} — "
        f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"{rounds} interleaved rounds; one-way: {n} deliveries per round; ping-pong: {pp} round trips")
    print(f"CRC32C path: {_core.crc32c_path()}; load average before: {os.getloadavg()[0]:.2f}")
    for label, shape in (("1,382,400 B float32 (100x16x216)", BIG), ("9,600 B float32 (24x100)", SMALL)):
        methods: dict[str, Callable[[], list[int]]] = {
            "np.copyto (same array, 1 process)": lambda s=shape: copyto_reference(s, n),
            "  same, after 1 ms idle": lambda s=shape: copyto_reference(s, n, 0.001),
            "np.copyto across cores (floor)": lambda s=shape: one_way("cross-core copy", s, n),
            "simbridge publish->read(out) spin": lambda s=shape: one_way("simbridge-publish-spin", s, n),
            "simbridge publish->read(out) futex": lambda s=shape: one_way("simbridge-publish-futex", s, n),
            "  same, checksums off, spin": lambda s=shape: one_way("simbridge-publish-nocrc-spin", s, n),
            "simbridge loan->read(out) spin": lambda s=shape: one_way("simbridge-loan-spin", s, n),
            "simbridge publish->view spin": lambda s=shape: one_way("simbridge-publish-view-spin", s, n),
            "simbridge publish->view futex": lambda s=shape: one_way("simbridge-publish-view-futex", s, n),
            "mp.Pipe (recv_bytes_into)": lambda s=shape: one_way("mp.Pipe", s, n),
            "mp.Queue": lambda s=shape: one_way("mp.Queue", s, n),
        }
        results = interleaved(methods, rounds)
        results["1-s polling shm (original)"] = statistics.median(one_way("1-s polling", shape, args.polling))
        print(table(f"one-way delivery, {label}", results, "np.copyto (same array, 1 process)", 1e3, "us"))
    binary = build_c_floor()
    methods = {
        "C on shm.h, spin": lambda: pingpong_c(binary, pp, 10_000_000),
        "C on shm.h, futex": lambda: pingpong_c(binary, pp, 0),
        "simbridge Python, spin": lambda: pingpong_simbridge(pp, SPIN_FOREVER_US),
        "simbridge Python, futex": lambda: pingpong_simbridge(pp, 0),
        "mp.Pipe": lambda: pingpong_pipe(pp),
        "mp.Queue": lambda: pingpong_queue(pp),
    }
    results = interleaved(methods, rounds)
    print(table("64-byte ping-pong round trip", results, "C on shm.h, spin", 1e3, "us"))
    low = c_floor_spread(binary, pp)
    print(f"C spin floor alone, 3 runs (p10/median/p90 ns): {low}")
    futex_ratio = results["simbridge Python, futex"] / results["C on shm.h, futex"]
    pipe_ratio = results["simbridge Python, spin"] / results["mp.Pipe"]
    print(f"\nsimbridge Python futex vs C futex: {futex_ratio:.2f}x")
    print(f"simbridge Python spin vs mp.Pipe: {pipe_ratio:.2f}x")
    print(spin_sweep(rounds, max(200, pp // 5)))
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
