"""Benchmark: the EKI coupling's communication per iteration and overhead, simbridge vs multiprocessing.Queue.

Two measurements per ensemble size, in the same run:
1. The real loop (simbridge.demos.eki): Python EKI and the compiled C puff model over Blocks. Its
   communication is what both sides spend publishing and copying (states 24 x N float32 out,
   observations N x 16 x 216 float32 back), measured by the side that does it; overhead is that
   over the whole iteration (EKI + waiting for the model + communication), as the original counted it.
2. Communication only, same shapes, same pattern: a Python peer process that answers each states
   array with an observations array (precomputed: no forward model), over Blocks and over a pair of
   multiprocessing.Queues. Wiring the C model to a Queue would mean a pickle reader in C, so the Queue
   variant uses this stand-in and both transports are timed on communication alone: the round trip.
   The Queue's overhead is then estimated by putting its round trip in place of simbridge's
   communication in the real loop's iteration.
Run: .venv/bin/python benchmarks/eki_loop.py [--sizes 10,50,100] [--reps N]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from pathlib import Path

import numpy as np

from simbridge.demos.eki import protocol
from simbridge.demos.eki.build import build_model
from simbridge.demos.eki.driver import RunOptions, run_inversion
from simbridge.shm import Block, WriterClosed

CTX = mp.get_context("fork")
SIZES = (10, 50, 100, 500, 1000, 10000)
ORIGINAL = {"members": 100, "communication_s": 0.222, "overhead_pct": 1.4, "iteration_s": 15.5}


def states_shape(n: int) -> tuple[int, int]:
    return (protocol.N_PARAMS, n)


def obs_shape(n: int) -> tuple[int, int, int]:
    return (n, protocol.N_RECEPTORS, protocol.N_STEPS)


# --------------------------------------------------------------------------- real loop


def real_loop(n: int, binary: Path, forward_runs: int) -> dict[str, float]:
    assert forward_runs >= 3, "the steady state needs a run that is neither the first nor the last"
    with tempfile.TemporaryDirectory() as out:
        options = RunOptions(
            members=n,
            iterations=forward_runs - 1,
            tolerance=None,
            model=binary,
            output_dir=Path(out),
            timeout_s=600,
        )
        history = run_inversion(options).history
    # The first run pays the page faults of fresh segments and buffers, the last has no EKI update
    # (it only evaluates the final ensemble): the runs in between are the steady state.
    steady = history[1:-1]

    def mean(attr: str) -> float:
        return statistics.fmean(getattr(s, attr) for s in steady)

    return {
        "comm": mean("communication_s"),
        "forward": mean("forward_s"),
        "eki": mean("eki_s"),
        "total": mean("total_s"),
    }


# --------------------------------------------------------------------------- communication only


def _blocks_peer(prefix: str, n: int, reps: int) -> None:
    response = np.random.default_rng(0).random(obs_shape(n), dtype=np.float32)
    states = np.empty(states_shape(n), np.float32)
    with (
        Block.create(f"{prefix}.obs", obs_shape(n), np.float32) as out,
        Block.open(f"{prefix}.states", timeout=30) as inp,
    ):
        for k in range(1, reps + 1):
            inp.read(after=k - 1, timeout=60, out=states)
            out.publish(response, iteration=k)
        # Hold our block until the driver has read the last answer and closed its own.
        with contextlib.suppress(WriterClosed):
            inp.read(after=reps, timeout=60)


def blocks_round_trips(n: int, reps: int) -> list[float]:
    prefix = f"bench.eki.{os.getpid()}.{n}"
    states = np.random.default_rng(1).random(states_shape(n), dtype=np.float32)
    received = np.empty(obs_shape(n), np.float32)
    times = []
    with Block.create(f"{prefix}.states", states_shape(n), np.float32) as out:
        peer = CTX.Process(target=_blocks_peer, args=(prefix, n, reps))
        peer.start()
        with Block.open(f"{prefix}.obs", timeout=30) as inp:
            for k in range(1, reps + 1):
                t0 = time.perf_counter()
                out.publish(states, iteration=k)
                inp.read(after=k - 1, timeout=120, out=received)
                times.append(time.perf_counter() - t0)
        out.close()
        peer.join(30)
    return times


def _queue_peer(inbox: Queue[np.ndarray], outbox: Queue[np.ndarray], n: int, reps: int) -> None:
    response = np.random.default_rng(0).random(obs_shape(n), dtype=np.float32)
    for _ in range(reps):
        inbox.get()
        outbox.put(response)


def queue_round_trips(n: int, reps: int) -> list[float]:
    states = np.random.default_rng(1).random(states_shape(n), dtype=np.float32)
    received = np.empty(obs_shape(n), np.float32)
    inbox: Queue[np.ndarray] = CTX.Queue()
    outbox: Queue[np.ndarray] = CTX.Queue()
    peer = CTX.Process(target=_queue_peer, args=(inbox, outbox, n, reps))
    peer.start()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        inbox.put(states)
        # Into the driver's own array, as the Block variant does with out=.
        np.copyto(received, outbox.get(timeout=300))
        times.append(time.perf_counter() - t0)
    peer.join(30)
    return times


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--reps", type=int, default=0, help="round trips per size (default: by size)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    binary = build_model()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"eki_loop: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, {now}")
    print(
        f"original (C++/CUDA model, {ORIGINAL['members']} members): "
        f"communication {ORIGINAL['communication_s']} s per iteration"
        f" = {ORIGINAL['overhead_pct']} % of {ORIGINAL['iteration_s']} s"
    )
    header = (
        f"{'members':>8} {'MB/iter':>8} | {'loop s':>8} {'model s':>8} {'EKI s':>7} {'comm ms':>8}"
        f" {'comm %':>7} | {'RT shm ms':>9} {'RT Queue ms':>11} {'Queue/shm':>9} {'Queue %':>8}"
    )
    print(header)
    print("-" * len(header))
    for n in sizes:
        mb = (np.prod(states_shape(n)) + np.prod(obs_shape(n))) * 4 / 1e6
        loop = real_loop(n, binary, forward_runs=3 if n >= 5000 else 6)
        reps = args.reps or (5 if n >= 5000 else 10 if n >= 1000 else 30)
        shm = statistics.median(blocks_round_trips(n, reps))
        queue = statistics.median(queue_round_trips(n, reps))
        # The same iteration with the Queue's round trip in place of simbridge's communication.
        queue_total = loop["total"] - loop["comm"] + queue
        print(
            f"{n:>8} {mb:>8.1f} | {loop['total']:>8.3f} {loop['forward']:>8.3f} {loop['eki']:>7.3f}"
            f" {1e3 * loop['comm']:>8.2f} {100 * loop['comm'] / loop['total']:>7.2f} |"
            f" {1e3 * shm:>9.3f} {1e3 * queue:>11.3f} {queue / shm:>8.1f}x {100 * queue / queue_total:>8.2f}",
            flush=True,
        )
    print(
        "loop: the real coupled loop with the C model, mean of the steady-state iterations (neither the"
        " first nor the last);\ncomm = publish + copy on both sides, including the parked reader's wake-up."
        "\nRT: communication-only round trip (states out, observations back) with a Python peer"
        " that computes nothing; median."
    )


if __name__ == "__main__":
    main()
