"""Processes against their papers' formulas in float64, identities between targets, and
the discrete process held to the bits of the implementation before the redesign."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion, objectives, processes, samplers, schedules

HERE = os.path.dirname(os.path.abspath(__file__))
ALL = {
    "ddpm": lambda: processes.DDPM(schedules.linear(1000)),
    "vp-linear": lambda: processes.VP("linear"),
    "vp-cosine": lambda: processes.VP("cosine"),
    "edm": lambda: processes.EDM(),
    "flow": lambda: processes.Flow(),
}


def _times(process, n=7):
    """Noisy times spread over the process's range (never clean data)."""
    if process.discrete:
        return jnp.asarray(np.linspace(0, process.t_max, n).round(), jnp.int32)
    lo = float(process.times_for_sigmas(np.array([0.01]))[0])
    return jnp.asarray(np.linspace(lo, min(process.t_max, 0.999), n), jnp.float32)


def test_edm_preconditioning_is_table_1_in_float64():
    """c_in, c_noise, c_skip, c_out of Karras et al. 2022, Table 1, sigma_data = 0.5."""
    p = processes.EDM(sigma_data=0.5)
    sigma = np.logspace(-3, 2, 11)
    sd = 0.5
    want = dict(c_in=1 / np.sqrt(sigma**2 + sd**2), c_noise=np.log(sigma) / 4,
                c_skip=sd**2 / (sigma**2 + sd**2), c_out=sigma * sd / np.sqrt(sigma**2 + sd**2))
    t = jnp.asarray(sigma, jnp.float32)
    ones = jnp.ones((11, 1))
    x_in, c_noise = p.network_inputs(ones, t)
    np.testing.assert_allclose(np.asarray(x_in)[:, 0], want["c_in"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(c_noise) / 1000, want["c_noise"], rtol=2e-6, atol=1e-7)
    c_skip = processes.to_x0(p, ones, t, 0 * ones, "edm")  # D = c_skip x + c_out F
    c_out = processes.to_x0(p, 0 * ones, t, ones, "edm")
    np.testing.assert_allclose(np.asarray(c_skip)[:, 0], want["c_skip"], rtol=2e-6)
    np.testing.assert_allclose(np.asarray(c_out)[:, 0], want["c_out"], rtol=2e-6)
    # EDM's loss weight lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 is 1 / c_out^2,
    # so the "edm" weighting of the F-MSE is exactly 1 (Karras et al. 2022, eq. 8 and Table 1).
    w = objectives.loss_weight(p, t, "edm", "edm")
    np.testing.assert_allclose(np.asarray(w), 1.0, rtol=1e-5)


def test_vp_and_flow_marginals_match_closed_forms():
    t = np.linspace(0.0, 1.0, 21)
    # Song et al. 2021, eq. 33: log a(t) = -t^2 (b1 - b0) / 4 - t b0 / 2, b0 = 0.1, b1 = 20.
    a, s = processes.VP("linear").alpha_sigma(jnp.asarray(t, jnp.float32))
    log_a = -0.25 * t**2 * 19.9 - 0.05 * t
    np.testing.assert_allclose(np.asarray(a), np.exp(log_a), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s), np.sqrt(1 - np.exp(2 * log_a)), rtol=1e-5, atol=1e-7)
    a, s = processes.VP("cosine").alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(a), np.cos(np.pi * t / 2), atol=1e-7)
    np.testing.assert_allclose(np.asarray(s), np.sin(np.pi * t / 2), atol=1e-7)
    a, s = processes.Flow().alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(a), 1 - t, atol=1e-7)
    np.testing.assert_allclose(np.asarray(s), t, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in ALL if n != "ddpm"])
