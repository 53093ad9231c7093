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
    second order), bounded by `bias`; sample mean / std then match MU / S within 4.5 SE + bias.
    |c - MU| < 3e-3: DDIM's "cosine_half" grid starts from N(0, 1) at sigma = cot(pi / 200) ~ 64
    (not t = T - 1), where x_t's mean is a MU ~ MU / 64; its output keeps 2.3e-3 of that."""
    x, x_T = run(method, steps)["eps"]
    ts = samplers.make(method, num_steps=steps).times(processes.DDPM(SCH))[:-1]  # `sample`'s grid
    A, c = deterministic_map(method, ts)
    np.testing.assert_allclose(x, A * x_T + c, atol=2e-4)
    assert abs(c - MU) < 3e-3 and abs(A - S) < bias, (A, c)
    assert abs(x.mean() - MU) < Z * S / math.sqrt(N) + 3e-3
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


def test_sample_is_draw_with_the_registered_sampler():
    """`sample` is `draw` of `make(method)` on DDPM(schedule): the same bits for every method
    on its default grid and on a named one; timestep_spacing is grid's old name."""
    fn, key, shape = oracle(SMALL, "v"), jax.random.PRNGKey(7), (3, 2)
    process = processes.DDPM(SMALL)
    flow_only = ("meanflow", "shortcut")  # flow maps: no DDPM form, refused in one line
    for name in flow_only:
        with pytest.raises(ValueError, match="needs the flow process"):
            samplers.sample(fn, SMALL, shape, key, method=name, num_steps=6, prediction="v")
    ddpm_names = [name for name in samplers.NAMES if name not in flow_only]
    for name, grid in [(name, "") for name in ddpm_names] + [("dpm_solver_pp", "trailing")]:
        want = samplers.draw(samplers.make(name, num_steps=6, grid=grid), samplers.denoiser(fn, process, "v"),
                             process, shape, key)
        got = samplers.sample(fn, SMALL, shape, key, method=name, num_steps=6, prediction="v", grid=grid)
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {grid!r}")
    old = samplers.sample(fn, SMALL, shape, key, method="ddim", num_steps=6, prediction="v", timestep_spacing="linspace")
    new = samplers.sample(fn, SMALL, shape, key, method="ddim", num_steps=6, prediction="v", grid="linear")
    np.testing.assert_array_equal(old, new)


def test_traceable_inside_jit_with_traced_params_trajectory_and_vmap():
    shape = (4, 2, 2, 1)

    @functools.partial(jax.jit, static_argnames=("method", "grid"))
    def f(mu, sch, key, method, grid="trailing"):  # a traced schedule: a grid of its length only
        return samplers.sample(oracle(sch, "eps", mu=mu), sch, shape, key, method=method,
                               num_steps=8, grid=grid, return_trajectory=True)

    key = jax.random.PRNGKey(3)
    with pytest.raises(ValueError, match="grid 'cosine_half' needs a concrete schedule"):
        f(jnp.float32(0.2), SMALL, key, "ddim", "")
    for method in ("ddpm", "ddim", "dpm_solver_pp"):
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
        (dict(method="rk4"), "method"),
        (dict(method="ddim", grid="uniform"), "grid"),
        (dict(method="ddim", grid="trailing", timestep_spacing="leading"), "timestep_spacing"),
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
    # The registry holds every sampler (issue #13 names); `sample` runs each of them.
    assert set(samplers.SAMPLERS) == {"ddpm", "ddim", "dpm_solver_pp", "dpm_solver_pp_3m", "euler", "heun",
                                      "edm_sde", "meanflow", "shortcut"}


# ============================================================================= every process
# The samplers of the redesigned core against exact oracles (diffusion_jax.oracles): the
# probability-flow ODE of N(MU, C^2) data has the closed-form flow map
#     y(sigma) = MU + sqrt((C^2 + sigma^2) / (C^2 + sigma_0^2)) (y(sigma_0) - MU),   x = a y,
# and in one dimension the flow is monotone, so a sampler's outputs of the prior's quantile
# points must sit on the data's quantiles (`oracles.transport_error`, a W2 distance).

