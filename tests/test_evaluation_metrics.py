"""Evaluation metrics (diffusion_jax.evaluation.metrics) on inputs whose answer is known independently (float64 numpy / scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from diffusion_jax.evaluation import metrics


# ----------------------------------------------------------------------------- Frechet distance


def _fd_scipy(mu1, s1, mu2, s2):
    """FD with scipy.linalg.sqrtm of the (non-symmetric) product, float64 -- an independent route."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_commuting_closed_form():
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # One dimension: (mu1 - mu2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance([0.5], [[4.0]], [-0.5], [[1.0]]) == pytest.approx(1.0 + 1.0)


def test_frechet_distance_non_commuting_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-8)
        assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_from_features_converges_to_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    n = 200_000
    f1 = rng.multivariate_normal(mu1, s1, size=n)
    f2 = rng.multivariate_normal(mu2, s2, size=n)
    assert metrics.frechet_distance_from_features(f1, f2) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=0.03)


# ----------------------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_explicit_double_sum():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 1.0
    k = lambda a, b: (a @ b / 3 + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_mmd2_unbiased_has_zero_mean_for_identical_distributions():
    # Independent replicate pairs from one distribution: the U-statistic averages to 0, while
    # the V-statistic (diagonal included) is biased upwards by ~(E k(x,x) - E k(x,y)) * 2 / m.
    rng = np.random.default_rng(3)
    m, d, reps = 40, 8, 400
    u, v = [], []
    for _ in range(reps):
        x, y = rng.standard_normal((m, d)), rng.standard_normal((m, d))
        u.append(metrics.mmd2_unbiased(x, y))
        k = metrics.polynomial_kernel
        v.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    u, v = np.array(u), np.array(v)
    stderr = u.std() / np.sqrt(reps)
    assert abs(u.mean()) < 4 * stderr
    assert v.mean() > u.mean() + 10 * stderr


def test_kid_ordered_by_shift():
    rng = np.random.default_rng(3)
    d, n = 8, 1000
    base = rng.standard_normal((n, d))
    same = metrics.kernel_inception_distance(base, rng.standard_normal((n, d)), num_subsets=3, subset_size=250)[0]
    shifted = [metrics.kernel_inception_distance(base, rng.standard_normal((n, d)) + delta,
                                                 num_subsets=3, subset_size=250)[0]
               for delta in (0.25, 0.5, 1.0)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 5 * abs(same)


# ----------------------------------------------------------------------------- IS analogue, accuracy


def test_inception_score_known_values():
    k = 10
    confident_uniform = np.eye(k)[np.arange(1000) % k]  # certain, every class equally often
    assert metrics.inception_score(confident_uniform)[0] == pytest.approx(k, rel=1e-12)
    assert metrics.inception_score(np.full((100, k), 1.0 / k))[0] == pytest.approx(1.0)  # no confidence
    assert metrics.inception_score(np.eye(k)[np.zeros(100, int)])[0] == pytest.approx(1.0)  # one class
    # Two equiprobable classes, each predicted with p = 0.9: exp(KL) = exp(ln 2 - H(0.9)).
    p = np.array([[0.9, 0.1], [0.1, 0.9]] * 50)
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert metrics.inception_score(p)[0] == pytest.approx(np.exp(np.log(2) - h), rel=1e-12)
    with pytest.raises(ValueError, match="probs"):
        metrics.inception_score(np.full((4, 3), 2.0))


def test_conditional_accuracy():
    probs = np.eye(3)[[0, 1, 2, 2]]
    assert metrics.conditional_accuracy(probs, [0, 1, 2, 0]) == 0.75
    # per class: class 0 has one hit in two, class 1 one in one, class 2 one in one, class 3 none drawn
    assert metrics.conditional_accuracy_per_class(np.eye(4)[[0, 1, 2, 2]], [0, 1, 2, 0], 4) == [0.5, 1.0, 1.0, None]
