"""A two-process demonstration of Blocks: Python steers a 'model' process through shared memory.

The driver publishes ensemble states (24 x 100 float32, the EKI workload's shape); the model process
reads them, applies a fixed linear forward operator and publishes observations (100 x 16 x 216).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from simbridge.config import load_settings
from simbridge.logs import configure_logging
from simbridge.shm.block import Block
from simbridge.shm.errors import DemoFailed

STATES = (24, 100)
OBSERVATIONS = (100, 16, 216)


@dataclass(frozen=True)
class DemoRound:
    """Timings of one iteration, in seconds."""

    iteration: int
    round_trip_s: float
    checksum_ok: bool


def forward_operator(seed: int = 7) -> np.ndarray:
    """The model's fixed linear map from 24 emissions to 16 x 216 observations."""
    rng = np.random.default_rng(seed)
    return rng.random((24, 16 * 216), dtype=np.float32)


def run_model(prefix: str, iterations: int) -> None:
    """The model side (a separate process): read states, publish observations, same iteration id."""
    operator = forward_operator()
    with (
        Block.open(f"{prefix}.states", timeout=30) as states,
        Block.create(f"{prefix}.obs", OBSERVATIONS, np.float32) as obs,
    ):
        out = np.empty(STATES, np.float32)
        for it in range(1, iterations + 1):
            snap = states.read(after=it - 1, timeout=30, out=out)
            result = (snap.array.T @ operator).reshape(OBSERVATIONS)
            obs.publish(result, iteration=snap.iteration)
        # Wait for the driver to take the last result before unlinking.
        states.read(after=iterations, timeout=30)


def run_driver(iterations: int = 20) -> list[DemoRound]:
    """The driver side: start the model process and steer it for ``iterations`` rounds."""
    prefix = f"demo-{os.getpid()}"
    operator = forward_operator()
    rng = np.random.default_rng(1)
    rounds = []
    with Block.create(f"{prefix}.states", STATES, np.float32) as states:
        child = subprocess.Popen([sys.executable, "-m", "simbridge.shm.demo", prefix, str(iterations)])
        try:
            with Block.open(f"{prefix}.obs", timeout=30) as obs:
                received = np.empty(OBSERVATIONS, np.float32)
                for it in range(1, iterations + 1):
                    x = rng.random(STATES, dtype=np.float32)
                    start = time.perf_counter()
                    states.publish(x, iteration=it)
                    obs.read(after=it - 1, timeout=30, out=received)
                    elapsed = time.perf_counter() - start
                    expected = (x.T @ operator).reshape(OBSERVATIONS)
                    rounds.append(DemoRound(it, elapsed, bool(np.allclose(received, expected))))
                states.publish(np.zeros(STATES, np.float32), iteration=iterations + 1)
        finally:
            try:
                code = child.wait(timeout=30)
            except subprocess.TimeoutExpired as exc:
                child.kill()
                child.wait(timeout=30)
                raise DemoFailed("the model process did not finish within 30 s; it was killed") from exc
            if code != 0:
                raise DemoFailed(f"the model process exited with {code}; its error is on stderr above")
    return rounds


if __name__ == "__main__":  # the model process: a program of its own, so it sets up its logging
    configure_logging(load_settings().log)
    run_model(sys.argv[1], int(sys.argv[2]))
