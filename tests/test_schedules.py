"""Schedules against independent float64 numpy and the seed's one-step recursion."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import schedules


def _betas64(name, T):
    """Each schedule's betas written from its paper's formula in float64."""
    if name == "linear":  # Ho et al. 2020
        return np.linspace(1e-4, 0.02, T)
    if name == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        return np.linspace(0.00085**0.5, 0.012**0.5, T) ** 2
    u = np.arange(T + 1) / T
    if name == "cosine":  # Nichol & Dhariwal 2021 eq. 17
        f = np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    else:  # Jabri et al. 2023 sigmoid, start=-3, end=3, tau=1
        sig = lambda z: 1 / (1 + np.exp(-z))
        f = (sig(3.0) - sig(6 * u - 3)) / (sig(3.0) - sig(-3.0))
    ab = f / f[0]
    return np.minimum(1 - ab[1:] / ab[:-1], 0.999)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_tables_match_float64_formulas(name):
    T = 1000
    sch = schedules.make(name, num_timesteps=T)
    b = _betas64(name, T)
    ab = np.cumprod(1 - b)
    ab_prev = np.append(1.0, ab[:-1])
    # Posterior of x_{t-1} given x_t and x0 by Gaussian conditioning (precisions add):
    # x_{t-1} | x0 ~ N(sqrt(ab_prev) x0, 1 - ab_prev), x_t | x_{t-1} ~ N(sqrt(1 - b) x_{t-1}, b).
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = 1 / (1 - ab_prev) + (1 - b) / b
        post_var = np.where(ab_prev == 1.0, 0.0, 1 / prec)
        # At t = 0 the "posterior" is a point mass at x0: coefficients (1, 0).
        coef1 = np.where(ab_prev == 1.0, 1.0, post_var * np.sqrt(ab_prev) / (1 - ab_prev))
        coef2 = np.where(ab_prev == 1.0, 0.0, post_var * np.sqrt(1 - b) / b)
    expected = dict(
        betas=b, alphas=1 - b, alphas_cumprod=ab, alphas_cumprod_prev=ab_prev,
        sqrt_alphas_cumprod=np.sqrt(ab), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ab),
        reciprocal_sqrt_alphas=1 / np.sqrt(1 - b), posterior_variance=post_var,
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
        posterior_mean_coef1=coef1, posterior_mean_coef2=coef2, sigma=np.sqrt(post_var),
    )
    assert set(expected) == set(schedules.Schedule._fields)
    for field, want in expected.items():
        got = np.asarray(getattr(sch, field))
        assert got.dtype == np.float32 and got.shape == (T,), field
        assert np.all(np.isfinite(got)), field
        # One float32 rounding of a float64 value: relative error <= 2^-24 (~6e-8); allow 1e-6
        # for the near-singular entries (1 - abar with abar near 1 computed differently here).
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12, err_msg=field)
    assert sch.num_timesteps == T


def test_from_betas_and_t_equals_one():
    sch = schedules.from_betas([0.3])
    assert sch.num_timesteps == 1
    for field in sch:
        assert np.all(np.isfinite(np.asarray(field)))
    np.testing.assert_allclose(sch.alphas_cumprod, [0.7], rtol=1e-7)


@pytest.mark.parametrize("T", [1000, 2000])
def test_chained_recursion_matches_closed_form(T):
    """Iterate the seed's x_t = sqrt(alpha_t) x_{t-1} + sqrt(1 - alpha_t) z and compare the
    sample mean / variance at every t with sqrt(abar_t) x0 and 1 - abar_t (float64 abar).

    n = 4096 chains per x0 value. Mean: SE = sqrt((1 - abar) / n); variance: SE of a sample
    variance of Gaussians = var sqrt(2 / (n - 1)). We require every |z-score| < 5.5: for one
    test P(|Z| > 5.5) ~ 4e-8; over 3 x0 values x T timesteps x 2 statistics (<= 12000 tests,
    strongly correlated along t) the family-wise false-alarm rate is < 1e-3.
    """
    sch = schedules.linear(T)  # the seed's betas 1e-4 -> 0.02
    b = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - b)
    x0 = jnp.array([-1.0, 0.25, 1.0])
    n = 4096

    def body(x, inp):
        alpha, key = inp
        x = jnp.sqrt(alpha) * x + jnp.sqrt(1 - alpha) * jax.random.normal(key, x.shape)
        return x, (x.mean(0), x.var(0, ddof=1))

    @jax.jit
    def run(key):
        x = jnp.broadcast_to(x0, (n, 3))
        _, (m, v) = jax.lax.scan(body, x, (sch.alphas, jax.random.split(key, T)))
        return m, v

    m, v = (np.asarray(a, np.float64) for a in run(jax.random.PRNGKey(0)))
    want_m = np.sqrt(ab)[:, None] * np.asarray(x0)[None]
    want_v = np.broadcast_to((1 - ab)[:, None], want_m.shape)
    z_m = (m - want_m) / np.sqrt(want_v / n)
    z_v = (v - want_v) / (want_v * np.sqrt(2 / (n - 1)))
    assert np.max(np.abs(z_m)) < 5.5, np.max(np.abs(z_m))
    assert np.max(np.abs(z_v)) < 5.5, np.max(np.abs(z_v))


def test_pytree_jit_vmap_and_immutable():
    sch = schedules.cosine(50)
    leaves = jax.tree_util.tree_leaves(sch)
    assert len(leaves) == len(schedules.Schedule._fields)

    @jax.jit
    def f(s, t):
        return s.sqrt_alphas_cumprod[t] ** 2 + s.sqrt_one_minus_alphas_cumprod[t] ** 2, s.num_timesteps

    total, T = f(sch, jnp.arange(50))
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert int(T) == 50
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), sch)
    out = jax.vmap(lambda s: s.alphas_cumprod[-1])(stacked)
    assert out.shape == (2,)
    with pytest.raises(AttributeError):
        sch.betas = sch.alphas


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda: schedules.linear(0), "num_timesteps"),
        (lambda: schedules.cosine(-3), "num_timesteps"),
        (lambda: schedules.linear(10.5), "num_timesteps"),
        (lambda: schedules.linear(10, beta_start=0.0), "beta_start"),
        (lambda: schedules.linear(10, beta_end=1.0), "beta_end"),
        (lambda: schedules.scaled_linear(10, beta_end=-0.1), "beta_end"),
        (lambda: schedules.cosine(10, max_beta=1.5), "max_beta"),
        (lambda: schedules.sigmoid(10, tau=0.0), "tau"),
        (lambda: schedules.from_betas([0.1, 1.0]), "betas"),
        (lambda: schedules.from_betas([0.0, 0.1]), "betas"),
        (lambda: schedules.from_betas([]), "betas"),
        (lambda: schedules.from_betas([[0.1]]), "betas"),
        (lambda: schedules.make("nope"), "linear"),
    ],
)
def test_bad_arguments_raise(call, field):
    with pytest.raises(ValueError, match=field):
        call()


def test_make_accepts_every_name():
    for name in schedules.NAMES:
        sch = schedules.make(name, num_timesteps=10)
        assert sch.num_timesteps == 10
        assert np.all(np.diff(np.asarray(sch.alphas_cumprod)) < 0)
        assert math.isfinite(float(sch.posterior_log_variance_clipped[0]))
