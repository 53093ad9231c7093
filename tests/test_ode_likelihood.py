"""The probability-flow ODE likelihood (diffusion_jax.ode_likelihood and the bits/dim driver of
diffusion_jax.evaluation.likelihood) against the exact densities of Gaussian-mixture data."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from diffusion_jax import ode_likelihood, oracles, processes, schedules
from diffusion_jax.evaluation import likelihood

# Mean 0: the prior N(0, sigma_max^2) then errs by O(1 / sigma_max^2) per example, not O(mean / sigma_max).
MIX = oracles.GaussianMixture((0.4, 0.6), (-0.6, 0.4), (0.15, 0.3))
CONTINUOUS = {"edm": processes.EDM(), "flow": processes.Flow(), "vp-cosine": processes.VP("cosine")}


def _mixture_logp(law, x, sigma):
    """log of (law convolved with N(0, sigma^2)) at x [B, D], dimensions independent; float64."""
    w, mu, c = (np.asarray(v, np.float64)[:, None, None] for v in law)
    var = c * c + sigma * sigma
    per_dim = logsumexp(np.log(w) - 0.5 * np.log(2 * np.pi * var) - 0.5 * (x[None] - mu) ** 2 / var, axis=0)
    return per_dim.sum(-1)


def _mixture_draws(law, n, d, seed):
    rng = np.random.default_rng(seed)
    k = rng.choice(len(law.weights), size=(n, d), p=law.weights)
    return np.asarray(law.means)[k] + np.asarray(law.stds)[k] * rng.standard_normal((n, d))


@pytest.mark.parametrize("name", sorted(CONTINUOUS))
def test_exact_divergence_converges_at_the_solvers_order_to_the_mixture_density(name):
    """With the exact denoiser of the mixture, the ODE's log p_{sigma_min}(x) tends to the
    closed form: from 8 to 32 steps the error falls by 2^(2p) with p ~ 4 for RK4 (measured
    4.1) and ~ 2 for Heun (measured 2.3)."""
    process = CONTINUOUS[name]
    x = _mixture_draws(MIX, 48, 3, seed=0)
    exact = _mixture_logp(MIX, x, process.sigma_range()[0])
    errors = {}
    for solver in ("rk4", "heun"):
        for n in (8, 32):
            fn = jax.jit(lambda v, n=n, s=solver: ode_likelihood.log_likelihood(
                MIX.denoiser(process), process, v, num_steps=n, solver=s, divergence="exact"))
            errors[solver, n] = np.abs(np.asarray(fn(x), np.float64) - exact).max()
    order = {s: np.log2(errors[s, 8] / errors[s, 32]) / 2 for s in ("rk4", "heun")}
    assert order["rk4"] > 3.3 and 1.7 < order["heun"] < 3.0, (errors, order)
    assert errors["rk4", 32] < 2e-3, errors  # nats for 3 dimensions


def test_hutchinson_estimate_is_unbiased_for_the_exact_divergence():
    """Rotated mixture data x = R u (u per-dimension mixture, R orthogonal), whose denoiser
    R x0_hat(R^T x) has a full Jacobian: many probes of one point average to the exact-divergence
    result on the same grid within 4 standard errors, for Rademacher and Gaussian probes; and
    the exact result is the closed-form density of R^T x."""
    process = processes.EDM()
    rot = np.linalg.qr(np.random.default_rng(5).standard_normal((4, 4)))[0].astype(np.float32)
    base = MIX.denoiser(process)

    def denoise(x, t):
        p = base(x @ rot, t)  # rows: x @ R = (R^T x)^T
        x0 = p.x0 @ rot.T
        return p._replace(x0=x0, eps=p.eps @ rot.T, out=x0)

    u = _mixture_draws(MIX, 1, 4, seed=1)
    x = u @ rot.T
    exact = float(ode_likelihood.log_likelihood(denoise, process, x, num_steps=32, divergence="exact")[0])
    assert abs(exact - _mixture_logp(MIX, u, process.sigma_range()[0])[0]) < 2e-3
    exact6 = float(ode_likelihood.log_likelihood(denoise, process, x, num_steps=6, divergence="exact")[0])
    reps = np.repeat(x, 512, axis=0)
    for probe in ("rademacher", "gaussian"):
        est = np.asarray(jax.jit(lambda v, k, p=probe: ode_likelihood.log_likelihood(
            denoise, process, v, k, num_steps=6, divergence=p))(reps, jax.random.PRNGKey(3)))
        stderr = est.std(ddof=1) / math.sqrt(len(est))
        assert est.std() > 1e-2, probe  # the probes do vary the estimate
        assert abs(est.mean() - exact6) < 4 * stderr, (probe, est.mean(), exact6, stderr)


def test_bits_per_dim_of_dequantised_pixels_matches_the_gaussian_closed_form():
    """Data law N(0, c^2) per pixel: the model density at sigma_min is N(0, v), v = c^2 +
    sigma_min^2, so E_u[-log p(y_k + e)], e = (u - 1/2) h, h = 1 / 127.5, is
    0.5 log(2 pi v) + (y_k^2 + h^2 / 12) / (2 v) per pixel, and bits/dim adds log2(127.5).
    The tolerance is 4 standard errors of the dequantisation noise alone (its variance per
    pixel: (y_k^2 h^2 / 3 + h^4 / 80 - h^4 / 144) / (4 v^2)) plus 5e-4 bits for the solver."""
    c = 0.35
    law = oracles.GaussianMixture((1.0,), (0.0,), (c,))
    process = processes.EDM()
    rng = np.random.default_rng(2)
    images = np.clip(np.round((c * rng.standard_normal((1200, 2, 2, 1)) + 1) * 127.5), 0, 255).astype(np.uint8)
    y = images.astype(np.float64) / 127.5 - 1
    v, h = c * c + process.sigma_range()[0] ** 2, 1 / 127.5
    nats = 0.5 * np.log(2 * np.pi * v) + (y**2 + h * h / 12) / (2 * v)
    expected = nats.mean() / math.log(2) + math.log2(127.5)
    noise = math.sqrt(np.sum((y**2 * h * h / 3 + h**4 / 80 - h**4 / 144) / (4 * v * v))) / (y.size * math.log(2))
    out = likelihood.dataset_bits_per_dim_ode(law.denoiser(process), process, images, jax.random.PRNGKey(4),
                                              batch_size=400, num_steps=16, divergence="exact")
    assert out["num_images"] == 1200 and out["calls_per_image"] == 4 * 16 * 4
    assert abs(out["total_bpd"] - expected) < 4 * noise + 5e-4, (out, expected, noise)


def test_refuses_bad_input_in_one_line():
    x = np.zeros((2, 3), np.float32)
    den = MIX.denoiser(processes.EDM())
    ddpm = processes.DDPM(schedules.linear(100))
    with pytest.raises(ValueError, match="variational bound"):
        ode_likelihood.log_likelihood(MIX.denoiser(ddpm), ddpm, x)
    with pytest.raises(ValueError, match="num_steps"):
        ode_likelihood.log_likelihood(den, processes.EDM(), x, num_steps=0, divergence="exact")
    with pytest.raises(ValueError, match="divergence"):
        ode_likelihood.log_likelihood(den, processes.EDM(), x, divergence="exact-ish")
    with pytest.raises(ValueError, match="PRNG key"):
        ode_likelihood.log_likelihood(den, processes.EDM(), x)
    with pytest.raises(ValueError, match="sigma_lo"):
        ode_likelihood.log_likelihood(den, processes.EDM(), x, divergence="exact", sigma_lo=0.0)
    with pytest.raises(ValueError, match="uint8"):
        likelihood.dataset_bits_per_dim_ode(den, processes.EDM(), np.zeros((4, 2, 2, 1), np.float32),
                                            jax.random.PRNGKey(0))
