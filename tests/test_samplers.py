"""Samplers against the analytic Gaussian oracle and float64 numpy recursions.

Data x0 ~ N(MU, S^2 I). Then x_t ~ N(alpha MU, alpha^2 S^2 + sigma^2) and by Gaussian
conditioning E[x0 | x_t] = MU + g_t (x_t - alpha MU), g_t = alpha S^2 / (alpha^2 S^2 + sigma^2),
so the exact eps-predictor is eps*(x_t, t) = (x_t - alpha E[x0 | x_t]) / sigma
= sigma (x_t - alpha MU) / (abar S^2 + 1 - abar). Every sampler step is then affine in x_t,
which lets float64 numpy give the exact law of each sampler's output.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import diffusion as D
from diffusion_jax import samplers, schedules

MU, S = 0.3, 0.5
T = 1000
SCH = schedules.linear(T)
AB64 = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
SHAPE = (2048, 2, 2, 1)  # n = 8192 iid scalars (the oracle acts elementwise)
N = int(np.prod(SHAPE))


def oracle(sch, prediction, mu=MU, s=S):
    """The exact model of N(mu, s^2) data, written directly in each target's space."""

    def fn(x, t):
        ab = sch.alphas_cumprod[t].reshape((-1,) + (1,) * (x.ndim - 1))
        a, sg = jnp.sqrt(ab), sch.sqrt_one_minus_alphas_cumprod[t].reshape(ab.shape)
        x0 = mu + a * s**2 / (ab * s**2 + sg**2) * (x - a * mu)  # E[x0 | x_t]
        eps = sg * (x - a * mu) / (ab * s**2 + sg**2)
        return {"eps": eps, "x0": x0, "v": a * eps - sg * x0, "score": -eps / sg}[prediction]

    return fn


# ----------------------------------------------------------------------------- float64 laws


def _gain(ab):
    """E[x0 | x] = MU + g (x - a MU) = g x + MU (1 - g a)."""
    a = math.sqrt(ab)
    g = a * S**2 / (ab * S**2 + 1 - ab)
    return g, MU * (1 - g * a)


def ddpm_law():
    """Mean and variance of the T-step ancestral chain output (Ho et al. Algorithm 2, small
    variance) from x_T ~ N(0, 1), exactly, in float64."""
    ab_prev = np.append(1.0, AB64[:-1])
    b = 1 - AB64 / ab_prev
    m, v = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        c1 = math.sqrt(ab_prev[t]) * b[t] / (1 - AB64[t])
        c2 = math.sqrt(1 - b[t]) * (1 - ab_prev[t]) / (1 - AB64[t])
        g, k = _gain(AB64[t])
        m = (c1 * g + c2) * m + c1 * k
        v = (c1 * g + c2) ** 2 * v + (b[t] * (1 - ab_prev[t]) / (1 - AB64[t]) if t > 0 else 0.0)
    return m, v


def deterministic_map(method, ts):
    """(A, c) with output = A x_T + c for ddim (eta = 0) or DPM-Solver++(2M) on grid ts,
    from the papers' update formulas (Song et al. 2021 eq. 12; Lu et al. 2022 Algorithm 2)."""
    ab = lambda t: 1.0 if t < 0 else AB64[t]
    x = np.array([1.0, 0.0])  # affine form (A, c) of x in x_T
    prev = None
    for i, t in enumerate(ts):
        tn = ts[i + 1] if i + 1 < len(ts) else -1
        g, k = _gain(ab(t))
        x0 = g * x + np.array([0.0, k])
        a, sg, an, sn = math.sqrt(ab(t)), math.sqrt(1 - ab(t)), math.sqrt(ab(tn)), math.sqrt(1 - ab(tn))
        if method == "ddim":
            x = an * x0 + sn * (x - a * x0) / sg
            continue
        lam = lambda u: 0.5 * math.log(ab(u) / (1 - ab(u)))
        if tn < 0:  # clean limit: sigma = 0, exp(-h) = 0, first order
            x = x0
            continue
        h = lam(tn) - lam(t)
        d = x0 if prev is None else x0 + (x0 - prev[0]) * (h / (lam(t) - lam(prev[1]))) / 2
        x = sn / sg * x - an * math.expm1(-h) * d
        prev = (x0, t)
    return x


