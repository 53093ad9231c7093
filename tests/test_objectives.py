"""Objectives: each weighting equals the MSE it names, and a tiny network learns under
every process (its loss on fixed inputs falls at least 10x)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import models, objectives, ops, processes, schedules
from models_support import init, jit, tiny_unet

PROCESSES = {
    "ddpm": (processes.DDPM(schedules.linear(1000)), "eps", "none"),
    "vp": (processes.VP("cosine"), "v", "none"),
    "edm": (processes.EDM(), "edm", "edm"),
    "flow": (processes.Flow(t_sampling="logit_normal"), "velocity", "none"),
}


@pytest.mark.parametrize("name", ["vp", "edm", "flow"])
def test_weightings_are_the_mse_of_the_target_they_name(name):
    """For output = target + delta: w * mse equals the MSE of the implied Z_hat against Z."""
    process = PROCESSES[name][0]
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    t = jnp.clip(process.sample_t(k[0], (8,)), 0.05, 0.95 if name != "edm" else 50.0)
    x0 = jax.random.uniform(k[1], (8, 4, 4, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k[2], x0.shape)
    delta = 0.1 * jax.random.normal(k[3], x0.shape)
    x_t = processes.q_sample(process, x0, t, eps)
    for prediction in process.predictions:
        out = processes.target(process, x0, eps, t, prediction) + delta
        x0_hat = processes.to_x0(process, x_t, t, out, prediction)
        eps_hat = (x_t - processes._broadcast(process.alpha_sigma(t)[0], 4) * x0_hat) / processes._broadcast(
            process.alpha_sigma(t)[1], 4)
        mse = lambda a, b: jnp.mean((a - b).reshape(8, -1) ** 2, axis=-1)  # noqa: E731
        a, s = process.alpha_sigma(t)
        sigma = s / a
        want = {"none": mse(out, out - delta), "x0": mse(x0_hat, x0), "eps": mse(eps_hat, eps),
                "min_snr": jnp.minimum(1 / sigma**2, 5.0) * mse(x0_hat, x0),
                "edm": (sigma**2 + 0.25) / (sigma * 0.5) ** 2 * mse(x0_hat, x0)}
        for weighting, value in want.items():
            got = objectives.training_losses(process, out, x0, t, eps, prediction=prediction,
                                             weighting=weighting)["loss"]
            np.testing.assert_allclose(got, value, rtol=2e-3, err_msg=f"{prediction} {weighting}")


def test_hybrid_loss_is_ddpm_only():
    x = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="learned variance"):
        objectives.training_losses(processes.EDM(), x, x, jnp.ones(2), x, prediction="edm", learn_variance=True)


@pytest.fixture(scope="module")
def net():
    cfg = tiny_unet(ch=8, num_classes=0)
    model = models.create(cfg)
    return model, init(model, cfg, batch=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vp", "edm", "flow"])  # ddpm: tests/test_models.py's overfitting test
def test_a_tiny_network_learns_under_every_process(net, name):
    """Fixed images, times and noise: the process's own loss falls >= 10x within 300 Adam steps
    (traced on the XLA path, so the test does not depend on the native kernels being built)."""
    process, prediction, weighting = PROCESSES[name]
    model, variables = net
    xx, yy = np.meshgrid(np.linspace(0, 1, 16), np.linspace(0, 1, 16))
    x0 = np.stack([np.where(np.abs(xx - c) < 0.1, 1.0, -1.0) for c in np.linspace(0.2, 0.8, 8)])
    x0 = jnp.asarray(x0[..., None], jnp.float32)
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    t = process.sample_t(k[0], (8,))
    eps = jax.random.normal(k[1], x0.shape)
    x_in, c_noise = process.network_inputs(processes.q_sample(process, x0, t, eps), t)

    def loss_fn(p):
        out = model.apply({"params": p}, x_in, c_noise, None)
        return jnp.mean(objectives.training_losses(process, out, x0, t, eps, prediction=prediction,
                                                   weighting=weighting)["loss"])

    opt = optax.adam(3e-3)

    @jax.jit  # fully optimised: at -O0 a 25-step chunk runs 9x slower, more than -O0 saves in compile
    @ops.forced("fast")
    def steps(p, s):
        def body(carry, _):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), loss
        return jax.lax.scan(body, (p, s), None, length=25)

    params, state = variables["params"], opt.init(variables["params"])
    with ops.forced("fast"):
        first = float(jit(loss_fn)(params))
    for _ in range(12):
        (params, state), losses = steps(params, state)
        if float(losses[-1]) < first / 10:
            break
    with ops.forced("fast"):
        final = float(jit(loss_fn)(params))
    assert final < first / 10, (name, first, final)