from diffusion_jax import oracles, processes  # noqa: E402

C = 0.5
MIXTURE = oracles.GaussianMixture((0.5, 0.5), (-0.5, 0.5), (0.1, 0.5))
CONTINUOUS = {"edm": processes.EDM(), "vp-cosine": processes.VP("cosine"), "vp-linear": processes.VP("linear"),
              "flow": processes.Flow()}
EVERY = dict(CONTINUOUS, ddpm=processes.DDPM(schedules.linear(1000)))


def _rho_times(process, n, hi=80.0, lo=0.05, rho=7.0):
    i = np.arange(n) / (n - 1)
    return process.times_for_sigmas((hi ** (1 / rho) + i * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho)


def _flow_map_error(process, sampler_name, n):
    """Max error of the sampler's map from sigma = 80 to sigma = 0.05 against the exact one."""
    ts = _rho_times(process, n)
    (a0, s0), (ae, se) = [[float(v) for v in process.alpha_sigma(jnp.asarray(t))] for t in (ts[0], ts[-1])]
    x = jnp.asarray(np.linspace(-3, 3, 64) * s0, jnp.float32).reshape(64, 1)
    sampler = samplers.make(sampler_name, num_steps=n - 1)
    out = jax.jit(lambda x: sampler(oracles.gaussian(MU, C).denoiser(process), process, x, None, ts=ts))(x)
    y0 = np.asarray(x, np.float64) / a0
    exact = ae * (MU + np.sqrt((C**2 + (se / ae) ** 2) / (C**2 + (s0 / a0) ** 2)) * (y0 - MU))
    return float(np.abs(np.asarray(out, np.float64) - exact).max())


@pytest.mark.parametrize("process", ["edm", "vp-cosine", "flow"])
@pytest.mark.parametrize("name,sizes,order,low", [("euler", (9, 17, 33), 1, 0.8), ("heun", (9, 17, 33), 2, 0.8),
                                                  ("dpm_solver_pp", (33, 65, 129), 2, 0.8),
                                                  ("dpm_solver_pp_3m", (33, 65, 129), 2, 0.8)])
def test_ode_samplers_converge_at_their_order(process, name, sizes, order, low):
    """Halving the steps divides the error by about 2^order. 3M is the published one
    (d2_weight = 1, `dpmpp_update`), whose curvature term is half the Taylor term: second
    order as the steps shrink (measured ratios 4.0 and 3.8); the Taylor-exact update
    (d2_weight = 2) is checked for third order below."""
    errs = [_flow_map_error(CONTINUOUS[process], name, n) for n in sizes]
    ratios = [errs[i] / errs[i + 1] for i in range(len(errs) - 1)]
    assert all(low * 2**order < r < 1.25 * 2**order for r in ratios), (errs, ratios)


def test_dpm_solver_pp_3m_update_is_third_order_locally():
    """One 3M update from exact history on the Gaussian's exact data predictions: with the
    Taylor curvature term (d2_weight = 2) local error O(h^4), so halving h divides it by about
    16; the published 3M (d2_weight = 1) and 2M: O(h^3), about 8."""
    p = processes.EDM()
    law = oracles.gaussian(MU, C)

    def exact_x(sigma, y0=2.0, sigma0=0.5):
        return MU + math.sqrt((C**2 + sigma**2) / (C**2 + sigma0**2)) * (y0 - MU)

    def local_error(h, order, w=1.0):
        lam = -math.log(0.5) + np.array([0.0, h, 2 * h, 3 * h])  # lambda_{i-2}, lambda_{i-1}, lambda_i, next
        sig = np.exp(-lam)
        xs = [jnp.full((1, 1), exact_x(s)) for s in sig[:3]]
        x0s = [law.x0(p, x, jnp.float32(s)) for x, s in zip(xs, sig[:3])]
        one = jnp.ones(())
        hist = ((x0s[1], one, jnp.float32(sig[1]), True), (x0s[0], one, jnp.float32(sig[0]), True))
        x = samplers.dpmpp_update(xs[2], x0s[2], one, jnp.float32(sig[2]), one, jnp.float32(sig[3]), hist,
                                  order=order, d2_weight=w)
        return abs(float(x[0, 0]) - exact_x(sig[3]))

    r3 = local_error(0.1, 3, 2.0) / local_error(0.05, 3, 2.0)
    r3_published = local_error(0.1, 3) / local_error(0.05, 3)
    r2 = local_error(0.1, 2) / local_error(0.05, 2)
    assert 12 < r3 < 20 and 6 < r3_published < 11 and 6 < r2 < 11, (r3, r3_published, r2)


@pytest.mark.parametrize("process", list(EVERY))
def test_ode_samplers_match_the_mixture_law_at_100_nfe(process):
    """W2 to the two-mode law at 100 network calls. Bounds: the measured first-order constant
    (~0.65 / NFE, bench/bench_samplers.py) for euler and ddim; for the second- and third-order
    solvers the last jump to clean data from sigma_min = 0.02 (EDM: 0.002), which alone moves the
    narrow mode (std 0.1) by about 1e-3."""
    p = EVERY[process]
    probs, z = oracles.prior_quantile_points(4096)
    x_T = jnp.asarray(p.prior_std * z, jnp.float32).reshape(-1, 1)
    for name, bound in (("euler", 0.01), ("ddim", 0.01), ("heun", 0.004), ("dpm_solver_pp", 0.002),
                        ("dpm_solver_pp_3m", 0.002)):
        sampler = samplers.make(name).with_nfe(p, 100)
        x = jax.jit(lambda x: sampler(MIXTURE.denoiser(p), p, x, None))(x_T)
        assert oracles.transport_error(np.asarray(x), MIXTURE, probs) < bound, (process, name)


@pytest.mark.parametrize("process,name,settings", [
    ("vp-cosine", "ddpm", dict(num_steps=200)),
    ("flow", "ddim", dict(num_steps=200, eta=1.0)),
    ("edm", "edm_sde", dict(num_steps=64)),
    ("ddpm", "edm_sde", dict(num_steps=64)),
])
def test_stochastic_samplers_match_the_data_law(process, name, settings):
    """16384 draws: W2 to the mixture within 0.02 (Monte-Carlo spread of the empirical W2
    at this n is about 0.006, the discretisation error at these steps under 0.01)."""
    p = EVERY[process]
    sampler = samplers.make(name, **settings)
    n = 16384
    x = jax.jit(lambda k: samplers.draw(sampler, MIXTURE.denoiser(p), p, (n, 1), k))(jax.random.PRNGKey(0))
    assert oracles.transport_error(np.asarray(x), MIXTURE, (np.arange(n) + 0.5) / n) < 0.02


DATA = {"broad": oracles.gaussian(MU, 0.5), "sharp": oracles.gaussian(MU, 0.1), "mixture": MIXTURE}
# Issue #21's law, outside [-1, 1]: modes 3.5 apart are decided at sigma of several units, above
# where the grids' data scale (sigma_data = 0.5) puts the steps.
WIDE = oracles.GaussianMixture((0.7, 0.3), (-2.0, 1.5), (0.5, 0.3))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("name", ["ddim", "dpm_solver_pp"])
def test_default_grids_are_at_least_as_accurate_as_diffusers(schedule, name):
    """At 10, 20 and 50 NFE on broad, sharp and two-mode data and on issue #21's wide mixture
    (docs/samplers.md), through every public entry point, each against diffusers' grid from the
    same x_T: the sampler object on the prior's quantile points, and at 10 NFE (a compile each)
    `sample` (the DDPM API, a model output of type eps), which is `draw`, on the 4,096 x_T that
    draws from the key. The 1-D flow map is monotone, so the sorted outputs of sorted x_T must
    sit on the data quantiles at Phi(x_T) (`transport_error`)."""
    sch = schedules.make(schedule, num_timesteps=1000)
    p = processes.DDPM(sch)
    probs, z = oracles.prior_quantile_points(4096)
    x_q = jnp.asarray(z, jnp.float32).reshape(-1, 1)
    key = jax.random.PRNGKey(1)
    x_d = jax.random.normal(jax.random.split(key)[0], (4096, 1), jnp.float32)  # draw's x_T for `key`
    p_d = np.sort(oracles.gaussian(0.0, 1.0).cdf(np.asarray(x_d, np.float64)).ravel())
    for n in (10, 20, 50):
        sampler = samplers.make(name, num_steps=n)
        theirs_ts = jnp.asarray(oracles.diffusers_grid(name, 1000, n))
        assert len(sampler.times(p)) == len(theirs_ts) == n + 1
        on_grid = jax.jit(lambda law, x, ts: sampler(law.denoiser(p), p, x, None, ts=ts))
        entry_points = {"sampler": lambda law: on_grid(law, x_q, jnp.asarray(sampler.times(p)))}
        if n == 10:
            entry_points["sample"] = jax.jit(lambda law: samplers.sample(
                functools.partial(law.eps, p), sch, (4096, 1), key, method=name, num_steps=n))
        laws = dict(DATA, wide=WIDE)
        for data, law in laws.items():
            arrays = oracles.GaussianMixture(*(jnp.asarray(v, jnp.float32) for v in law))
            for entry, run in entry_points.items():
                x_T, ps = (x_q, probs) if entry == "sampler" else (x_d, p_d)
                ours = oracles.transport_error(np.asarray(run(arrays)), law, ps)
                theirs = oracles.transport_error(np.asarray(on_grid(arrays, x_T, theirs_ts)), law, ps)
                assert ours <= theirs, (entry, n, data, ours, theirs)


def test_nfe_and_with_nfe():
    edm, flow = processes.EDM(), processes.Flow()
    assert samplers.make("heun", num_steps=18).nfe(edm) == 35  # EDM, Table 2: 35 NFE for 18 steps
    assert samplers.make("heun", num_steps=18).nfe(flow) == 34  # first step out of pure noise: Euler
    assert samplers.make("edm_sde", num_steps=18).nfe(edm) == 35
    assert samplers.make("dpm_solver_pp_3m", num_steps=18).nfe(edm) == 18
    assert samplers.make("heun").with_nfe(edm, 35).num_steps == 18
    assert samplers.make("heun").with_nfe(edm, 36).num_steps == 18
    assert samplers.make("ddim").with_nfe(edm, 7).num_steps == 7


def test_denoiser_feeds_the_network_the_process_inputs():
    """model_fn sees (c_in x_t, c_noise); its edm-type output F becomes x0 = c_skip x + c_out F."""
    p = processes.EDM()
    seen = {}

    def model_fn(x_in, c_noise):
        seen.update(x_in=x_in, c_noise=c_noise)
        return jnp.ones_like(x_in)

    x, sigma = jnp.full((2, 1), 3.0), 2.0
    pred = samplers.denoiser(model_fn, p, "edm")(x, jnp.float32(sigma))
    c_in = 1 / math.sqrt(sigma**2 + 0.25)
    np.testing.assert_allclose(seen["x_in"], 3.0 * c_in, rtol=1e-6)
    np.testing.assert_allclose(seen["c_noise"], 250 * math.log(sigma), rtol=1e-6)
    want = 0.25 / (sigma**2 + 0.25) * 3.0 + sigma * 0.5 / math.sqrt(sigma**2 + 0.25)
    np.testing.assert_allclose(pred.x0, want, rtol=1e-6)
    np.testing.assert_allclose(pred.eps, (3.0 - want) / sigma, rtol=1e-5)


def test_time_grids():
    edm = processes.EDM()
    ts = samplers.time_grid(edm, 18, "rho")
    sig = (80 ** (1 / 7) + np.arange(18) / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # EDM eq. 5
    np.testing.assert_allclose(ts, np.append(sig, 0.0), rtol=1e-12)
    flow = processes.Flow()
    np.testing.assert_allclose(samplers.time_grid(flow, 4, "trailing"), [1.0, 0.75, 0.5, 0.25, 0.0])
    assert samplers.time_grid(flow, 4, "logsnr")[0] == 1.0  # every grid starts where sampling does
    ddpm = processes.DDPM(schedules.linear(1000))
    np.testing.assert_array_equal(samplers.time_grid(ddpm, 10, "trailing"), np.append(np.arange(999, 0, -100), -1))
    lam = lambda t: -np.log(ddpm.sigma_of_t(t))  # noqa: E731
    ts = samplers.time_grid(ddpm, 10, "logsnr")
    assert ts[0] == 999 and np.all(np.diff(ts) < 0) and ts[-1] == -1
    np.testing.assert_allclose(np.diff(lam(ts[2:-1])), np.diff(lam(ts[2:-1])).mean(), rtol=0.05)  # uniform lambda
    # logsnr: uniform lambda from sigma = cot(pi / 4N) to the last call sigma_b = 0.5 h / sqrt(8),
    # where 2M's widening (1 + h^2 / 16) meets the last jump's narrowing of data of std 0.5.
    sig = edm.sigma_of_t(samplers.time_grid(edm, 10, "logsnr"))
    h = np.log(sig[1] / sig[-2]) / 8
    np.testing.assert_allclose(np.diff(np.log(sig[1:-1])), -h, rtol=1e-9)
    np.testing.assert_allclose([sig[0], sig[1], sig[-2]], [80.0, 1 / np.tan(np.pi / 40), 0.5 * h / np.sqrt(8)], rtol=1e-9)
    # cosine_half: theta = atan(sigma / 0.65) in steps d, the last call half a step above clean
    # data; from t_max (EDM), or on a VP process from sigma = cot(pi / 4N).
    theta = np.arctan(edm.sigma_of_t(samplers.time_grid(edm, 10, "cosine_half")) / 0.65)
    np.testing.assert_allclose(np.diff(theta[:-1]), -theta[-2] * 2, rtol=1e-9)
    np.testing.assert_allclose(theta[0], np.arctan(80.0 / 0.65), rtol=1e-12)
    vp = processes.VP("cosine")
    ts = samplers.time_grid(vp, 10, "cosine_half")
    np.testing.assert_allclose(vp.sigma_of_t(ts[0]), 1 / np.tan(np.pi / 40), rtol=1e-9)
    theta = np.arctan(vp.sigma_of_t(ts) / 0.65)
    np.testing.assert_allclose(np.diff(theta), np.append(np.full(9, -theta[0] / 9.5), -theta[0] / 19), rtol=1e-9)
    ts = samplers.time_grid(ddpm, 10, "cosine_half")
    assert ts[0] == ddpm.t_of_sigma(1 / np.tan(np.pi / 40)) and np.all(np.diff(ts) < 0) and ts[-1] == -1
    assert samplers.time_grid(ddpm, 100, "cosine_half")[0] == 999  # cot(pi / 400) > sigma_max = 80
    for bad, field in (((ddpm, 1001, "rho"), "num_steps"), ((edm, 10, "leading"), "leading"),
                       ((edm, 10, "uniform"), "grid"), ((edm, 0, "rho"), "num_steps")):
        with pytest.raises(ValueError, match=field):
            samplers.time_grid(*bad)


def test_sampler_settings_from_config_and_their_errors():
    s = samplers.from_config({"method": "edm_sde", "num_steps": 12, "s_churn": 10.0, "eta": 0.3, "grid": ""})
    assert (s.num_steps, s.s_churn, s.grid) == (12, 10.0, "")  # eta is DDIM's: not read by edm_sde
    defaults = samplers.default_settings()
    assert {"eta", "rho", "s_churn", "s_noise", "s_tmin", "s_tmax", "num_steps", "grid"} <= set(defaults)
    for kwargs, field in ((dict(method="ddim", eta=float("nan")), "eta"), (dict(method="ddim", eta=1.5), "eta"),
                          (dict(method="heun", rho=0.0), "rho"), (dict(method="edm_sde", s_churn=-1.0), "s_churn"),
                          (dict(method="heun", num_steps=0), "num_steps"), (dict(method="rk4"), "method")):
        with pytest.raises(ValueError, match=field):
            samplers.from_config(kwargs)


def test_dpm_solver_pp_3m_update_is_exact_for_quadratic_data_predictions():
    """x_next = (s_next / s) x + s_next int_lambda^{lambda + h} e^l x0(l) dl (EDM form, a = 1):
    with x0(l) quadratic, the three-point history determines it and the 3M update with the
    Taylor curvature term (d2_weight = 2) must agree with the integral (here by 64-point
    Gauss-Legendre quadrature in float64 numpy); the published 3M (d2_weight = 1) keeps half
    of that term."""
    m = lambda lam: 0.3 + 0.7 * lam - 0.4 * lam**2  # noqa: E731
    lam_s, h, h0, h1 = 0.2, 0.5, 0.3, 0.45
    lams = np.array([lam_s - h0 - h1, lam_s - h0, lam_s, lam_s + h])
    sig = np.exp(-lams)
    nodes, weights = np.polynomial.legendre.leggauss(64)
    u = lam_s + h * (nodes + 1) / 2
    exact = sig[3] / sig[2] * 1.7 + sig[3] * h / 2 * np.sum(weights * np.exp(u) * m(u))
    f, one = jnp.float32, jnp.ones(())
    hist = ((f(m(lams[1])), one, f(sig[1]), True), (f(m(lams[0])), one, f(sig[0]), True))
    got = samplers.dpmpp_update(f(1.7), f(m(lam_s)), one, f(sig[2]), one, f(sig[3]), hist, order=3, d2_weight=2.0)
    assert abs(float(got) - exact) < 2e-6, (float(got), exact)
    half = samplers.dpmpp_update(f(1.7), f(m(lam_s)), one, f(sig[2]), one, f(sig[3]), hist, order=3)
    curvature = sig[3] * h / 2 * np.sum(weights * np.exp(u) * -0.4 * ((u - lam_s) ** 2))  # the x0'' term
    assert abs(float(half) - (exact - curvature / 2)) < 2e-6, (float(half), exact, curvature)
    two = samplers.dpmpp_update(f(1.7), f(m(lam_s)), one, f(sig[2]), one, f(sig[3]), hist[:1], order=2)
    assert abs(float(two) - exact) > 1e-3  # 2M is exact for linear x0 only


PEER = "fixtures/kdiffusion_peer.npz"  # tests/fixtures/make_kdiffusion_peer.py wrote it


def test_ode_samplers_against_k_diffusion():
    """k-diffusion 0.1.1.post1's Euler, Heun, DPM-Solver++(2M) and (3M) (`sample_dpmpp_3m_sde`,
    eta = 0), run in float64 on EDM's Karras grid (10 and 20 calls) with the exact denoiser of
    0.7 N(-2, 0.5^2) + 0.3 N(1.5, 0.3^2): ours (float32) give the same outputs, and 3M is at
    least as close to the probability-flow ODE's solution (the peer's 4,000-step Heun)."""
    import pathlib

    f = np.load(pathlib.Path(__file__).parent / PEER)
    p = processes.EDM()
    law = oracles.GaussianMixture(tuple(f["weights"]), tuple(f["means"]), tuple(f["stds"]))
    x_T = jnp.asarray(f["x_T"], jnp.float32)
    for n in (10, 20):
        np.testing.assert_allclose(samplers.time_grid(p, n, "rho"), f[f"sigmas_{n}"], rtol=1e-5)  # get_sigmas_karras (float32)
        for name in ("euler", "heun", "dpm_solver_pp", "dpm_solver_pp_3m"):
            x = np.asarray(samplers.make(name, num_steps=n)(law.denoiser(p), p, x_T, None, ts=f[f"sigmas_{n}"]))
            peer = f[f"{name}_{n}"]
            np.testing.assert_allclose(x, peer, atol=5e-5, err_msg=f"{name}, {n} steps")
            ours, theirs = np.abs(x - f["ode"]).mean(), np.abs(peer - f["ode"]).mean()
            assert ours <= theirs + 1e-5, (name, n, ours, theirs)
