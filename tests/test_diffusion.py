"""Process math against independent float64 numpy / scipy and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import diffusion as D
from diffusion_jax import schedules

T = 1000
SCH = schedules.linear(T)
B64 = np.linspace(1e-4, 0.02, T)
AB64 = np.cumprod(1 - B64)
TS = np.array([0, 1, 250, 998, 999])


def _data(seed=0, shape=(5, 4, 4, 3)):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, shape)
    eps = rng.standard_normal(shape)
    return x0, eps


def _col(a, nd=4):
    return a.reshape((-1,) + (1,) * (nd - 1))


def _targets64(x0, eps, ab):
    """The four prediction targets from their definitions, float64."""
    a, s = np.sqrt(ab), np.sqrt(1 - ab)
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}


def test_q_sample_and_scalar_t():
    x0, eps = _data()
    got = D.q_sample(SCH, jnp.asarray(x0, jnp.float32), jnp.asarray(TS), jnp.asarray(eps, jnp.float32))
    ab = _col(AB64[TS])
    np.testing.assert_allclose(got, np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps, atol=2e-6)
    got = D.q_sample(SCH, jnp.asarray(x0, jnp.float32), 7, jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(got, np.sqrt(AB64[7]) * x0 + np.sqrt(1 - AB64[7]) * eps, atol=2e-6)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_targets_and_round_trip(prediction):
    x0, eps = _data(1)
    ab = _col(AB64[TS])
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    want = _targets64(x0, eps, ab)[prediction]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    t = jnp.asarray(TS)
    got = D.prediction_target(SCH, f32(x0), f32(eps), t, prediction)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Recovering x0 at t = T-1 divides by sqrt(abar) ~ 6e-3: float32 error ~ 1e-7 / 6e-3.
    np.testing.assert_allclose(D.predict_x0(SCH, f32(x_t), t, f32(want), prediction), x0, atol=1e-4)
    np.testing.assert_allclose(D.predict_eps(SCH, f32(x_t), t, f32(want), prediction), eps, atol=1e-4)


def test_q_posterior_is_gaussian_conditioning():
    x0, eps = _data(2)
    t = np.array([1, 2, 500, 999, 0])
    ab, ab_prev, b = _col(AB64[t]), _col(np.append(1.0, AB64)[t]), _col(B64[t])
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    mean, var, log_var = D.q_posterior(SCH, jnp.asarray(x0, jnp.float32), jnp.asarray(x_t, jnp.float32), jnp.asarray(t))
    with np.errstate(divide="ignore"):
        prec = 1 / (1 - ab_prev) + (1 - b) / b
    want_var = np.where(ab_prev == 1, 0.0, 1 / prec)
    want_mean = np.where(
        ab_prev == 1, x0,
        want_var * (np.sqrt(ab_prev) * x0 / np.maximum(1 - ab_prev, 1e-300) + np.sqrt(1 - b) * x_t / b),
    )
    np.testing.assert_allclose(mean, want_mean, atol=3e-5)
    np.testing.assert_allclose(var, np.broadcast_to(want_var, x0.shape), rtol=1e-5, atol=1e-12)
    assert np.all(np.isfinite(np.asarray(log_var)))


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_p_mean_variance_with_exact_output(prediction):
    """Fed the true target, the reverse mean equals Ho et al. 2020 eq. 11,
    (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t), and the variances are as defined."""
    x0, eps = _data(3)
    t = np.array([1, 2, 500, 999, 0])
    ab, b = _col(AB64[t]), _col(B64[t])
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    out_np = _targets64(x0, eps, ab)[prediction]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    want_mean = (x_t - b / np.sqrt(1 - ab) * eps) / np.sqrt(1 - b)
    pv = np.append(0.0, B64[1:] * (1 - AB64[:-1]) / (1 - AB64[1:]))
    small = np.log(np.append(pv[1], pv[1:]))
    large = np.log(np.append(pv[1], B64[1:]))
    for variance, want_logvar in (("small", small), ("large", large)):
        out = D.p_mean_variance(SCH, f32(x_t), jnp.asarray(t), f32(out_np), prediction=prediction, variance=variance)
        np.testing.assert_allclose(out["mean"], want_mean, atol=2e-4)
        np.testing.assert_allclose(out["pred_x0"], x0, atol=2e-4)
        np.testing.assert_allclose(out["log_variance"], np.broadcast_to(_col(want_logvar[t]), x0.shape), rtol=1e-5)
    # learned_range: v = +1 gives log beta, v = -1 the clipped posterior log variance.
    for v, want in ((1.0, np.log(B64)), (-1.0, small), (0.0, 0.5 * (np.log(B64) + small))):
        mo = jnp.concatenate([f32(out_np), jnp.full(x0.shape, v, jnp.float32)], axis=-1)
        out = D.p_mean_variance(SCH, f32(x_t), jnp.asarray(t), mo, prediction=prediction, variance="learned_range")
        np.testing.assert_allclose(out["log_variance"], np.broadcast_to(_col(want[t]), x0.shape), rtol=1e-5)
        np.testing.assert_allclose(out["mean"], want_mean, atol=2e-4)


def test_clip_x0():
    x_t = jnp.full((2, 3), 5.0)
    out = D.p_mean_variance(SCH, x_t, jnp.array([10, 900]), jnp.zeros((2, 3)), prediction="eps", clip_x0=True)
    assert float(jnp.max(jnp.abs(out["pred_x0"]))) <= 1.0
    out = D.p_mean_variance(SCH, x_t, jnp.array([10, 900]), jnp.zeros((2, 3)), clip_x0=0.5)
    assert float(jnp.max(jnp.abs(out["pred_x0"]))) <= 0.5


def test_normal_kl_matches_quadrature():
    grid = np.linspace(-30, 30, 600001)
    cases = [(0.3, -1.0, -0.2, 0.5), (1.0, 0.0, 1.0, 0.0), (-2.0, 1.2, 0.5, -0.7)]
    for m1, lv1, m2, lv2 in cases:
        p = stats.norm.pdf(grid, m1, math.exp(lv1 / 2))
        logp = stats.norm.logpdf(grid, m1, math.exp(lv1 / 2))
        logq = stats.norm.logpdf(grid, m2, math.exp(lv2 / 2))
        want = np.trapezoid(p * (logp - logq), grid)
        got = float(D.normal_kl(m1, lv1, m2, lv2))
        assert abs(got - want) < 1e-5 * max(1.0, want), (got, want)


def test_discretized_likelihood_sums_to_one_and_matches_cdf():
    x = np.arange(256) / 127.5 - 1.0
    means = np.array([-1.3, -1.0, -0.2, 0.0, 0.37, 1.0, 2.0])
    scales = np.array([1e-3, 0.004, 0.05, 0.3, 1.0, 3.0, 20.0])
    m, s = np.meshgrid(means, scales)
    m, s = m.ravel(), s.ravel()
    lp = D.discretized_gaussian_log_likelihood(
        jnp.asarray(x[:, None], jnp.float32),
        means=jnp.asarray(m[None], jnp.float32),
        log_scales=jnp.asarray(np.log(s)[None], jnp.float32),
    )
    lp = np.asarray(lp, np.float64)
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(np.exp(lp).sum(0), 1.0, atol=2e-5)
    # Each bin's probability vs scipy in float64 (edge bins integrate to -inf / +inf).
    lo = np.where(x[:, None] < -0.999, -np.inf, x[:, None] - 1 / 255)
    hi = np.where(x[:, None] > 0.999, np.inf, x[:, None] + 1 / 255)
    # Upper tail via survival functions, lower via CDFs: no float64 cancellation near 1.
    above = x[:, None] > m[None]
    want = np.where(
        above,
        stats.norm.sf(lo, m[None], s[None]) - stats.norm.sf(hi, m[None], s[None]),
        stats.norm.cdf(hi, m[None], s[None]) - stats.norm.cdf(lo, m[None], s[None]),
    )
    np.testing.assert_allclose(np.exp(lp), want, atol=2e-6)
    big = want > 1e-20
    np.testing.assert_allclose(lp[big], np.log(want[big]), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
def test_loss_weightings_are_eps_x0_and_min_snr_mse(prediction):
    """Whatever the target, weighting "eps" gives ||eps_hat - eps||^2, "x0" gives
    ||x0_hat - x0||^2 and "min_snr" gives min(SNR, gamma) ||x0_hat - x0||^2 (Hang et al. 2023)."""
    x0, eps = _data(4)
    ab = _col(AB64[TS])
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    eps_hat = eps + 0.1 * np.random.default_rng(5).standard_normal(x0.shape)
    x0_hat = (x_t - np.sqrt(1 - ab) * eps_hat) / np.sqrt(ab)
    out_np = _targets64(x0_hat, eps_hat, ab)[prediction]
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    eps_mse = ((eps_hat - eps) ** 2).reshape(5, -1).mean(1)
    x0_mse = ((x0_hat - x0) ** 2).reshape(5, -1).mean(1)
    snr = AB64[TS] / (1 - AB64[TS])
    target = _targets64(x0, eps, ab)[prediction]
    raw = ((out_np - target) ** 2).reshape(5, -1).mean(1)
    for weighting, want in (
        ("none", raw),
        ("eps", eps_mse),
        ("x0", x0_mse),
        ("min_snr", np.minimum(snr, 5.0) * x0_mse),
    ):
        got = D.training_losses(SCH, f32(out_np), f32(x0), jnp.asarray(TS), f32(eps), prediction=prediction, weighting=weighting)
        assert got["loss"].shape == (5,) and got["mse"].shape == (5,)
        np.testing.assert_allclose(got["mse"], raw, rtol=2e-3)
        np.testing.assert_allclose(got["loss"], want, rtol=2e-3, err_msg=weighting)


def _vlb64(x0, x_t, t, mean_pred, logvar_pred):
    """Per-example L_t in bits/dim from float64 numpy / scipy."""
    ab, ab_prev, b = AB64[t], np.append(1.0, AB64)[t], B64[t]
    if t == 0:
        s = np.exp(0.5 * logvar_pred)
        lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
        hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
        p = stats.norm.cdf(hi, mean_pred, s) - stats.norm.cdf(lo, mean_pred, s)
        return -np.log(p).reshape(len(x0), -1).mean(1) / math.log(2)
    pv = b * (1 - ab_prev) / (1 - ab)
    mu_q = (np.sqrt(ab_prev) * b * x0 + np.sqrt(1 - b) * (1 - ab_prev) * x_t) / (1 - ab)
    kl = 0.5 * (logvar_pred - np.log(pv) + (pv + (mu_q - mean_pred) ** 2) / np.exp(logvar_pred) - 1)
    return kl.reshape(len(x0), -1).mean(1) / math.log(2)


@pytest.mark.parametrize("t", [0, 1, 600])
def test_hybrid_loss_vlb_term_and_stop_gradient(t):
    rng = np.random.default_rng(6)
    x0 = np.round((rng.uniform(-1, 1, (3, 4, 4, 2)) + 1) * 127.5) / 127.5 - 1  # 8-bit data
    eps = rng.standard_normal(x0.shape)
    ab = AB64[t]
    x_t = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * eps
    eps_hat = eps + 0.3 * rng.standard_normal(x0.shape)
    v = rng.uniform(-1, 1, x0.shape)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    mo = f32(np.concatenate([eps_hat, v], -1))
    tt = jnp.full((3,), t)
    losses = jax.jit(lambda m: D.training_losses(SCH, m, f32(x0), tt, f32(eps), learn_variance=True, vlb_weight=1e-3))
    out = losses(mo)
    # Predicted mean (Ho et al. eq. 11) and learned log variance (Nichol & Dhariwal eq. 15).
    b = B64[t]
    mean_pred = (x_t - b / np.sqrt(1 - ab) * eps_hat) / np.sqrt(1 - b)
    pv = np.append(0.0, B64[1:] * (1 - AB64[:-1]) / (1 - AB64[1:]))
    min_log = np.log(pv[max(t, 1)])
    logvar = (v + 1) / 2 * np.log(b) + (1 - (v + 1) / 2) * min_log
    want_vlb = _vlb64(x0, x_t, t, mean_pred, logvar)
    np.testing.assert_allclose(out["vlb"], want_vlb, rtol=2e-3, atol=1e-5)
    mse = ((eps_hat - eps) ** 2).reshape(3, -1).mean(1)
    np.testing.assert_allclose(out["loss"], mse + 1e-3 * T * want_vlb, rtol=2e-3, atol=1e-5)
    # Stop-gradient: the VLB term trains only the variance channels.
    g = jax.jit(jax.grad(lambda m: losses(m)["vlb"].sum()))(mo)
    assert float(jnp.abs(g[..., :2]).max()) == 0.0
    assert float(jnp.abs(g[..., 2:]).max()) > 0.0


def test_bits_per_dim_structure_and_unbiased_estimate():
    sch = schedules.linear(6, beta_start=0.05, beta_end=0.6)
    rng = np.random.default_rng(7)
    x0 = jnp.asarray(np.round((rng.uniform(-1, 1, (1, 3)) + 1) * 127.5) / 127.5 - 1, jnp.float32)
    x0 = jnp.broadcast_to(x0, (2000, 3))
    fn = lambda x, t: 0.3 * x  # an arbitrary eps-model
    full = jax.jit(lambda k: D.bits_per_dim(fn, sch, x0, k))(jax.random.PRNGKey(0))
    est = jax.jit(lambda k: D.bits_per_dim(fn, sch, x0, k, num_timesteps=2))(jax.random.PRNGKey(1))
    for d in (full, est):
        assert set(d) >= {"total_bpd", "prior_bpd", "vb_bpd", "decoder_bpd"}
        np.testing.assert_allclose(d["total_bpd"], d["prior_bpd"] + d["vb_bpd"] + d["decoder_bpd"], rtol=1e-6)
    # Prior KL(N(sqrt(abar) x0, 1 - abar) || N(0, 1)) per dim in bits, float64.
    ab = np.cumprod(1 - np.linspace(0.05, 0.6, 6))[-1]
    x = np.asarray(x0[0], np.float64)
    prior = (0.5 * (-1 - np.log(1 - ab) + (1 - ab) + ab * x**2)).mean() / math.log(2)
    np.testing.assert_allclose(full["prior_bpd"], prior, rtol=1e-5)
    # Unbiasedness: both are per-example random (noise, timesteps) with the same expectation.
    # Compare means with a 5-sigma tolerance from the per-example standard errors.
    diff = float(est["total_bpd"].mean() - full["total_bpd"].mean())
    se = math.sqrt(float(est["total_bpd"].var() + full["total_bpd"].var()) / 2000)
    assert abs(diff) < 5 * se, (diff, se)


@pytest.mark.parametrize("name", schedules.NAMES)
def test_finite_at_t0_and_last_in_float32(name):
    sch = schedules.make(name)
    x0, eps = _data(8, (2, 4, 4, 3))
    x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    t = jnp.array([0, sch.num_timesteps - 1])
    for v in jax.tree_util.tree_leaves(_all_outputs(sch, f32(x0), t, f32(eps))):
        assert np.all(np.isfinite(np.asarray(v))), name


@jax.jit
def _all_outputs(sch, x0, t, eps):
    """Every process-math output at the given timesteps (one compile for all schedules)."""
    x_t = D.q_sample(sch, x0, t, eps)
    vals = [x_t]
    for prediction in D.PREDICTIONS:
        target = D.prediction_target(sch, x0, eps, t, prediction)
        mo = jnp.concatenate([target + 0.1, jnp.zeros_like(target)], -1)
        vals += [target, D.predict_x0(sch, x_t, t, target + 0.1, prediction),
                D.predict_eps(sch, x_t, t, target + 0.1, prediction)]
        for variance in D.VARIANCES:
            out = D.p_mean_variance(sch, x_t, t, mo if variance == "learned_range" else target + 0.1,
                                    prediction=prediction, variance=variance)
            vals += list(out.values())
        for weighting in D.LOSS_WEIGHTINGS:
            vals += list(D.training_losses(sch, mo, x0, t, eps, prediction=prediction,
                                           weighting=weighting, learn_variance=True).values())
    vals.append(D.vlb_terms(sch, x0, x_t, t, eps, variance="large"))
    return vals


def test_jit_and_vmap_of_public_functions():
    x0, eps = (jnp.asarray(a, jnp.float32) for a in _data(9, (4, 2, 2, 1)))
    t = jnp.array([0, 5, 500, 999])
    mo = eps + 0.1
    calls = {
        "q_sample": lambda x0, t, e, m: D.q_sample(SCH, x0, t, e),
        "q_posterior": lambda x0, t, e, m: D.q_posterior(SCH, x0, D.q_sample(SCH, x0, t, e), t),
        "predict_x0": lambda x0, t, e, m: D.predict_x0(SCH, x0, t, m, "v"),
        "predict_eps": lambda x0, t, e, m: D.predict_eps(SCH, x0, t, m, "score"),
        "prediction_target": lambda x0, t, e, m: D.prediction_target(SCH, x0, e, t, "v"),
        "p_mean_variance": lambda x0, t, e, m: D.p_mean_variance(SCH, x0, t, m, variance="large"),
        "training_losses": lambda x0, t, e, m: D.training_losses(SCH, m, x0, t, e, weighting="min_snr"),
        "normal_kl": lambda x0, t, e, m: D.normal_kl(x0, e, m, e),
        "dgll": lambda x0, t, e, m: D.discretized_gaussian_log_likelihood(x0, means=m, log_scales=e),
        "vlb_terms": lambda x0, t, e, m: D.vlb_terms(SCH, x0, D.q_sample(SCH, x0, t, e), t, m),
        "prior_bpd": lambda x0, t, e, m: D.prior_bpd(SCH, x0),
    }
    # One compile for all functions under jit, one under jit(vmap) (each example a batch of one).
    every = lambda *a: {name: f(*a) for name, f in calls.items()}
    jitted = jax.jit(every)(x0, t, eps, mo)
    vm = jax.jit(jax.vmap(lambda a, b, c, d: every(a[None], b[None], c[None], d[None])))(x0, t, eps, mo)
    for name in calls:
        for a, c in zip(jax.tree_util.tree_leaves(jitted[name]), jax.tree_util.tree_leaves(vm[name])):
            assert np.all(np.isfinite(np.asarray(a))), name
            np.testing.assert_allclose(a, np.reshape(c, np.shape(a)), rtol=1e-5, atol=1e-6, err_msg=name)
    # Spot-check the jitted values against float64 formulas.
    ab = _col(AB64[np.asarray(t)])
    np.testing.assert_allclose(jitted["q_sample"], np.sqrt(ab) * np.asarray(x0) + np.sqrt(1 - ab) * np.asarray(eps), atol=2e-6)
    small = schedules.linear(4)
    bpd = jax.vmap(lambda k: D.bits_per_dim(lambda x, t: x, small, x0, k, num_timesteps=2)["total_bpd"])(
        jax.random.split(jax.random.PRNGKey(0), 2))
    assert bpd.shape == (2, 4)


def test_bad_arguments_raise():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="prediction"):
        D.predict_x0(SCH, x, 0, x, "noise")
    with pytest.raises(ValueError, match="variance"):
        D.p_mean_variance(SCH, x, 0, x, variance="fixed")
    with pytest.raises(ValueError, match="weighting"):
        D.training_losses(SCH, x, x, 0, x, weighting="snr")
    with pytest.raises(ValueError, match="channels"):
        D.p_mean_variance(SCH, x, 0, x, variance="learned_range")
    with pytest.raises(ValueError, match="channels"):
        D.training_losses(SCH, x, x, 0, x, learn_variance=True)
    with pytest.raises(ValueError, match="num_timesteps"):
        D.bits_per_dim(lambda a, t: a, SCH, x, jax.random.PRNGKey(0), num_timesteps=0)
