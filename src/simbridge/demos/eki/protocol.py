"""The EKI coupling's protocol: Block names, layouts and the order both sides follow.

The C model (forward_model.c) mirrors these constants; the tests check that the two agree.
Each side creates the blocks it writes, so each block has exactly one writer and a dead writer is
seen by its reader within a fraction of a second (PeerGone).

  Python creates and writes          the model creates and writes
  ``<prefix>.config``  int64[8]      ``<prefix>.obs0``     float32[NREC, NSTEP]          iteration 1
  ``<prefix>.truth``   float32[NPARAM] ``<prefix>.ens_obs`` float32[members, NREC, NSTEP] iteration k
  ``<prefix>.states``  float32[NPARAM, members]  ``<prefix>.timing`` float64[8]          iteration k

1. Python publishes config (version, sizes, members) and truth, iteration 1 each.
2. The model checks the config against the sizes it was built with (exit 3 on a mismatch), creates its
   blocks, runs the truth and publishes obs0 (the noise-free observations).
3. For k = 1, 2, ...: Python publishes states as iteration k; the model runs every member, publishes
   ens_obs then timing (its forward-model, read and publish seconds) as iteration k.
4. Shutdown: Python closes its blocks; the model, waiting for iteration k+1, sees them closed and exits 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Final

import numpy as np
from numpy.typing import NDArray

PROTOCOL_VERSION: Final = 1
CONFIG_LEN: Final = 8
TIMING_LEN: Final = 8
N_PARAMS: Final = 24
N_RECEPTORS: Final = 16
N_STEPS: Final = 216
STEP_SECONDS: Final = 600.0  # forward_model.c's STEP_S: 216 steps are 36 hours

STATE_DTYPE: Final = np.dtype(np.float32)
OBS_DTYPE: Final = np.dtype(np.float32)


class ModelExit(IntEnum):
    """The forward model's exit statuses (forward_model.c's enum)."""

    OK = 0
    USAGE = 2
    LAYOUT = 3
    DRIVER_GONE = 4
    TIMEOUT = 5
    SHM = 6
    SIGNAL = 7


@dataclass(frozen=True, kw_only=True)
class Sizes:
    """The sizes both sides must agree on."""

    members: int
    params: int = N_PARAMS
    receptors: int = N_RECEPTORS
    steps: int = N_STEPS

    @property
    def states_shape(self) -> tuple[int, int]:
        return (self.params, self.members)

    @property
    def obs_shape(self) -> tuple[int, int]:
        return (self.receptors, self.steps)

    @property
    def ens_obs_shape(self) -> tuple[int, int, int]:
        return (self.members, self.receptors, self.steps)


@dataclass(frozen=True)
class Names:
    """The block names of one run; the prefix keeps concurrent runs apart."""

    prefix: str

    @classmethod
    def fresh(cls) -> Names:
        return cls(f"eki.{os.getpid()}.{os.urandom(3).hex()}")

    @property
    def config(self) -> str:
        return f"{self.prefix}.config"

    @property
    def truth(self) -> str:
        return f"{self.prefix}.truth"

    @property
    def states(self) -> str:
        return f"{self.prefix}.states"

    @property
    def obs0(self) -> str:
        return f"{self.prefix}.obs0"

    @property
    def ens_obs(self) -> str:
        return f"{self.prefix}.ens_obs"

    @property
    def timing(self) -> str:
        return f"{self.prefix}.timing"


def encode_config(sizes: Sizes, *, iterations: int) -> NDArray[np.int64]:
    return np.array(
        [
            PROTOCOL_VERSION,
            sizes.params,
            sizes.receptors,
            sizes.steps,
            sizes.members,
            iterations,
            os.getpid(),
            0,
        ],
        dtype=np.int64,
    )


@dataclass(frozen=True)
class ModelTiming:
    """What the model reports for one iteration, in seconds."""

    forward_s: float
    read_copy_s: float
    wait_s: float
    publish_s: float
    members: int
    iteration: int

    @classmethod
    def decode(cls, raw: NDArray[np.float64]) -> ModelTiming:
        return cls(
            forward_s=float(raw[0]),
            read_copy_s=float(raw[1]),
            wait_s=float(raw[2]),
            publish_s=float(raw[3]),
            members=int(raw[4]),
            iteration=int(raw[5]),
        )
