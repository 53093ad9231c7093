"""Process math of discrete-time Gaussian diffusion: forward marginals, posteriors,
the four prediction targets, the reverse-step mean/variance, training losses and
the variational bound in bits per dimension.

Index convention: integer t in [0, T) addresses step t+1 of the seed's 1-based
notation (see `diffusion_jax.schedules`). `t` is an int array of shape [B]; a scalar
broadcasts over the batch. Arrays are NHWC (any rank >= 1 works: the leading axis is
the batch).

Notation: abar_t = alphas_cumprod[t], alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t),
x_t = alpha x0 + sigma eps (Ho et al. 2020, eq. 4).

Prediction targets (what the network outputs):
  "eps":   the noise eps (Ho et al. 2020).
  "x0":    the clean data x0.
  "v":     v = alpha eps - sigma x0 (Salimans & Ho 2022, sec. 4).
  "score": grad log q(x_t | x0) = -eps / sigma (Song et al. 2021).

Reverse step. The seed's reverse-step formula is garbled: its noise term reads
((1 - abar_{t-1}) / (1 - abar_t)) z. The correct step (Ho et al. 2020, Algorithm 2) is
    x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta) + sigma_t z,
with sigma_t^2 = beta_t ("large") or the posterior variance
beta_t (1 - abar_{t-1}) / (1 - abar_t) ("small"); both are implemented here, plus the
learned interpolation between them (Nichol & Dhariwal 2021, eq. 15).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from diffusion_jax.schedules import Schedule

__all__ = [
    "PREDICTIONS",
    "VARIANCES",
    "LOSS_WEIGHTINGS",
    "q_sample",
    "q_posterior",
    "predict_x0",
    "predict_eps",
    "prediction_target",
    "p_mean_variance",
    "training_losses",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "vlb_terms",
    "prior_bpd",
    "bits_per_dim",
    "snr",
]

PREDICTIONS = ("eps", "x0", "v", "score")
VARIANCES = ("small", "large", "learned_range")
LOSS_WEIGHTINGS = ("none", "eps", "x0", "min_snr")

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- helpers


def _check(field: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{field} must be one of {tuple(allowed)}, got {value!r}")


def _gather(table: jax.Array, t, ndim: int) -> jax.Array:
    """table[t] shaped to broadcast against an array of rank `ndim` (batch first)."""
    vals = table[jnp.asarray(t, jnp.int32)]
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def _alpha_sigma(schedule: Schedule, t, ndim: int):
    """alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), from the float64-built tables."""
    return (
        _gather(schedule.sqrt_alphas_cumprod, t, ndim),
        _gather(schedule.sqrt_one_minus_alphas_cumprod, t, ndim),
    )


def _mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis -> [B]."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def snr(schedule: Schedule, t) -> jax.Array:
    """Signal-to-noise ratio abar_t / (1 - abar_t) at integer timesteps t."""
    a, s = _alpha_sigma(schedule, t, jnp.ndim(t))
    return (a / s) ** 2


# ----------------------------------------------------------------------------- forward


def q_sample(schedule: Schedule, x0, t, noise) -> jax.Array:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (Ho et al. 2020, eq. 4)."""
    a, s = _alpha_sigma(schedule, t, x0.ndim)
    return a * x0 + s * noise


def q_posterior(schedule: Schedule, x0, x_t, t):
    """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0) (Ho et al. 2020, eq. 6-7).

    Returns arrays broadcast to x_t's shape.
    """
    nd = x_t.ndim
    mean = _gather(schedule.posterior_mean_coef1, t, nd) * x0 + _gather(
        schedule.posterior_mean_coef2, t, nd
    ) * x_t
    var = jnp.broadcast_to(_gather(schedule.posterior_variance, t, nd), x_t.shape)
    log_var = jnp.broadcast_to(_gather(schedule.posterior_log_variance_clipped, t, nd), x_t.shape)
    return mean, var, log_var


# ----------------------------------------------------------------------------- targets

# Each entry maps (x_t, model_output, alpha, sigma) to x0 resp. eps; derived from
# x_t = alpha x0 + sigma eps, v = alpha eps - sigma x0, score = -eps / sigma, alpha^2 + sigma^2 = 1.
_TO_X0: dict[str, Callable] = {
    "eps": lambda x, m, a, s: (x - s * m) / a,
    "x0": lambda x, m, a, s: m,
    "v": lambda x, m, a, s: a * x - s * m,
    "score": lambda x, m, a, s: (x + s * s * m) / a,
}
_TO_EPS: dict[str, Callable] = {
    "eps": lambda x, m, a, s: m,
    "x0": lambda x, m, a, s: (x - a * m) / s,
    "v": lambda x, m, a, s: s * x + a * m,
    "score": lambda x, m, a, s: -s * m,
}
_TARGET: dict[str, Callable] = {
    "eps": lambda x0, n, a, s: n,
    "x0": lambda x0, n, a, s: x0,
    "v": lambda x0, n, a, s: a * n - s * x0,
    "score": lambda x0, n, a, s: -n / s,
}


