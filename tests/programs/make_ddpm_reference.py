"""Writes tests/data/ddpm_reference.npz: DDPM losses and samples of the discrete-time
implementation as it stood at commit 17866ad (before the continuous-time core), so that
tests/test_processes.py can check the redesign changes none of their bits.

Run once from the repository root at that commit: python tests/programs/make_ddpm_reference.py
"""

import numpy as np
import jax
import jax.numpy as jnp

from diffusion_jax import diffusion, samplers, schedules

T = 100
SHAPE = (4, 4, 4, 1)


def model(prediction, learned=False):
    """A fixed nonlinear stand-in for a network: smooth in x, varying with t."""

    def fn(x, t):
        tf = t.astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1)) / T
        out = jnp.tanh(1.3 * x + 0.7 * tf) * (0.5 + tf) + 0.1 * jnp.sin(3.0 * x)
        if learned:
            out = jnp.concatenate([out, jnp.tanh(x - tf)], axis=-1)
        return out

    return fn


def main():
    out = {}
    key = jax.random.PRNGKey(0)
    for name in ("linear", "cosine"):
        sch = schedules.make(name, num_timesteps=T)
        x0 = jax.random.uniform(jax.random.fold_in(key, 1), SHAPE, minval=-1.0, maxval=1.0)
        noise = jax.random.normal(jax.random.fold_in(key, 2), SHAPE)
        t = jnp.array([0, 17, 63, T - 1], jnp.int32)
        for prediction in diffusion.PREDICTIONS:
            x_t = diffusion.q_sample(sch, x0, t, noise)
            m = model(prediction)(x_t, t)
            for weighting in diffusion.LOSS_WEIGHTINGS:
                losses = diffusion.training_losses(sch, m, x0, t, noise, prediction=prediction,
                                                   weighting=weighting)
                out[f"loss/{name}/{prediction}/{weighting}"] = np.asarray(losses["loss"])
            ml = model(prediction, learned=True)(x_t, t)
            losses = diffusion.training_losses(sch, ml, x0, t, noise, prediction=prediction,
                                               learn_variance=True)
            out[f"loss/{name}/{prediction}/hybrid"] = np.asarray(losses["loss"])
        for spacing in samplers.SPACINGS:
            for method, kw in (("ddim", {}), ("ddim_eta", {"eta": 0.5}), ("dpm_solver_pp", {}),
                               ("ddpm", {})):
                for prediction in ("eps", "v"):
                    for clip in (None, 1.0):
                        fn = model(prediction)
                        x = samplers.sample(fn, sch, SHAPE, jax.random.fold_in(key, 3),
                                            method=method.replace("_eta", ""), num_steps=10,
                                            prediction=prediction, clip_x0=clip,
                                            timestep_spacing=spacing, **kw)
                        ts = samplers.make_timesteps(sch, 10, spacing)
                        tag = f"sample/{name}/{spacing}/{method}/{prediction}/{clip}"
                        out[tag] = np.asarray(x)
                        out[f"grid/{name}/{spacing}"] = np.asarray(ts)
        for variance in diffusion.VARIANCES:
            fn = model("eps", learned=variance == "learned_range")
            x = samplers.sample(fn, sch, SHAPE, jax.random.fold_in(key, 4), method="ddpm",
                                num_steps=None, variance=variance)
            out[f"sample/{name}/full/ddpm/{variance}"] = np.asarray(x)
    np.savez_compressed("tests/data/ddpm_reference.npz", **out)
    print(len(out), "arrays")


if __name__ == "__main__":
    main()
