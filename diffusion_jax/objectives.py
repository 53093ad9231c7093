"""Training objectives: draw the noise level, weight, take the MSE.

    losses = objectives.training_losses(process, model_output, x0, t, noise,
                                        prediction="edm", weighting="edm")

with x_t = processes.q_sample(process, x0, t, noise), t = process.sample_t(key, [B]) and
model_output the network's output on process.network_inputs(x_t, t). Per example,

    mse  = mean over the data dimensions of (output - target)^2, target = processes.target(...)
    loss = w(t) mse.

Every weighting is a statement about which error is averaged. With k_P the factor that maps
an error of the output P to data space (x0_hat - x0 = k_P (out - target), `processes.output_scale`):

    none      w = 1: the MSE of the network's own target (L_simple for eps, Ho et al. 2020;
              the flow-matching loss for velocity, Lipman et al. 2023; EDM's loss for edm)
    eps, x0, v, velocity
              w = (k_P / k_Z)^2: the MSE of target Z whatever the network predicts
    min_snr   w = min(SNR, gamma) k_P^2: the x0-MSE weighted by min(SNR, gamma), SNR = 1 / sigma^2
              (Hang et al. 2023, eq. 9)
    edm       w = lambda(sigma) k_P^2: the x0-MSE weighted by
              lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Table 1),
              which is exactly 1 for prediction "edm"

For the discrete `ddpm` process the loss is `diffusion.training_losses` (the same weightings
for its four targets, and the hybrid VLB loss with a learned variance, Nichol & Dhariwal 2021).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, processes

__all__ = ["WEIGHTINGS", "weighting_names", "loss_weight", "training_losses"]

WEIGHTINGS = ("none", "eps", "x0", "v", "velocity", "min_snr", "edm")


def weighting_names(process) -> tuple[str, ...]:
    """The weightings a process takes (ddpm: those of `diffusion.training_losses`)."""
    return diffusion.LOSS_WEIGHTINGS if process.discrete else WEIGHTINGS


def _mean_flat(x):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def loss_weight(process, t, prediction: str, weighting: str, *, min_snr_gamma: float = 5.0) -> jax.Array:
    """w(t) [B] of the table above, for a continuous-time process."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    k = processes.output_scale(process, t, prediction)
    if weighting == "none":
        return jnp.ones_like(k)
    if weighting in ("eps", "x0", "v", "velocity"):
        return (k / processes.output_scale(process, t, weighting)) ** 2
    a, s = process.alpha_sigma(t)
    sigma = s / a
    if weighting == "min_snr":
        return jnp.minimum(1.0 / (sigma * sigma), min_snr_gamma) * k * k
    sd2 = processes._sigma_data(process) ** 2
    return (sigma * sigma + sd2) / (sigma * sigma * sd2) * k * k


def training_losses(process, model_output, x0, t, noise, *, prediction: str = "eps",
                    weighting: str = "none", min_snr_gamma: float = 5.0, learn_variance: bool = False,
                    vlb_weight: float = 1e-3) -> dict:
    """Per-example losses, each float32 [B]: "mse" and "loss" (and "vlb" for ddpm with a
    learned variance, see `diffusion.training_losses`)."""
    if process.discrete:
        return diffusion.training_losses(
            process.schedule, model_output, x0, t, noise, prediction=prediction, weighting=weighting,
            min_snr_gamma=min_snr_gamma, learn_variance=learn_variance, vlb_weight=vlb_weight)
    if learn_variance:
        raise ValueError(f"a learned variance (hybrid VLB loss) is for process 'ddpm', not {process.name!r}")
    t = jnp.broadcast_to(jnp.asarray(t), (x0.shape[0],))
    target = processes.target(process, x0, noise, t, prediction)
    mse = _mean_flat((model_output - target) ** 2)
    w = loss_weight(process, t, prediction, weighting, min_snr_gamma=min_snr_gamma)
    return {"mse": mse, "loss": w * mse}
