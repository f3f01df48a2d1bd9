"""Benchmark: simbridge's Ring against multiprocessing.Queue, faster-fifo, pyzmq (ipc), iceoryx2 and a
pure-Python shared-memory spin ring, all in the same run.

Throughput: COUNT 64-byte messages from a producer process to a consumer process, one message per call
(single) and in batches (batched: lists of 1,000, or the anchor's own batch API); simbridge also with
fixed 64-byte numpy records (push_many of an array / pop_many into a preallocated array), and C -> C
through shm.h (benchmarks/c/ring_bench.c). Each figure is the consumer's messages per second from the
moment both sides are ready to the last message, the median of ROUNDS runs. Slow anchors move fewer
messages (SLOW_COUNT) so the run stays short; the rate is what is compared.
Latency: a 64-byte ping-pong round trip, back to back (the waiting side spins) and with 1 ms between
rounds (the waiting side has parked: the round trip includes the futex wake).
Run: .venv/bin/python benchmarks/shm_ring.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CTX = mp.get_context("fork")
MSG = b"m" * 64
BATCH = 1000


def fresh_batch() -> list[bytes]:
    """BATCH distinct 64-byte objects: pickle sends one copy of a repeated object, and a queue that
    pickles must not win by that."""
    return [MSG[:32] + MSG[32:] for _ in range(BATCH)]


RECORD = np.dtype([("ts", "<i8"), ("price", "<i8"), ("size", "<i8"), ("pad", "V40")])  # 64 bytes
FIXED_BATCH = 4096  # rings that stay in cache: 8192 records (two batches), 1 MiB of bytes (ring_bench.c)

Side = Callable[[int, Barrier, Any], None]


# --------------------------------------------------------------------------- simbridge


def sb_producer(mode: str) -> Side:
    def run(n: int, barrier: Barrier, name: Any) -> None:
        from simbridge.shm import Ring

        fixed = mode == "fixed"
        with Ring.create(
            name, capacity=1 << 13 if fixed else 1 << 20, record_dtype=RECORD if fixed else None
        ) as ring:
            barrier.wait()
            if mode == "single":
                push = ring.push
                for _ in range(n):
                    push(MSG)
            elif mode == "batched":
                batch = [MSG] * BATCH
                for _ in range(n // BATCH):
                    ring.push_many(batch)
            else:
                records = np.zeros(FIXED_BATCH, RECORD)
                for start in range(0, n, FIXED_BATCH):
                    ring.push_many(records[: min(FIXED_BATCH, n - start)])
            barrier.wait()  # keep the ring until the consumer is done

    return run


def sb_consumer(mode: str) -> Callable[[int, Barrier, Any, Any], None]:
    def run(n: int, barrier: Barrier, name: Any, result: Any) -> None:
        from simbridge.shm import Ring

        with Ring.open(name, timeout=30) as ring:
            barrier.wait()
            t0 = time.perf_counter()
            if mode == "single":
                pop = ring.pop
                for _ in range(n):
                    pop()
            elif mode == "batched":
                got = 0
                while got < n:
                    got += len(ring.pop_many(4 * BATCH))
            else:
                out = np.empty(FIXED_BATCH, RECORD)
                got = 0
                while got < n:
                    got += ring.pop_many(out)
            result.send(time.perf_counter() - t0)
            barrier.wait()

    return run


# --------------------------------------------------------------------------- anchors


def queue_sides(
    mode: str, put_batch: Callable[[Any, list[bytes]], None], get_batch: Callable[[Any], Any]
) -> tuple[Side, Callable[..., None]]:
    """Producer and consumer for a queue with ``put(msg)``/``get()``, its batches moved by the two
    calls given (one call per BATCH messages: the per-message loops stay as written)."""

    def prod(n: int, barrier: Barrier, q: Any) -> None:
        barrier.wait()
        if mode == "single":
            for _ in range(n):
                q.put(MSG)
        else:
            for _ in range(n // BATCH):
                put_batch(q, fresh_batch())
        barrier.wait()

    def cons(n: int, barrier: Barrier, q: Any, result: Any) -> None:
        barrier.wait()
        t0 = time.perf_counter()
        got = 0
        if mode == "single":
            while got < n:
                q.get()
                got += 1
        else:
            while got < n:
                got += len(get_batch(q))
        result.send(time.perf_counter() - t0)
        barrier.wait()

    return prod, cons


def queue_pair(mode: str) -> tuple[Side, Callable[..., None], Callable[[], Any]]:
    def make() -> Any:
        return CTX.Queue(maxsize=1000)

    prod, cons = queue_sides(mode, lambda q, batch: q.put(batch), lambda q: q.get())
    return prod, cons, make


def fifo_pair(mode: str) -> tuple[Side, Callable[..., None], Callable[[], Any]]:
    def make() -> Any:
        from faster_fifo import Queue

        return Queue(max_size_bytes=1 << 22)

    prod, cons = queue_sides(
        mode, lambda q, batch: q.put_many(batch), lambda q: q.get_many(max_messages_to_get=4 * BATCH)
    )
    return prod, cons, make


def zmq_pair(mode: str) -> tuple[Side, Callable[..., None], Callable[[], Any]]:
    def make() -> Any:
        return f"ipc://{tempfile.gettempdir()}/simbridge-bench-{uuid.uuid4().hex[:8]}"

    def prod(n: int, barrier: Barrier, address: Any) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(address)
        barrier.wait()
        if mode == "single":
            for _ in range(n):
                sock.send(MSG)
        else:
            batch = [MSG] * BATCH
            for _ in range(n // BATCH):
                sock.send_multipart(batch)
        barrier.wait()
        sock.close(linger=0)

    def cons(n: int, barrier: Barrier, address: Any, result: Any) -> None:
        import zmq

        sock = zmq.Context.instance().socket(zmq.PULL)
        sock.bind(address)
        barrier.wait()
        t0 = time.perf_counter()
        got = 0
        while got < n:
            if mode == "single":
                sock.recv()
                got += 1
            else:
                got += len(sock.recv_multipart())
        result.send(time.perf_counter() - t0)
        barrier.wait()
        sock.close(linger=0)

    return prod, cons, make


def iceoryx_pair(mode: str) -> tuple[Side, Callable[..., None], Callable[[], Any]]:
    import ctypes

    class Msg(ctypes.Structure):
        _fields_ = [("data", ctypes.c_uint8 * 64)]

    def service(name: str) -> Any:
        import iceoryx2 as iox2

        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        svc = (
            node.service_builder(iox2.ServiceName.new(name))
            .publish_subscribe(Msg)
            .subscriber_max_buffer_size(4096)
            .enable_safe_overflow(False)
            .open_or_create()
        )
        return node, svc

    def make() -> Any:
        return f"simbridge/bench/{uuid.uuid4().hex[:8]}"

    def prod(n: int, barrier: Barrier, name: Any) -> None:
        import iceoryx2 as iox2

        _node, svc = service(name)
        pub = (
            svc.publisher_builder()
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .create()
        )
        barrier.wait()  # the subscriber exists: nothing is dropped
        msg = Msg()
        for _ in range(n):
            pub.send_copy(msg)
        barrier.wait()

    def cons(n: int, barrier: Barrier, name: Any, result: Any) -> None:
        _node, svc = service(name)
        sub = svc.subscriber_builder().buffer_size(4096).create()
        barrier.wait()
        t0 = time.perf_counter()
        got = 0
        while got < n:
            if sub.receive() is not None:
                got += 1
        result.send(time.perf_counter() - t0)
        barrier.wait()

    return prod, cons, make


SLOTS = 1 << 16  # the pure-Python spin ring: 64-byte slots, head and tail int64s on their own cache lines


def spin_pair(mode: str) -> tuple[Side, Callable[..., None], Callable[[], Any]]:
    def make() -> Any:
        return SharedMemory(create=True, size=128 + SLOTS * 64)

    def views(shm: SharedMemory) -> tuple[Any, Any]:
        idx = np.ndarray((16,), np.int64, shm.buf)  # [0] head, [8] tail
        data = np.ndarray((SLOTS, 64), np.uint8, shm.buf, offset=128)
        return idx, data

    def prod(n: int, barrier: Barrier, shm: Any) -> None:
        idx, data = views(shm)
        barrier.wait()
        row = np.frombuffer(MSG, np.uint8)
        tail = 0
        if mode == "single":
            for _ in range(n):
                while tail - idx[0] >= SLOTS:
                    pass
                data[tail % SLOTS] = row
                tail += 1
                idx[8] = tail
        else:
            block = np.tile(row, (BATCH, 1))
            for _ in range(n // BATCH):
                while tail + BATCH - idx[0] > SLOTS:
                    pass
                slot = tail % SLOTS  # SLOTS is a multiple of BATCH's power-of-two cover: no split
                end = slot + BATCH
                if end <= SLOTS:
                    data[slot:end] = block
                else:
                    data[slot:] = block[: SLOTS - slot]
                    data[: end - SLOTS] = block[SLOTS - slot :]
                tail += BATCH
                idx[8] = tail
        barrier.wait()

    def cons(n: int, barrier: Barrier, shm: Any, result: Any) -> None:
        idx, data = views(shm)
        barrier.wait()
        t0 = time.perf_counter()
        head = 0
        while head < n:
            tail = int(idx[8])
            if tail == head:
                continue
            if mode == "single":
                bytes(data[head % SLOTS])
                head += 1
            else:
                k = min(tail - head, 4 * BATCH, SLOTS - head % SLOTS)
                data[head % SLOTS : head % SLOTS + k].copy()
                head += k
            idx[0] = head
        result.send(time.perf_counter() - t0)
        barrier.wait()

    return prod, cons, make


# --------------------------------------------------------------------------- driver


def run_pair(prod: Side, cons: Callable[..., None], shared: Any, n: int) -> float:
    barrier = CTX.Barrier(2)
    here, there = CTX.Pipe()
    pp = CTX.Process(target=prod, args=(n, barrier, shared))
    cp = CTX.Process(target=cons, args=(n, barrier, shared, there))
    pp.start()
    cp.start()
    if not here.poll(300):
        pp.kill()
        cp.kill()
        raise RuntimeError("a benchmark pair did not finish within 300 s")
    seconds = float(here.recv())
    pp.join(60)
    cp.join(60)
    return n / seconds


def simbridge_method(mode: str) -> Callable[[int], float]:
    def run(n: int) -> float:
        name = f"bench-ring-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        return run_pair(sb_producer(mode), sb_consumer(mode), name, n)

    return run


def anchor_method(
    pair: Callable[[str], tuple[Side, Callable[..., None], Callable[[], Any]]], mode: str
) -> Callable[[int], float]:
    def run(n: int) -> float:
        prod, cons, make = pair(mode)
        shared = make()
        try:
            return run_pair(prod, cons, shared, n)
        finally:
            if isinstance(shared, SharedMemory):
                shared.close()
                shared.unlink()

    return run


def build_c() -> Path:
    out = Path(tempfile.mkdtemp()) / "ring_bench"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [
            cc,
            "-std=c11",
            "-O2",
            "-I",
            str(REPO / "include"),
            str(REPO / "benchmarks/c/ring_bench.c"),
            "-o",
            str(out),
            "-pthread",
        ],
        check=True,
    )
    return out


def c_method(binary: Path, mode: str, batch: int) -> Callable[[int], float]:
    def run(n: int) -> float:
        name = f"bench-cring-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        out = subprocess.run(
            [str(binary), mode, name, str(n), str(batch)], capture_output=True, text=True, check=True
        )
        fields = dict(kv.split("=") for kv in out.stdout.split())
        return float(fields["rate"])

    return run


# --------------------------------------------------------------------------- ping-pong


def sb_echo(name: str, rounds: int) -> None:
    from simbridge.shm import Ring

    with Ring.create(f"{name}.back", capacity=4096) as back, Ring.open(f"{name}.there", timeout=30) as there:
        for _ in range(rounds):
            back.push(there.pop())


def round_trips(rounds: int, gap_s: float, send: Callable[[bytes], Any], recv: Callable[[], Any]) -> float:
    """The median round trip in microseconds: send MSG, take the echo (after gap_s idle, if given).
    ``send`` and ``recv`` are the anchors' bound methods: no extra call in the timed part."""
    rtt = []
    for _ in range(rounds):
        if gap_s:
            time.sleep(gap_s)
        t0 = time.perf_counter()
        send(MSG)
        recv()
        rtt.append(time.perf_counter() - t0)
    return statistics.median(rtt) * 1e6