@functools.lru_cache(maxsize=None)
def run(method, num_steps):
    """Samples (and x_T) of one method for all four predictions, one compile."""

    @jax.jit
    def go(key):
        out = {}
        for p in D.PREDICTIONS:
            x, traj = samplers.sample(oracle(SCH, p), SCH, SHAPE, key, method=method,
                                      num_steps=num_steps, prediction=p, return_trajectory=True)
            out[p] = (x, traj[0])
        return out

    return jax.tree_util.tree_map(np.asarray, go(jax.random.PRNGKey(42)))


# Sampling error: with n = 8192 iid draws from N(m, v), SE(mean) = sqrt(v / n) ~ 0.0055 and
# SE(std) ~ sqrt(v / (2 n)) ~ 0.0039 for v = S^2. A 4.5-SE band has false-alarm rate ~7e-6.
Z = 4.5


def test_ddpm_1000_steps_recovers_gaussian():
    x = run("ddpm", None)["eps"][0]
    m, v = ddpm_law()
    # The chain's own bias vs the data, exact: the "small" reverse variance leaves out the
    # uncertainty of x0 given x_t (Bao et al. 2022, Analytic-DPM), so the chain is slightly
    # under-dispersed: std 0.4961 for S = 0.5 (mean 0.299997).
    assert abs(m - MU) < 1e-3 and abs(math.sqrt(v) - S) < 5e-3, (m, math.sqrt(v))
    # The samples follow that law ...
    assert abs(x.mean() - m) < Z * math.sqrt(v / N), x.mean()
    assert abs(x.std() - math.sqrt(v)) < Z * math.sqrt(v / (2 * N)), x.std()
    # ... hence the data within 4.5 SE + the exact bias bound.
    assert abs(x.mean() - MU) < Z * S / math.sqrt(N) + 1e-3
    assert abs(x.std() - S) < Z * S / math.sqrt(2 * N) + 5e-3


@pytest.mark.parametrize("method, steps, bias", [("ddim", 50, 0.03), ("dpm_solver_pp", 20, 0.01)])
def test_deterministic_samplers_recover_gaussian(method, steps, bias):
    """Output = A x_T + c exactly (float64 recursion on the same timestep grid); |A - S| is the
    method's discretisation error at this step count (DDIM is first order, DPM-Solver++(2M)
    second order), bounded by `bias`; sample mean / std then match MU / S within 4.5 SE + bias."""
    x, x_T = run(method, steps)["eps"]
    ts = samplers.make_timesteps(SCH, steps, samplers.DEFAULT_SPACING[method])
    A, c = deterministic_map(method, ts)
    np.testing.assert_allclose(x, A * x_T + c, atol=2e-4)
    assert abs(c - MU) < 2e-3 and abs(A - S) < bias, (A, c)
    assert abs(x.mean() - MU) < Z * S / math.sqrt(N) + 2e-3
    assert abs(x.std() - S) < Z * S / math.sqrt(2 * N) + bias


@pytest.mark.parametrize("method, steps", [("ddpm", None), ("ddim", 50), ("dpm_solver_pp", 20)])
def test_four_predictions_give_the_same_samples(method, steps):
    out = run(method, steps)
    for p in ("x0", "v", "score"):
        np.testing.assert_array_equal(out[p][1], out["eps"][1])  # same x_T
        # float32 conversions differ in rounding only; 1e-3 is ~0.2% of S.
        np.testing.assert_allclose(out[p][0], out["eps"][0], atol=1e-3, err_msg=p)


# ----------------------------------------------------------------------------- steps

SMALL = schedules.cosine(50)


