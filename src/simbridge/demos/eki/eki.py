"""Ensemble Kalman inversion (Iglesias, Law & Stuart 2013) with perturbed observations, in numpy.

Pure functions of arrays: the update, the data misfit, the prior ensemble and the noise model. The
forward model is whatever produced the ensemble observations; nothing here knows about processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class NoiseModel:
    """Independent Gaussian observation errors: sigma_i = level * (|y_i| + floor * max|y|).

    The floor keeps the zeros of an unseen plume informative (they say "no emission reached here")
    without letting them dominate the fit with a vanishing variance.
    """

    level: float
    floor: float = 0.01

    def sigma(self, clean: Array) -> Array:
        scale = float(np.max(np.abs(clean))) if clean.size else 0.0
        sigma = self.level * (np.abs(clean) + self.floor * scale)
        # A noise level of 0 still needs a positive variance to invert; 1e-9 of the scale is exact enough.
        return np.maximum(sigma, 1e-9 * max(scale, 1e-30))

    def observe(self, clean: Array, rng: np.random.Generator) -> tuple[Array, Array]:
        """Noisy observations and their sigmas, from noise-free ones."""
        sigma = self.sigma(clean)
        return clean + sigma * rng.standard_normal(clean.shape), sigma


def prior_ensemble(
    *, params: int, members: int, mean: float, spread: float, rng: np.random.Generator
) -> Array:
    """A log-normal prior (positive, like emissions) with independent, smoothly correlated members.

    Each member is a random walk in log space around ``log(mean)`` so its series is plausible (not
    white noise), with a log-standard deviation of about ``spread``; shape (params, members).
    """
    steps = rng.standard_normal((params, members))
    walk = np.cumsum(steps, axis=0) / np.sqrt(np.arange(1, params + 1))[:, None]
    white = rng.standard_normal((params, members))
    log_u = np.log(mean) + spread * (0.6 * walk + 0.8 * white) - 0.5 * spread**2
    return np.asarray(np.exp(log_u), dtype=np.float64)


def data_misfit(y: Array, g: Array, sigma: Array) -> float:
    """Mean squared whitened residual, (1/d) |Gamma^-1/2 (y - g)|^2: about 1 at the noise level."""
    r = (y - g) / sigma
    return float(np.mean(r * r))


def eki_update(
    u: Array,
    g: Array,
    y: Array,
    sigma: Array,
    rng: np.random.Generator,
    *,
    non_negative: bool = True,
) -> Array:
    """One EKI step: u_j + C_uG (C_GG + Gamma)^-1 (y + eta_j - G(u_j)), eta_j ~ N(0, Gamma).

    u: (params, J) ensemble; g: (d, J) its observations; y, sigma: (d,) data and its noise sigmas.
    The gain is computed in whitened form, in ensemble space (J x J) when J <= d and in observation
    space (d x d) otherwise, whichever system is smaller; both are the same matrix identity.
    With ``non_negative`` the result is projected onto u >= 0 (Chada, Schillings & Weissmann 2019):
    emissions cannot be negative, and the projection keeps the update otherwise unchanged.
    """
    members = u.shape[1]
    if g.shape[1] != members or g.shape[0] != y.shape[0]:
        raise ValueError(f"ensemble shapes disagree: u {u.shape}, g {g.shape}, y {y.shape}")
    if members < 2:
        raise ValueError("EKI needs at least 2 members")
    root = np.sqrt(members - 1.0)
    du = (u - u.mean(axis=1, keepdims=True)) / root  # (p, J): C_uu = du du^T
    s = (g - g.mean(axis=1, keepdims=True)) / (
        sigma[:, None] * root
    )  # whitened: C_GG = Gamma^1/2 s s^T Gamma^1/2
    perturbed = y[:, None] + sigma[:, None] * rng.standard_normal((y.shape[0], members))
    innovation = (perturbed - g) / sigma[:, None]  # whitened y_j - G(u_j)
    d = y.shape[0]
    # K r = du s^T (s s^T + I)^-1 r = du (s^T s + I)^-1 s^T r  (push-through identity)
    if members <= d:
        system = s.T @ s
        system[np.diag_indices_from(system)] += 1.0
        weights = np.linalg.solve(system, s.T @ innovation)
    else:
        system = s @ s.T
        system[np.diag_indices_from(system)] += 1.0
        weights = s.T @ np.linalg.solve(system, innovation)
    updated = u + du @ weights
    if non_negative:
        np.maximum(updated, 0.0, out=updated)
    return np.asarray(updated, dtype=np.float64)


def relative_error(estimate: Array, truth: Array) -> float:
    """|estimate - truth| / |truth| in the Euclidean norm."""
    return float(np.linalg.norm(estimate - truth) / np.linalg.norm(truth))


def true_emissions(params: int) -> Array:
    """The synthetic truth (g/s): a background, a morning release peak and a short evening episode."""
    k = np.arange(params, dtype=np.float64) / max(params - 1, 1)
    morning = 40.0 * np.exp(-(((k - 0.3) / 0.1) ** 2))
    evening = 25.0 * ((k > 0.62) & (k < 0.76))
    return 5.0 + morning + evening