def sb_pingpong(rounds: int, gap_s: float) -> float:
    from simbridge.shm import Ring

    name = f"bench-pp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    with Ring.create(f"{name}.there", capacity=4096) as there:
        proc = CTX.Process(target=sb_echo, args=(name, rounds))
        proc.start()
        with Ring.open(f"{name}.back", timeout=30) as back:
            median_us = round_trips(rounds, gap_s, there.push, back.pop)
        proc.join(30)
    return median_us


def zmq_pingpong(rounds: int, gap_s: float) -> float:
    import zmq

    address = f"ipc://{tempfile.gettempdir()}/simbridge-pp-{uuid.uuid4().hex[:8]}"

    def echo() -> None:
        sock = zmq.Context().socket(zmq.REP)
        sock.connect(address)
        for _ in range(rounds):
            sock.send(sock.recv())
        sock.close(linger=0)

    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.bind(address)
    proc = CTX.Process(target=echo)
    proc.start()
    median_us = round_trips(rounds, gap_s, sock.send, sock.recv)
    proc.join(30)
    sock.close(linger=0)
    return median_us


def c_pingpong(binary: Path, rounds: int, gap_us: int) -> float:
    name = f"bench-cpp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    out = subprocess.run(
        [str(binary), "pingpong", name, str(rounds), str(gap_us)], capture_output=True, text=True, check=True
    )
    fields = dict(kv.split("=") for kv in out.stdout.split()[1:])
    return float(fields["median_us"])


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer messages and one round (a smoke run)")
    args = parser.parse_args()
    count = 200_000 if args.quick else 1_000_000
    slow = 50_000 if args.quick else 200_000
    rounds = 1 if args.quick else 3
    binary = build_c()

    rows: list[tuple[str, str, int, Callable[[int], float], float | None]] = [
        # (label, kind, messages, method, aim in msgs/s)
        ("simbridge Ring, single push/pop (Py->Py)", "single", count, simbridge_method("single"), 3e6),
        ("simbridge Ring, push_many/pop_many of bytes", "batched", count, simbridge_method("batched"), 25e6),
        ("simbridge Ring, fixed numpy records", "batched", count * 10, simbridge_method("fixed"), 100e6),
        ("C -> C through shm.h, single", "single", count * 10, c_method(binary, "throughput", 1), 50e6),
        (
            "C -> C through shm.h, batches of 64",
            "batched",
            count * 10,
            c_method(binary, "throughput", 64),
            50e6,
        ),
        ("C -> C through shm.h, fixed records", "batched", count * 20, c_method(binary, "fixed", 4096), None),
        ("pure-Python shm spin ring, single", "single", count, anchor_method(spin_pair, "single"), None),
        (
            "pure-Python shm spin ring, numpy blocks",
            "batched",
            count,
            anchor_method(spin_pair, "batched"),
            None,
        ),
        ("multiprocessing.Queue, single", "single", slow, anchor_method(queue_pair, "single"), None),
        (
            "multiprocessing.Queue, lists of 1000",
            "batched",
            count,
            anchor_method(queue_pair, "batched"),
            None,
        ),
        ("faster-fifo, single", "single", slow, anchor_method(fifo_pair, "single"), None),
        ("faster-fifo, put_many/get_many", "batched", count, anchor_method(fifo_pair, "batched"), None),
        ("pyzmq ipc PUSH/PULL, single", "single", slow, anchor_method(zmq_pair, "single"), None),
        ("pyzmq ipc, multipart of 1000", "batched", count, anchor_method(zmq_pair, "batched"), None),
        ("iceoryx2 (Python), single", "single", slow // 4, anchor_method(iceoryx_pair, "single"), None),
    ]
    results: dict[str, float] = {}
    print(
        f"# shm_ring  {time.strftime('%Y-%m-%d %H:%M')}  {platform.node()}  {os.cpu_count()} CPUs  "
        f"{platform.python_implementation()} {platform.python_version()}  rounds={rounds}  "
        f"load average before: {os.getloadavg()[0]:.2f}"
    )
    print(f"{'method':48} {'messages':>10} {'M msgs/s':>9} {'aim':>6}")
    for label, _kind, n, method, aim in rows:
        rates = [method(n) for _ in range(rounds)]
        results[label] = statistics.median(rates)
        aim_text = f"{aim / 1e6:g}" if aim else ""
        print(f"{label:48} {n:>10,} {results[label] / 1e6:>9.2f} {aim_text:>6}", flush=True)

    def ratio(a: str, b: str) -> str:
        return f"{results[a] / results[b]:.1f}x"

    single, batched, fixed = rows[0][0], rows[1][0], rows[2][0]
    print()
    print("ratios (medians):")
    for anchor in (rows[6][0], rows[8][0], rows[10][0], rows[12][0], rows[14][0]):
        print(f"  {single} / {anchor}: {ratio(single, anchor)}")
    # Batches of Python objects against batches of Python objects; the spin ring's batches are numpy
    # block copies with no per-message object, like the fixed-record path.
    for anchor in (rows[9][0], rows[11][0], rows[13][0]):
        print(f"  {batched} / {anchor}: {ratio(batched, anchor)}")
    print(f"  {fixed} / {rows[7][0]}: {ratio(fixed, rows[7][0])}")

    pp_rounds = 2000 if args.quick else 10000
    print()
    print("ping-pong round trip of 64 bytes, median microseconds (back to back | 1 ms apart: peer parked)")
    print(f"  simbridge Ring (Python)   {sb_pingpong(pp_rounds, 0):8.1f} | {sb_pingpong(300, 0.001):8.1f}")
    c_back_to_back, c_parked = c_pingpong(binary, pp_rounds, 0), c_pingpong(binary, 300, 1000)
    print(f"  C through shm.h           {c_back_to_back:8.1f} | {c_parked:8.1f}")
    print(f"  pyzmq ipc REQ/REP         {zmq_pingpong(pp_rounds, 0):8.1f} | {zmq_pingpong(300, 0.001):8.1f}")


if __name__ == "__main__":
    main()
