"""Bits/dim (diffusion_jax.evaluation.likelihood) against discretised-Gaussian oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import log_ndtr, ndtr

from diffusion_jax import schedules
from diffusion_jax.evaluation import likelihood


# ----------------------------------------------------------------------------- bits/dim


def _discretised_gaussian(mu, s):
    """P[d, k] of the 256 pixel levels x_k = k/127.5 - 1 of y ~ N(mu_d, s_d^2) rounded to the
    nearest level (edge levels take the tails), in float64."""
    levels = np.arange(256) / 127.5 - 1.0
    lo = np.where(np.arange(256) == 0, -np.inf, levels - 1.0 / 255.0)
    hi = np.where(np.arange(256) == 255, np.inf, levels + 1.0 / 255.0)
    mu, s = mu.reshape(-1, 1), s.reshape(-1, 1)
    return ndtr((hi - mu) / s) - ndtr((lo - mu) / s), levels


def _expected_bound_bits(mu, s, betas, variance):
    """E[variational bound] in bits/dim, float64, for data that is N(mu, s^2) rounded to 8 bits
    and the continuous-Gaussian oracle x0_hat(x_t) = mu + g_t (x_t - sqrt(abar_t) mu),
    g_t = sqrt(abar_t) s^2 / (abar_t s^2 + 1 - abar_t) (the eps-oracle of the test, rewritten).

    Everything is Gaussian except the decoder, so the terms are closed forms (Ho et al. 2020,
    eq. 5-7; 1-based t below):
      prior   KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), averaged over the discrete x0;
      t >= 2  KL(N(mu~_t, beta~_t) || N(mu_theta, v_t)) = 1/2 [log(v_t / beta~_t) + beta~_t / v_t - 1
              + c_t^2 E(x0 - x0_hat)^2 / v_t], c_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t), and
              E(x0 - x0_hat)^2 = E(x0 - mu)^2 (1 - g_t sqrt(abar_t))^2 + g_t^2 (1 - abar_t), exact
              for the linear oracle (noise independent of x0);
      t = 1   -E log P_dec(x0 | x_1), P_dec the discretised N(x0_hat(x_1), v_1): a 1-D Gauss-Hermite
              integral over the noise for every level of every dimension.
    """
    P, levels = _discretised_gaussian(mu, s)
    mu, s = mu.reshape(-1, 1), s.reshape(-1, 1)
    alphas_cumprod = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - alphas_cumprod)
    clipped = np.concatenate([[post_var[1]], post_var[1:]])
    v = clipped if variance == "small" else np.concatenate([[post_var[1]], betas[1:]])
    second = np.sum(P * (levels - mu) ** 2, axis=1, keepdims=True)  # E(x0 - mu)^2 per dim
    total = np.zeros(len(mu))
    # prior
    a_T = alphas_cumprod[-1]
    ex2 = np.sum(P * levels ** 2, axis=1)
    total += 0.5 * (a_T * ex2 + (1 - a_T) - 1 - np.log(1 - a_T))
    # KL terms, 0-based index i >= 1
    for i in range(1, len(betas)):
        a = alphas_cumprod[i]
        g = np.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)
        err = second * (1 - g * np.sqrt(a)) ** 2 + g ** 2 * (1 - a)
        c = betas[i] * np.sqrt(abar_prev[i]) / (1 - a)
        total += (0.5 * (np.log(v[i] / post_var[i]) + post_var[i] / v[i] - 1 + c ** 2 * err / v[i]))[:, 0]
    # decoder: x_1 = sqrt(a_1) x_k + sqrt(1 - a_1) z, mean x0_hat(x_1), std sqrt(v_0)
    a = alphas_cumprod[0]
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    g = np.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)
    x1 = np.sqrt(a) * levels[None, :, None] + np.sqrt(1 - a) * z[None, None, :]
    mean = mu[:, :, None] + g[:, :, None] * (x1 - np.sqrt(a) * mu[:, :, None])
    std = np.sqrt(v[0])
    x = levels[None, :, None]
    hi = np.where(x > 0.999, np.inf, x + 1 / 255)
    lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
    # log(Phi(b) - Phi(a)) evaluated on the far tail for accuracy
    up = (x - mean) > 0
    a_, b_ = np.where(up, -(hi - mean) / std, (lo - mean) / std), np.where(up, -(lo - mean) / std, (hi - mean) / std)
    log_p = log_ndtr(b_) + np.log1p(-np.exp(np.minimum(log_ndtr(a_) - log_ndtr(b_), -1e-300)))
    total += -np.sum(P * np.sum(w * log_p, axis=2), axis=1)
    entropy = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0), axis=1)
    return total.mean() / np.log(2), entropy.mean() / np.log(2)


def _gaussian_case(num_images, seed=0):
    rng = np.random.default_rng(seed)
    shape = (4, 4, 1)
    mu, s = rng.uniform(-0.3, 0.3, shape), rng.uniform(0.15, 0.4, shape)
    y = mu + s * rng.standard_normal((num_images, *shape))
    images = np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8)
    sch = schedules.linear(1000)
    ab = sch.alphas_cumprod
    mu_j, s2_j = jnp.asarray(mu, jnp.float32), jnp.asarray(s ** 2, jnp.float32)

    def oracle(x_t, t):
        # eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar): E[eps | x_t]
        # for x0 ~ N(mu, s^2), exact for continuous Gaussian data.
        a = ab[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1.0 - a) * (x_t - jnp.sqrt(a) * mu_j) / (a * s2_j + 1.0 - a)

    return images, mu, s, sch, oracle


@pytest.mark.parametrize("variance", ["small", "large"])
def test_bits_per_dim_of_gaussian_oracle_bounds_the_discrete_entropy(variance):
    """The bound's excess over the entropy H of the 8-bit data, derived (1-based t):

      E[L] - H = E KL(q(x0 | x_1) || p_dec(x0 | x_1))            decoder
               + KL(q(x_1) || p(x_1)) + E KL(q(x_{2:T} | x_1) || p(x_{2:T} | x_1))   >= 0
    so E[L] >= H always. With the oracle the means are exact for continuous data; what is left:
    (i) the decoder's std sqrt(beta~_2) ~ 0.0074 against the true posterior's ~ sqrt(beta_1) = 0.01
    on bins 2/255 wide (~0.1-0.2 bit); (ii) the fixed reverse variance v_t against the true
    reverse variance, which near t = 1 is ~beta_t, not beta~_t = beta_t (t-1)/t: for "small" a sum
    of 1/2 (r - 1 - ln r), r = t/(t-1), ~ (pi^2/6 - ...)/4 nats ~ 0.6 bit; for "large" ~0;
    (iii) the discrete-vs-continuous prior of the oracle (variance s^2 vs s^2 + (2/255)^2/12), tiny.
    `_expected_bound_bits` computes E[L] exactly from these closed forms in float64; the margin is
    its excess over H plus 4 standard errors of the Monte-Carlo mean.
    """
    images, mu, s, sch, oracle = _gaussian_case(512)
    expected, entropy = _expected_bound_bits(mu, s, np.linspace(1e-4, 0.02, 1000, dtype=np.float64), variance)
    assert expected > entropy  # the bound, in exact arithmetic
    excess = expected - entropy
    assert 0.05 < excess < (1.0 if variance == "small" else 0.3)  # the sizes argued above
    out = likelihood.dataset_bits_per_dim(oracle, sch, images, jax.random.PRNGKey(0), batch_size=512,
                                          variance=variance)
    bpd, stderr = out["total_bpd"], out["total_bpd_stderr"]
    assert out["num_timesteps"] == 1000 and out["num_images"] == 512
    assert bpd >= entropy + excess - 4 * stderr >= entropy  # never below the entropy
    assert bpd <= entropy + excess + 4 * stderr  # within the derived margin
    assert abs(out["prior_bpd"]) < 1e-3  # abar_T ~ 4e-5: x_T is almost exactly N(0, 1)


def test_sampled_timestep_estimators_are_unbiased():
    images, mu, s, sch, oracle = _gaussian_case(400, seed=1)
    expected, _ = _expected_bound_bits(mu, s, np.linspace(1e-4, 0.02, 1000, dtype=np.float64), "small")
    results = {}
    for estimator in ("uniform", "stratified"):
        out = likelihood.dataset_bits_per_dim(oracle, sch, images, jax.random.PRNGKey(1), batch_size=400,
                                              num_timesteps=20, estimator=estimator)
        assert abs(out["total_bpd"] - expected) < 4 * out["total_bpd_stderr"], (estimator, out, expected)
        results[estimator] = out
    assert results["uniform"]["calls_per_image"] == 20 and results["stratified"]["calls_per_image"] <= 21
    # The same network calls, a far smaller error: the terms concentrate at small t.
    assert results["stratified"]["total_bpd_stderr"] < results["uniform"]["total_bpd_stderr"] / 4
    starts, sizes = likelihood.geometric_strata(1000, 20)
    assert starts[0] == 1 and starts[-1] + sizes[-1] == 1000 and np.all(starts[1:] == starts[:-1] + sizes[:-1])
    with pytest.raises(ValueError, match="uint8"):
        likelihood.dataset_bits_per_dim(oracle, sch, images.astype(np.float32), jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="estimator"):
        likelihood.dataset_bits_per_dim(oracle, sch, images, jax.random.PRNGKey(1), num_timesteps=5,
                                        estimator="importance")
