"""Ensemble Kalman inversion over shared memory: Python EKI steering a C Gaussian puff model.

``driver.run_inversion`` runs the coupled loop; ``eki`` holds the algorithm, ``protocol`` the Block
names and layouts both sides agree on, ``build`` compiles the C model, ``plot`` draws the result.
"""

from simbridge.demos.eki.driver import EkiResult, IterationStats, RunOptions, run_inversion
from simbridge.demos.eki.errors import BuildFailed, EkiError, ForwardModelDied, ModelLayoutMismatch

__all__ = [
    "BuildFailed",
    "EkiError",
    "EkiResult",
    "ForwardModelDied",
    "IterationStats",
    "ModelLayoutMismatch",
    "RunOptions",
    "run_inversion",
]