def test_step_identities():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 4, 2)), jnp.float32)
    z = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    out = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    t = jnp.array([1, 20, 49])
    # DDIM with eta = 1 from t to t - 1 is the DDPM ancestral step (Song et al. 2021, sec. 4.1).
    a = samplers.ddim_step(SMALL, x, t, t - 1, out, eta=1.0, noise=z)
    b = samplers.ddpm_step(SMALL, x, t, out, z, variance="small")
    np.testing.assert_allclose(a, b, atol=2e-4)
    # No noise at t = 0.
    t0 = jnp.zeros((3,), jnp.int32)
    np.testing.assert_array_equal(samplers.ddpm_step(SMALL, x, t0, out, z),
                                  samplers.ddpm_step(SMALL, x, t0, out, 0 * z))
    # t_prev = -1 lands on the predicted x0.
    np.testing.assert_allclose(samplers.ddim_step(SMALL, x, t, -1, out),
                               D.predict_x0(SMALL, x, t, out), atol=1e-5)
    # First-order DPM-Solver++ is DDIM (Lu et al. 2022, sec. 4.1).
    for tp in (jnp.array([0, 10, 30]), -1):
        x1, x0 = samplers.dpm_solver_pp_step(SMALL, x, t, tp, out)
        np.testing.assert_allclose(x1, samplers.ddim_step(SMALL, x, t, tp, out), atol=1e-5)
        np.testing.assert_allclose(x0, D.predict_x0(SMALL, x, t, out), atol=1e-5)


def test_make_timesteps():
    np.testing.assert_array_equal(samplers.make_timesteps(SCH, 10, "trailing"), np.arange(999, 0, -100))
    np.testing.assert_array_equal(samplers.make_timesteps(SCH, 10, "leading"), np.arange(900, -1, -100))
    lin = samplers.make_timesteps(SCH, 7, "linspace")
    assert lin[0] == 999 and lin[-1] == 0 and np.all(np.diff(lin) < 0)
    for n in (1, 10, 50, 1000):
        ts = samplers.make_timesteps(SCH, n, "logsnr")
        assert len(ts) == n and ts[0] == T - 1 and ts[-1] == (0 if n > 1 else T - 1)
        assert np.all(np.diff(ts) < 0)
    # logsnr: after t = T-1, half log-SNR uniform on [max(lambda_{T-1}, -log 80), lambda_0]
    # to within one discrete step (linear, N=10).
    lam = 0.5 * np.log(AB64 / (1 - AB64))
    ts = samplers.make_timesteps(SCH, 10, "logsnr")
    target = np.linspace(max(lam[-1], -math.log(80)), lam[0], 10)
    step = np.abs(np.diff(lam))
    assert np.all(np.abs(lam[ts] - target)[1:] <= np.append(step, step[-1])[ts][1:] + 1e-12)
    # Traced schedule gives the same grid.
    traced = jax.jit(lambda s: samplers.make_timesteps(s, 10, "logsnr"))(SCH)
    np.testing.assert_array_equal(traced, ts)
    for bad in (0, 1001, 2.5):
        with pytest.raises(ValueError, match="num_steps"):
            samplers.make_timesteps(SCH, bad, "trailing")
    with pytest.raises(ValueError, match="timestep_spacing"):
        samplers.make_timesteps(SCH, 10, "uniform")


