"""The EKI update against the textbook Kalman formula, on linear problems whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simbridge.demos.eki.eki import (
    NoiseModel,
    data_misfit,
    eki_update,
    prior_ensemble,
    relative_error,
    true_emissions,
)


def textbook_update(u, g, y, sigma, perturbed):
    """u + C_uG (C_GG + Gamma)^-1 (y_j - G_j), with explicit covariances (Iglesias et al. 2013, eq. 7)."""
    members = u.shape[1]
    du = u - u.mean(axis=1, keepdims=True)
    dg = g - g.mean(axis=1, keepdims=True)
    c_ug = du @ dg.T / (members - 1)
    c_gg = dg @ dg.T / (members - 1)
    gain = c_ug @ np.linalg.inv(c_gg + np.diag(sigma**2))
    return u + gain @ (perturbed - g)


@settings(max_examples=25, deadline=None)
@given(
    params=st.integers(2, 6),
    members=st.integers(3, 30),
    obs=st.integers(2, 20),
    seed=st.integers(0, 2**31),
)
def test_update_equals_textbook_formula_in_both_spaces(
    params: int, members: int, obs: int, seed: int
) -> None:
    # members <= obs takes the ensemble-space branch, members > obs the observation-space one.
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(params, members))
    h = rng.normal(size=(obs, params))
    g = h @ u + 0.1 * rng.normal(size=(obs, members))
    y = rng.normal(size=obs)
    sigma = rng.uniform(0.2, 2.0, size=obs)
    got = eki_update(u, g, y, sigma, np.random.default_rng(seed + 1), non_negative=False)
    # The same perturbations the implementation drew: same generator, same call.
    eta = np.random.default_rng(seed + 1).standard_normal((obs, members))
    want = textbook_update(u, g, y, sigma, y[:, None] + sigma[:, None] * eta)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)


def test_linear_problem_converges_to_the_truth_and_stays_non_negative() -> None:
    rng = np.random.default_rng(3)
    params, obs = 12, 200
    h = np.abs(rng.normal(size=(obs, params)))  # non-negative footprints, like a dispersion model's
    truth = true_emissions(params)
    clean = h @ truth
    y, sigma = NoiseModel(level=0.02).observe(clean, rng)
    u = prior_ensemble(params=params, members=60, mean=15.0, spread=0.8, rng=rng)
    start = relative_error(u.mean(axis=1), truth)
    for _ in range(5):
        u = eki_update(u, h @ u, y, sigma, rng)
        assert (u >= 0).all()
    # 2 % noise on 200 observations of 12 unknowns: the least-squares error is well under 2 %.
    assert start > 0.3
    assert relative_error(u.mean(axis=1), truth) < 0.03
    assert 0.5 < data_misfit(y, h @ u.mean(axis=1), sigma) < 2.0


def test_non_negativity_projects_only_negative_values() -> None:
    rng = np.random.default_rng(0)
    u = np.abs(rng.normal(size=(3, 10)))
    g = np.vstack([u.sum(axis=0), u[0]])
    y = np.array([-50.0, -20.0])  # data that pulls every emission far below zero
    sigma = np.array([0.1, 0.1])
    free = eki_update(u, g, y, sigma, np.random.default_rng(1), non_negative=False)
    kept = eki_update(u, g, y, sigma, np.random.default_rng(1))
    assert (free < 0).any()
    np.testing.assert_array_equal(kept, np.maximum(free, 0.0))


def test_update_refuses_mismatched_shapes_and_single_member() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="shapes disagree"):
        eki_update(np.ones((3, 4)), np.ones((5, 3)), np.ones(5), np.ones(5), rng)
    with pytest.raises(ValueError, match="at least 2"):
        eki_update(np.ones((3, 1)), np.ones((5, 1)), np.ones(5), np.ones(5), rng)


def test_noise_model_scales_with_signal_and_keeps_a_floor() -> None:
    clean = np.array([0.0, 10.0, 100.0])
    sigma = NoiseModel(level=0.1, floor=0.01).sigma(clean)
    np.testing.assert_allclose(sigma, [0.1, 1.1, 10.1])
    assert (NoiseModel(level=0.0).sigma(clean) > 0).all()
    y, s = NoiseModel(level=0.05).observe(np.full(50_000, 100.0), np.random.default_rng(0))
    assert abs(np.std(y - 100.0) / s[0] - 1.0) < 0.05
    assert abs(data_misfit(y, np.full(50_000, 100.0), s) - 1.0) < 0.05


def test_prior_is_positive_and_spread_around_its_mean() -> None:
    u = prior_ensemble(params=24, members=4000, mean=15.0, spread=0.8, rng=np.random.default_rng(0))
    assert u.shape == (24, 4000)
    assert (u > 0).all()
    assert 12.0 < float(u.mean()) < 18.0
    assert 0.6 < float(np.log(u).std(axis=1).mean()) < 1.0


def test_truth_is_non_negative_with_the_documented_episodes() -> None:
    q = true_emissions(24)
    assert q.shape == (24,)
    assert q.min() >= 5.0
    assert q.max() > 40.0
    assert np.argmax(q) in range(5, 10)