def predict_x0(schedule: Schedule, x_t, t, model_output, prediction: str = "eps") -> jax.Array:
    """x0 implied by a model output of the given prediction target."""
    _check("prediction", prediction, PREDICTIONS)
    a, s = _alpha_sigma(schedule, t, x_t.ndim)
    return _TO_X0[prediction](x_t, model_output, a, s)


def predict_eps(schedule: Schedule, x_t, t, model_output, prediction: str = "eps") -> jax.Array:
    """eps implied by a model output of the given prediction target."""
    _check("prediction", prediction, PREDICTIONS)
    a, s = _alpha_sigma(schedule, t, x_t.ndim)
    return _TO_EPS[prediction](x_t, model_output, a, s)


def prediction_target(schedule: Schedule, x0, noise, t, prediction: str = "eps") -> jax.Array:
    """The regression target of a prediction type for x_t = q_sample(schedule, x0, t, noise)."""
    _check("prediction", prediction, PREDICTIONS)
    a, s = _alpha_sigma(schedule, t, x0.ndim)
    return _TARGET[prediction](x0, noise, a, s)


# ----------------------------------------------------------------------------- reverse step


def _split_learned(x_t, model_output):
    c = x_t.shape[-1]
    if model_output.shape[-1] != 2 * c:
        raise ValueError(
            "with learned variance model_output must have 2x the channels of x_t "
            f"({2 * c}), got {model_output.shape[-1]}"
        )
    return model_output[..., :c], model_output[..., c:]


def _clip(x0, clip_x0):
    if clip_x0 is None or clip_x0 is False:
        return x0
    bound = 1.0 if clip_x0 is True else clip_x0
    return jnp.clip(x0, -bound, bound)


def _large_log_variance(schedule: Schedule, t, ndim: int):
    """log of [posterior_variance[1], betas[1:]] (Ho et al. 2020 "fixedlarge")."""
    t = jnp.asarray(t, jnp.int32)
    first = schedule.posterior_variance[min(1, schedule.num_timesteps - 1)]
    if schedule.num_timesteps == 1:
        first = schedule.betas[0]
    var = jnp.where(t == 0, first, schedule.betas[t])
    return jnp.log(var.reshape(var.shape + (1,) * (ndim - var.ndim)))


def p_mean_variance(
    schedule: Schedule,
    x_t,
    t,
    model_output,
    *,
    prediction: str = "eps",
    variance: str = "small",
    clip_x0=None,
) -> dict:
    """Mean and variance of the reverse step p(x_{t-1} | x_t).

    mean = posterior mean q(x_{t-1} | x_t, x0_hat) with x0_hat from the model
    (Ho et al. 2020 eq. 11 written through x0). variance: "small" = posterior variance
    (log clipped at t = 0), "large" = beta_t (posterior_variance[1] at t = 0),
    "learned_range": the last C channels of model_output hold v in [-1, 1] and
    log var = frac log beta_t + (1 - frac) log posterior_variance_clipped, frac = (v + 1) / 2
    (Nichol & Dhariwal 2021, eq. 15). clip_x0: None (off), True (clip to [-1, 1]) or a bound.

    Returns dict(mean, variance, log_variance, pred_x0), each shaped like x_t.
    """
    _check("prediction", prediction, PREDICTIONS)
    _check("variance", variance, VARIANCES)
    nd = x_t.ndim
    if variance == "learned_range":
        model_output, var_values = _split_learned(x_t, model_output)
        min_log = _gather(schedule.posterior_log_variance_clipped, t, nd)
        max_log = _gather(jnp.log(schedule.betas), t, nd)
        frac = (var_values + 1.0) / 2.0
        log_var = frac * max_log + (1.0 - frac) * min_log
    elif variance == "large":
        log_var = jnp.broadcast_to(_large_log_variance(schedule, t, nd), x_t.shape)
    else:
        log_var = jnp.broadcast_to(_gather(schedule.posterior_log_variance_clipped, t, nd), x_t.shape)
    pred_x0 = _clip(predict_x0(schedule, x_t, t, model_output, prediction), clip_x0)
    mean, _, _ = q_posterior(schedule, pred_x0, x_t, t)
    if variance == "small":
        var = jnp.broadcast_to(_gather(schedule.posterior_variance, t, nd), x_t.shape)
    else:
        var = jnp.exp(log_var)
    return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=pred_x0)