def test_traceable_inside_jit_with_traced_params_trajectory_and_vmap():
    shape = (4, 2, 2, 1)

    @functools.partial(jax.jit, static_argnames="method")
    def f(mu, sch, key, method):
        return samplers.sample(oracle(sch, "eps", mu=mu), sch, shape, key, method=method,
                               num_steps=8, return_trajectory=True)

    key = jax.random.PRNGKey(3)
    for method in samplers.METHODS:
        x, traj = f(jnp.float32(0.2), SMALL, key, method)
        assert traj.shape == (9,) + shape
        np.testing.assert_array_equal(traj[-1], x)
        assert np.all(np.isfinite(np.asarray(traj)))
    # Deterministic samplers: linear in mu for this oracle and reproducible under vmap over keys.
    g = jax.jit(jax.vmap(lambda k: samplers.sample(oracle(SMALL, "eps"), SMALL, shape, k,
                                                   method="dpm_solver_pp", num_steps=8)))
    keys = jax.random.split(key, 3)
    xs = g(keys)
    one = jax.jit(lambda k: samplers.sample(oracle(SMALL, "eps"), SMALL, shape, k,
                                            method="dpm_solver_pp", num_steps=8))(keys[1])
    np.testing.assert_allclose(xs[1], one, atol=1e-5)
    # Step functions under vmap (one example per call).
    x = jax.random.normal(key, (3,) + shape[1:])
    t = jnp.array([5, 20, 49])
    v = jax.vmap(lambda a, b: samplers.ddim_step(SMALL, a[None], b[None], b[None] - 3, a[None])[0])(x, t)
    np.testing.assert_allclose(v, samplers.ddim_step(SMALL, x, t, t - 3, x), atol=1e-6)
    v = jax.vmap(lambda a, b: samplers.ddpm_step(SMALL, a[None], b[None], a[None], a[None])[0])(x, t)
    np.testing.assert_allclose(v, samplers.ddpm_step(SMALL, x, t, x, x), atol=1e-6)
    dpm = lambda a, b: samplers.dpm_solver_pp_step(SMALL, a, b, b - 3, a, prev_x0=0.5 * a, prev_t=b + 1)
    t = jnp.array([5, 20, 40])  # prev_t = t + 1 must stay < T
    v = jax.jit(jax.vmap(lambda a, b: jax.tree_util.tree_map(lambda r: r[0], dpm(a[None], b[None]))))(x, t)
    for got, want in zip(v, dpm(x, t)):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_clip_learned_variance_and_respaced_ddpm():
    shape = (64, 2)
    key = jax.random.PRNGKey(5)
    far = oracle(SMALL, "eps", mu=3.0)  # x0 predictions far outside [-1, 1]

    @jax.jit
    def clipped(key):
        return [samplers.sample(far, SMALL, shape, key, method=m, num_steps=n, clip_x0=True)
                for m, n in (("ddim", 10), ("dpm_solver_pp", 10), ("ddpm", None))]

    for x in clipped(key):
        assert float(jnp.max(jnp.abs(x))) <= 1.0 + 1e-6
    # learned_range with v = -1 is the small variance; deterministic methods use the first C channels.
    eps = oracle(SMALL, "eps")
    learned = lambda x, t: jnp.concatenate([eps(x, t), -jnp.ones_like(x)], -1)

    @jax.jit
    def variants(key):
        return (
            samplers.sample(learned, SMALL, shape, key, method="ddpm", variance="learned_range"),
            samplers.sample(eps, SMALL, shape, key, method="ddpm", variance="small"),
            samplers.sample(learned, SMALL, shape, key, method="ddim", num_steps=5, variance="learned_range"),
            samplers.sample(eps, SMALL, shape, key, method="ddim", num_steps=5),
            # Respaced DDPM (num_steps < T) and stochastic DDIM.
            samplers.sample(eps, SMALL, shape, key, method="ddpm", num_steps=10),
            samplers.sample(eps, SMALL, shape, key, method="ddim", num_steps=10, eta=0.5),
        )

    a, b, c, d, e, f = variants(key)
    np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(c, d, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(e))) and np.all(np.isfinite(np.asarray(f)))


def test_bad_arguments_raise():
    fn = oracle(SMALL, "eps")
    key = jax.random.PRNGKey(0)
    cases = [
        (dict(method="euler"), "method"),
        (dict(method="ddim", timestep_spacing="uniform"), "timestep_spacing"),
        (dict(prediction="noise"), "prediction"),
        (dict(variance="fixed"), "variance"),
        (dict(method="ddim", num_steps=0), "num_steps"),
        (dict(method="ddim", num_steps=51), "num_steps"),
        (dict(method="ddpm", num_steps=10, variance="large"), "variance"),
    ]
    for kw, field in cases:
        with pytest.raises(ValueError, match=field):
            samplers.sample(fn, SMALL, (2, 1), key, **kw)
    with pytest.raises(ValueError, match="noise"):
        samplers.ddim_step(SMALL, jnp.zeros((2, 1)), 5, 3, jnp.zeros((2, 1)), eta=0.5)
    # `sample` (the DDPM API) runs the first three; the registry holds every sampler (issue #13 names).
    assert set(samplers.METHODS) == {"ddpm", "ddim", "dpm_solver_pp"}
    assert set(samplers.SAMPLERS) == {"ddpm", "ddim", "dpm_solver_pp", "dpm_solver_pp_3m", "euler", "heun",
                                      "edm_sde"}