def test_time_of_sigma_inverts_sigma_of_time(name):
    p = ALL[name]()
    t = np.linspace(0.02, p.t_max, 9)
    np.testing.assert_allclose(p.t_of_sigma(p.sigma_of_t(t)), t, rtol=1e-10)
    a, s = p.alpha_sigma(jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(np.asarray(s / a), p.sigma_of_t(t), rtol=2e-5)


def test_ddpm_time_of_sigma_is_the_nearest_table_level():
    p = ALL["ddpm"]()
    sig = p.sigma_of_t(np.arange(1000))
    np.testing.assert_array_equal(p.t_of_sigma(sig[[0, 17, 500, 999]]), [0, 17, 500, 999])
    mid = np.sqrt(sig[100] * sig[101])  # log-midpoint: ties go to the lower index
    assert p.t_of_sigma(np.array([mid * 1.0001]))[0] == 101


def test_flow_identities():
    """x_t = x0 + t u with u = eps - x0; x0 = x_t - t u; d(a, s)/dt = (-1, 1)."""
    p = processes.Flow()
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x0, eps = jax.random.normal(k[0], (6, 3)), jax.random.normal(k[1], (6, 3))
    t = jax.random.uniform(k[2], (6,))
    x_t = processes.q_sample(p, x0, t, eps)
    u = processes.target(p, x0, eps, t, "velocity")
    np.testing.assert_allclose(u, eps - x0, atol=1e-6)
    np.testing.assert_allclose(x_t, x0 + t[:, None] * u, atol=1e-6)
    np.testing.assert_allclose(processes.to_x0(p, x_t, t, u, "velocity"), x0, atol=1e-5)
    _, _, da, ds = processes.velocity_coefficients(p, t)
    np.testing.assert_array_equal(np.asarray(da), -1.0)
    np.testing.assert_array_equal(np.asarray(ds), 1.0)


@pytest.mark.parametrize("name", list(ALL))
def test_targets_round_trip_to_x0_and_eps(name):
    """For every output the process takes: output = target(x0, eps) gives back x0 and eps."""
    p = ALL[name]()
    t = _times(p)
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    x0 = jax.random.uniform(k[0], (t.shape[0], 4, 4, 1), minval=-1, maxval=1)
    eps = jax.random.normal(k[1], x0.shape)
    x_t = processes.q_sample(p, x0, t, eps)
    for prediction in p.predictions:
        m = processes.target(p, x0, eps, t, prediction)
        np.testing.assert_allclose(processes.to_x0(p, x_t, t, m, prediction), x0, atol=2e-4, err_msg=prediction)
        np.testing.assert_allclose(processes.to_eps(p, x_t, t, m, prediction), eps, atol=2e-3, err_msg=prediction)


@pytest.mark.parametrize("name", list(ALL))
def test_output_scale_is_the_derivative_of_x0_in_the_output(name):
    p = ALL[name]()
    t = _times(p)
    x = jnp.zeros((t.shape[0], 1))
    for prediction in p.predictions:
        d = processes.to_x0(p, x, t, jnp.ones_like(x), prediction) - processes.to_x0(p, x, t, 0 * x, prediction)
        k = processes.output_scale(p, t, prediction)
        np.testing.assert_allclose(np.abs(np.asarray(d)[:, 0]), np.abs(np.asarray(k)), rtol=1e-4, err_msg=prediction)


def test_training_draws_follow_their_laws():
    key = jax.random.PRNGKey(2)
    n = 200_000
    ln_sigma = np.log(np.asarray(processes.EDM().sample_t(key, (n,))))
    assert abs(ln_sigma.mean() + 1.2) < 4 * 1.2 / math.sqrt(n) and abs(ln_sigma.std() - 1.2) < 0.01
    t = np.asarray(processes.Flow(t_sampling="logit_normal").sample_t(key, (n,)))
    z = np.log(t / (1 - t))
    assert abs(z.mean()) < 4 / math.sqrt(n) and abs(z.std() - 1.0) < 0.01
    t = np.asarray(processes.VP().sample_t(key, (n,)))
    assert t.min() >= 1e-5 and t.max() <= 1.0 and abs(t.mean() - 0.5) < 0.005
    t = np.asarray(processes.DDPM(schedules.linear(1000)).sample_t(key, (n,)))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == 999


@pytest.mark.parametrize("kwargs,field", [
    (dict(name="edm", sigma_data=float("nan")), "sigma_data"),
    (dict(name="edm", sigma_min=1.0, sigma_max=0.5), "sigma_min"),
    (dict(name="vp", schedule="sigmoid"), "schedule"),
    (dict(name="vp", beta_max=float("inf")), "beta_min and beta_max"),
    (dict(name="flow", t_sampling="beta"), "t_sampling"),
    (dict(name="flow", logit_std=0.0), "logit_std"),
])
def test_bad_fields_raise_naming_the_field(kwargs, field):
    name = kwargs.pop("name")
    with pytest.raises(ValueError, match=field):
        processes.PROCESSES[name](**kwargs)
    with pytest.raises(ValueError, match="prediction"):
        processes.to_x0(processes.Flow(), jnp.zeros((1, 1)), 0.5, jnp.zeros((1, 1)), "eps")


# ----------------------------------------------------------------------------- DDPM unchanged


REFERENCE = np.load(os.path.join(HERE, "data", "ddpm_reference.npz"))
sys.path.insert(0, os.path.join(HERE, "programs"))
from make_ddpm_reference import SHAPE, T, model  # noqa: E402  (the fixtures' own stand-in network)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_losses_are_bit_identical_to_17866ad(name):
    sch = schedules.make(name, num_timesteps=T)
    process = processes.DDPM(sch)
    key = jax.random.PRNGKey(0)
    x0 = jax.random.uniform(jax.random.fold_in(key, 1), SHAPE, minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.fold_in(key, 2), SHAPE)
    t = jnp.array([0, 17, 63, T - 1], jnp.int32)
    for prediction in diffusion.PREDICTIONS:
        x_t = processes.q_sample(process, x0, t, noise)
        for weighting in diffusion.LOSS_WEIGHTINGS:
            got = objectives.training_losses(process, model(prediction)(x_t, t), x0, t, noise,
                                             prediction=prediction, weighting=weighting)["loss"]
            np.testing.assert_array_equal(got, REFERENCE[f"loss/{name}/{prediction}/{weighting}"])
        got = objectives.training_losses(process, model(prediction, learned=True)(x_t, t), x0, t, noise,
                                         prediction=prediction, learn_variance=True)["loss"]
        np.testing.assert_array_equal(got, REFERENCE[f"loss/{name}/{prediction}/hybrid"])


def _close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=16 * np.finfo(np.float32).eps, err_msg=what)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_ddpm_samples_on_given_grids_match_17866ad(name):
    """Each recorded grid, given explicitly to the sampler objects (and to `sample`): the bits
    recorded at 17866ad on the machine that wrote them; on another CPU, XLA's code (AVX2 against
    AVX-512, FMA contraction) moves the last bits of a 16-step chain, measured up to 4.8e-7 on
    values of order 1, about 4 float32 ulps. `_close` allows 16 ulps of 1; a changed
    coefficient or a step out of place moves samples by 1e-3 or more."""
    sch = schedules.make(name, num_timesteps=T)
    process = processes.DDPM(sch)
    key = jax.random.fold_in(jax.random.PRNGKey(0), 3)
    k_init, k_steps = jax.random.split(key)
    spacings = ("leading", "trailing", "linspace", "logsnr")  # the grids recorded at 17866ad
    grids = {s: np.concatenate([REFERENCE[f"grid/{name}/{s}"], [-1]]).astype(np.int32) for s in spacings}
    assert len({g.shape for g in grids.values()}) == 1  # one compile serves the four grids
    for method, sampler in (("ddim", samplers.DDIM()), ("ddim_eta", samplers.DDIM(eta=0.5)),
                            ("dpm_solver_pp", samplers.DPMSolverPP()), ("ddpm", samplers.Ancestral())):
        for prediction in ("eps", "v"):
            for clip in (None, 1.0):
                denoise = samplers.denoiser(model(prediction), process, prediction, clip)
                run = jax.jit(lambda x_T, k, ts, sampler=sampler, denoise=denoise:
                              sampler(denoise, process, x_T, k, ts=ts))
                for spacing, grid in grids.items():
                    want = REFERENCE[f"sample/{name}/{spacing}/{method}/{prediction}/{clip}"]
                    if method == "dpm_solver_pp":  # the DDPM API drew its x_T from the key itself
                        x = run(jax.random.normal(key, SHAPE), None, grid)
                    else:
                        x = run(jax.random.normal(k_init, SHAPE), k_steps, grid)
                    _close(x, want, f"{spacing} {method} {prediction} {clip}")
    for variance in diffusion.VARIANCES:
        fn = model("eps", learned=variance == "learned_range")
        x = samplers.sample(fn, sch, SHAPE, jax.random.fold_in(jax.random.PRNGKey(0), 4), method="ddpm",
                            variance=variance)
        _close(x, REFERENCE[f"sample/{name}/full/ddpm/{variance}"], variance)