# ----------------------------------------------------------------------------- likelihood


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats."""
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * jnp.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x, *, means, log_scales) -> jax.Array:
    """Elementwise log-probability (nats) of 8-bit data x in [-1, 1] under a Gaussian
    discretised into 256 bins of width 2/255 (Ho et al. 2020, eq. 13); the edge bins
    extend to -inf and +inf so the 256 probabilities sum to 1.

    Computed with log-CDF differences taken on the tail away from the mean, which stays
    accurate for narrow Gaussians and far-off bins.
    """
    inv_std = jnp.exp(-log_scales)
    centered = x - means
    hi = (centered + 1.0 / 255.0) * inv_std
    lo = (centered - 1.0 / 255.0) * inv_std
    log_cdf_hi = jax.scipy.special.log_ndtr(hi)  # bin at x = -1: P(z < hi)
    log_sf_lo = jax.scipy.special.log_ndtr(-lo)  # bin at x = +1: P(z > lo)
    # Interior bins: P(lo < z < hi) = Phi(b) - Phi(a) with (a, b) = (lo, hi), or
    # (-hi, -lo) by symmetry when the bin lies above the mean (smaller Phi values, no cancellation).
    upper = centered > 0
    a = jnp.where(upper, -hi, lo)
    b = jnp.where(upper, -lo, hi)
    log_b = jax.scipy.special.log_ndtr(b)
    d = jnp.minimum(jax.scipy.special.log_ndtr(a) - log_b, -1e-30)
    log_mid = log_b + jnp.log(-jnp.expm1(d))
    log_mid = jnp.maximum(log_mid, math.log(1e-30))
    return jnp.where(x < -0.999, log_cdf_hi, jnp.where(x > 0.999, log_sf_lo, log_mid))


def vlb_terms(
    schedule: Schedule,
    x0,
    x_t,
    t,
    model_output,
    *,
    prediction: str = "eps",
    variance: str = "small",
) -> jax.Array:
    """Per-example VLB term L_t in bits per dimension, [B] (Ho et al. 2020 eq. 5;
    Nichol & Dhariwal 2021 eq. 4-6): the decoder NLL -log p(x0 | x_1) at t = 0, and
    KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t >= 1.
    """
    out = p_mean_variance(
        schedule, x_t, t, model_output, prediction=prediction, variance=variance
    )
    true_mean, _, true_log_var = q_posterior(schedule, x0, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / _LN2
    nll = -_mean_flat(
        discretized_gaussian_log_likelihood(
            x0, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
    ) / _LN2
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), kl.shape)
    return jnp.where(t == 0, nll, kl)


def prior_bpd(schedule: Schedule, x0) -> jax.Array:
    """KL(q(x_{T-1} | x0) || N(0, I)) in bits per dimension, [B]; does not depend on the model."""
    t_last = schedule.num_timesteps - 1
    a, s = schedule.sqrt_alphas_cumprod[t_last], schedule.sqrt_one_minus_alphas_cumprod[t_last]
    kl = normal_kl(a * x0, 2.0 * jnp.log(s), 0.0, 0.0)
    return _mean_flat(kl) / _LN2


def bits_per_dim(
    denoise_fn: Callable,
    schedule: Schedule,
    x0,
    key,
    *,
    prediction: str = "eps",
    variance: str = "small",
    num_timesteps: int | None = None,
) -> dict:
    """Negative VLB in bits per dimension of data x0 in [-1, 1] (8-bit), per example.

    total = prior KL at T + sum_{t>=1} KL terms + decoder NLL at t = 0, each a mean
    over the D data dimensions divided by ln 2 (Ho et al. 2020 sec. 3.3; Nichol &
    Dhariwal 2021 sec. 2). num_timesteps=None evaluates all T terms (T network calls);
    an int K draws, per example, K timesteps uniformly from [0, T) with replacement and
    returns the unbiased estimate (T / K) sum_k L_{t_k}; examples are independent, so the
    caller gets a standard error from the spread of the per-example values.

    Returns dict of float32 [B]: total_bpd, prior_bpd, vb_bpd (KL terms t >= 1), decoder_bpd.
    Runs as one lax.scan; jit it (denoise_fn may close over traced params).
    """
    _check("prediction", prediction, PREDICTIONS)
    _check("variance", variance, VARIANCES)
    T = schedule.num_timesteps
    B = x0.shape[0]
    key_t, key_noise = jax.random.split(key)
    if num_timesteps is None:
        ts = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, B))
        scale = 1.0
        K = T
    else:
        if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
            raise ValueError(f"num_timesteps must be None or an integer >= 1, got {num_timesteps!r}")
        K = num_timesteps
        ts = jax.random.randint(key_t, (K, B), 0, T, dtype=jnp.int32)
        scale = T / K
    keys = jax.random.split(key_noise, K)

    def body(carry, inp):
        vb, dec = carry
        t, k = inp
        noise = jax.random.normal(k, x0.shape, x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        term = vlb_terms(
            schedule, x0, x_t, t, denoise_fn(x_t, t), prediction=prediction, variance=variance
        )
        vb = vb + jnp.where(t > 0, term, 0.0)
        dec = dec + jnp.where(t == 0, term, 0.0)
        return (vb, dec), None

    zeros = jnp.zeros((B,), jnp.float32)
    (vb, dec), _ = jax.lax.scan(body, (zeros, zeros), (ts, keys))
    prior = prior_bpd(schedule, x0)
    vb, dec = scale * vb, scale * dec
    return dict(total_bpd=prior + vb + dec, prior_bpd=prior, vb_bpd=vb, decoder_bpd=dec)


# ----------------------------------------------------------------------------- losses


def _weight_eps(prediction, a, s):
    """c with ||eps_hat - eps||^2 = c ||out - target||^2 for each target (c as a function of alpha, sigma)."""
    return {"eps": 1.0, "x0": (a / s) ** 2, "v": a * a, "score": s * s}[prediction]


def _weight_x0(prediction, a, s):
    """c with ||x0_hat - x0||^2 = c ||out - target||^2."""
    return {"eps": (s / a) ** 2, "x0": 1.0, "v": s * s, "score": (s * s / a) ** 2}[prediction]


def _loss_weight(schedule, t, prediction, weighting, min_snr_gamma):
    a, s = _alpha_sigma(schedule, t, 1)
    a, s = a.reshape(-1), s.reshape(-1)
    if weighting == "none":
        w = jnp.ones_like(a)
    elif weighting == "eps":
        w = _weight_eps(prediction, a, s) * jnp.ones_like(a)
    elif weighting == "x0":
        w = _weight_x0(prediction, a, s) * jnp.ones_like(a)
    else:  # "min_snr": x0-space weight min(SNR, gamma) (Hang et al. 2023, eq. 9)
        # min(SNR, gamma) * c_x0 = c_eps where SNR < gamma, else gamma * c_x0 (no inf * 0).
        w = jnp.where(
            (a / s) ** 2 < min_snr_gamma,
            _weight_eps(prediction, a, s) * jnp.ones_like(a),
            min_snr_gamma * _weight_x0(prediction, a, s) * jnp.ones_like(a),
        )
    return w


def training_losses(
    schedule: Schedule,
    model_output,
    x0,
    t,
    noise,
    *,
    prediction: str = "eps",
    weighting: str = "none",
    min_snr_gamma: float = 5.0,
    learn_variance: bool = False,
    vlb_weight: float = 1e-3,
) -> dict:
    """Per-example training losses, each float32 [B].

    model_output is the network's output on x_t = q_sample(schedule, x0, t, noise).
    "mse": mean over non-batch dims of (out - target)^2 in the target's space.
    "loss" = w(t) * mse + (vlb term if learn_variance), with w(t) by `weighting`:
      "none": 1 (plain MSE in the target's space, Ho et al. 2020 L_simple for eps);
      "eps":  the factor making the loss equal the eps-MSE for any target;
      "x0":   the factor making the loss equal the x0-MSE;
      "min_snr": x0-MSE weighted by min(SNR_t, gamma) (Hang et al. 2023), i.e. for eps
              min(SNR, gamma) / SNR, for v min(SNR, gamma) / (SNR + 1).
    learn_variance: model_output has 2C channels (prediction, then v in [-1, 1] for the
    "learned_range" variance) and the hybrid loss of Nichol & Dhariwal 2021 (sec. 3.1) is
    used: loss = w mse + vlb_weight * T * L_t, where L_t (returned as "vlb", bits/dim) is
    computed with a stop-gradient on the predicted mean so it trains only the variance;
    T * L_t is the single-sample estimate of L_vlb = sum_t L_t under uniform t, so the
    default vlb_weight = 1e-3 equals improved-diffusion's weighting at T = 1000.
    """
    _check("prediction", prediction, PREDICTIONS)
    _check("weighting", weighting, LOSS_WEIGHTINGS)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x0.shape[0],))
    if learn_variance:
        pred, var_values = _split_learned(x0, model_output)
    else:
        pred = model_output
    target = prediction_target(schedule, x0, noise, t, prediction)
    mse = _mean_flat((pred - target) ** 2)
    w = _loss_weight(schedule, t, prediction, weighting, min_snr_gamma)
    out = {"mse": mse}
    loss = w * mse
    if learn_variance:
        x_t = q_sample(schedule, x0, t, noise)
        frozen = jnp.concatenate([jax.lax.stop_gradient(pred), var_values], axis=-1)
        vlb = vlb_terms(
            schedule, x0, x_t, t, frozen, prediction=prediction, variance="learned_range"
        )
        out["vlb"] = vlb
        loss = loss + vlb_weight * schedule.num_timesteps * vlb
    out["loss"] = loss
    return out
