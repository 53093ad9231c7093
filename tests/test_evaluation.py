"""Evaluation metrics on inputs whose answer is known independently (float64 numpy / scipy)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.special import log_ndtr, ndtr

from diffusion_jax import schedules
from diffusion_jax.evaluation import classifier, likelihood, metrics, pictures, quality


# ----------------------------------------------------------------------------- Frechet distance


def _fd_scipy(mu1, s1, mu2, s2):
    """FD with scipy.linalg.sqrtm of the (non-symmetric) product, float64 -- an independent route."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def _random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_commuting_closed_form():
    # Diagonal covariances commute: d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # One dimension: (mu1 - mu2)^2 + (s1 - s2)^2.
    assert metrics.frechet_distance([0.5], [[4.0]], [-0.5], [[1.0]]) == pytest.approx(1.0 + 1.0)


def test_frechet_distance_non_commuting_against_scipy_sqrtm():
    rng = np.random.default_rng(0)
    for d in (2, 5, 16):
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert not np.allclose(s1 @ s2, s2 @ s1)
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-8)
        assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_from_features_converges_to_closed_form():
    rng = np.random.default_rng(1)
    d = 4
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    mu1, mu2 = np.zeros(d), np.full(d, 0.5)
    n = 200_000
    f1 = rng.multivariate_normal(mu1, s1, size=n)
    f2 = rng.multivariate_normal(mu2, s2, size=n)
    assert metrics.frechet_distance_from_features(f1, f2) == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=0.03)


# ----------------------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_explicit_double_sum():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 3)), rng.standard_normal((5, 3)) + 1.0
    k = lambda a, b: (a @ b / 3 + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(7) for j in range(7) if i != j) / (7 * 6)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(7) for j in range(5)) / (7 * 5)
    assert metrics.mmd2_unbiased(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_mmd2_unbiased_has_zero_mean_for_identical_distributions():
    # Independent replicate pairs from one distribution: the U-statistic averages to 0, while
    # the V-statistic (diagonal included) is biased upwards by ~(E k(x,x) - E k(x,y)) * 2 / m.
    rng = np.random.default_rng(3)
    m, d, reps = 40, 8, 400
    u, v = [], []
    for _ in range(reps):
        x, y = rng.standard_normal((m, d)), rng.standard_normal((m, d))
        u.append(metrics.mmd2_unbiased(x, y))
        k = metrics.polynomial_kernel
        v.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
    u, v = np.array(u), np.array(v)
    stderr = u.std() / np.sqrt(reps)
    assert abs(u.mean()) < 4 * stderr
    assert v.mean() > u.mean() + 10 * stderr


def test_kid_ordered_by_shift():
    rng = np.random.default_rng(3)
    d, n = 8, 1000
    base = rng.standard_normal((n, d))
    same = metrics.kernel_inception_distance(base, rng.standard_normal((n, d)), num_subsets=3, subset_size=250)[0]
    shifted = [metrics.kernel_inception_distance(base, rng.standard_normal((n, d)) + delta,
                                                 num_subsets=3, subset_size=250)[0]
               for delta in (0.25, 0.5, 1.0)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    assert shifted[0] > 5 * abs(same)


# ----------------------------------------------------------------------------- IS analogue, accuracy


def test_inception_score_known_values():
    k = 10
    confident_uniform = np.eye(k)[np.arange(1000) % k]  # certain, every class equally often
    assert metrics.inception_score(confident_uniform)[0] == pytest.approx(k, rel=1e-12)
    assert metrics.inception_score(np.full((100, k), 1.0 / k))[0] == pytest.approx(1.0)  # no confidence
    assert metrics.inception_score(np.eye(k)[np.zeros(100, int)])[0] == pytest.approx(1.0)  # one class
    # Two equiprobable classes, each predicted with p = 0.9: exp(KL) = exp(ln 2 - H(0.9)).
    p = np.array([[0.9, 0.1], [0.1, 0.9]] * 50)
    h = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert metrics.inception_score(p)[0] == pytest.approx(np.exp(np.log(2) - h), rel=1e-12)
    with pytest.raises(ValueError, match="probs"):
        metrics.inception_score(np.full((4, 3), 2.0))


def test_conditional_accuracy():
    probs = np.eye(3)[[0, 1, 2, 2]]
    assert metrics.conditional_accuracy(probs, [0, 1, 2, 0]) == 0.75


# ----------------------------------------------------------------------------- floor vs noise


def _class_images(rng, n, num_classes=4, size=8):
    """Synthetic uint8 images: class k is a bright square in quadrant k, plus noise."""
    labels = rng.integers(0, num_classes, n)
    images = np.full((n, size, size, 1), 30.0)
    half = size // 2
    for k in range(num_classes):
        r, c = divmod(k, 2)
        images[labels == k, r * half:(r + 1) * half, c * half:(c + 1) * half] = 220.0
    images += 20.0 * rng.standard_normal(images.shape)
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels


def _random_feature_map(dim=16, num_classes=4, size=8, seed=0):
    """A fixed random ReLU feature map and a linear class read-out, as a stand-in classifier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((size * size, dim)) / size
    v = rng.standard_normal((dim, num_classes))

    def apply_fn(images):
        x = classifier.to_model_input(images).reshape(len(images), -1).astype(np.float64)
        f = np.maximum(x @ w, 0.0)
        logits = f @ v
        p = np.exp(logits - logits.max(1, keepdims=True))
        return f, p / p.sum(1, keepdims=True)

    return apply_fn


def test_test_set_samples_score_at_the_floor_and_noise_far_worse():
    rng = np.random.default_rng(4)
    train, _ = _class_images(rng, 3000)
    test, test_labels = _class_images(rng, 2000)
    apply_fn = _random_feature_map()
    ref = quality.make_reference(apply_fn, test, train, num_samples=500, num_classes=4,
                                 kid_subsets=10, kid_subset_size=500)
    from_test = quality.score(apply_fn, test[rng.choice(len(test), 500, replace=False)], ref)
    noise = quality.score(apply_fn, rng.uniform(-1, 1, (500, 8, 8, 1)).astype(np.float32), ref)
    floor = ref.floor
    assert floor["fd"] > 0
    # Test-set samples are as good as train samples (same distribution, same sample size).
    assert from_test["fd"] < 1.5 * floor["fd"]
    assert abs(from_test["kid"]) < 5 * floor["kid_std"] + abs(floor["kid"])
    # Pure noise: orders of magnitude worse.
    assert noise["fd"] > 50 * floor["fd"]
    assert noise["kid"] > 50 * (abs(floor["kid"]) + floor["kid_std"])


def test_sweep_table_and_plot(tmp_path):
    rng = np.random.default_rng(5)
    train, _ = _class_images(rng, 600)
    test, _ = _class_images(rng, 600)
    apply_fn = _random_feature_map()
    ref = quality.make_reference(apply_fn, test, train, num_samples=100, num_classes=4,
                                 kid_subsets=2, kid_subset_size=100)

    def generate(sampler, steps, guidance, labels, seed):
        # "Better" with more steps: less noise mixed into real images.
        base = classifier.to_model_input(_class_images(np.random.default_rng(seed), len(labels))[0])
        return np.clip(base + (1.0 / steps) * rng.standard_normal(base.shape), -1, 1)

    settings = quality.settings_from(["ddim", "ddpm"], [1, 10], 1.0, [0.0, 1.0, 2.0], "ddim", 10)
    assert len(settings) == 6  # (ddim, 10, 1.0) appears once
    rows = quality.sweep(generate, apply_fn, ref, settings, num_samples=100, conditional=True)
    by = {(r["sampler"], r["steps"], r["guidance"]): r for r in rows}
    assert by[("ddim", 1, 1.0)]["fd"] > by[("ddim", 10, 1.0)]["fd"]
    assert all(0 <= r["conditional_accuracy"] <= 1 for r in rows)
    md, js = quality.write_table(rows, ref.floor, str(tmp_path))
    table = open(md).read()
    assert table.count("\n") == 2 + 1 + len(rows) and "floor" in table
    assert len(json.load(open(js))["rows"]) == len(rows)
    pytest.importorskip("matplotlib")
    png = quality.plot(rows, ref.floor, str(tmp_path / "q.png"))
    assert os.path.getsize(png) > 1000


# ----------------------------------------------------------------------------- bits/dim


def _discretised_gaussian(mu, s):
    """P[d, k] of the 256 pixel levels x_k = k/127.5 - 1 of y ~ N(mu_d, s_d^2) rounded to the
    nearest level (edge levels take the tails), in float64."""
    levels = np.arange(256) / 127.5 - 1.0
    lo = np.where(np.arange(256) == 0, -np.inf, levels - 1.0 / 255.0)
    hi = np.where(np.arange(256) == 255, np.inf, levels + 1.0 / 255.0)
    mu, s = mu.reshape(-1, 1), s.reshape(-1, 1)
    return ndtr((hi - mu) / s) - ndtr((lo - mu) / s), levels


def _expected_bound_bits(mu, s, betas, variance):
    """E[variational bound] in bits/dim, float64, for data that is N(mu, s^2) rounded to 8 bits
    and the continuous-Gaussian oracle x0_hat(x_t) = mu + g_t (x_t - sqrt(abar_t) mu),
    g_t = sqrt(abar_t) s^2 / (abar_t s^2 + 1 - abar_t) (the eps-oracle of the test, rewritten).

    Everything is Gaussian except the decoder, so the terms are closed forms (Ho et al. 2020,
    eq. 5-7; 1-based t below):
      prior   KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)), averaged over the discrete x0;
      t >= 2  KL(N(mu~_t, beta~_t) || N(mu_theta, v_t)) = 1/2 [log(v_t / beta~_t) + beta~_t / v_t - 1
              + c_t^2 E(x0 - x0_hat)^2 / v_t], c_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t), and
              E(x0 - x0_hat)^2 = E(x0 - mu)^2 (1 - g_t sqrt(abar_t))^2 + g_t^2 (1 - abar_t), exact
              for the linear oracle (noise independent of x0);
      t = 1   -E log P_dec(x0 | x_1), P_dec the discretised N(x0_hat(x_1), v_1): a 1-D Gauss-Hermite
              integral over the noise for every level of every dimension.
    """
    P, levels = _discretised_gaussian(mu, s)
    mu, s = mu.reshape(-1, 1), s.reshape(-1, 1)
    alphas_cumprod = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    post_var = betas * (1.0 - abar_prev) / (1.0 - alphas_cumprod)
    clipped = np.concatenate([[post_var[1]], post_var[1:]])
    v = clipped if variance == "small" else np.concatenate([[post_var[1]], betas[1:]])
    second = np.sum(P * (levels - mu) ** 2, axis=1, keepdims=True)  # E(x0 - mu)^2 per dim
    total = np.zeros(len(mu))
    # prior
    a_T = alphas_cumprod[-1]
    ex2 = np.sum(P * levels ** 2, axis=1)
    total += 0.5 * (a_T * ex2 + (1 - a_T) - 1 - np.log(1 - a_T))
    # KL terms, 0-based index i >= 1
    for i in range(1, len(betas)):
        a = alphas_cumprod[i]
        g = np.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)
        err = second * (1 - g * np.sqrt(a)) ** 2 + g ** 2 * (1 - a)
        c = betas[i] * np.sqrt(abar_prev[i]) / (1 - a)
        total += (0.5 * (np.log(v[i] / post_var[i]) + post_var[i] / v[i] - 1 + c ** 2 * err / v[i]))[:, 0]
    # decoder: x_1 = sqrt(a_1) x_k + sqrt(1 - a_1) z, mean x0_hat(x_1), std sqrt(v_0)
    a = alphas_cumprod[0]
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    g = np.sqrt(a) * s ** 2 / (a * s ** 2 + 1 - a)
    x1 = np.sqrt(a) * levels[None, :, None] + np.sqrt(1 - a) * z[None, None, :]
    mean = mu[:, :, None] + g[:, :, None] * (x1 - np.sqrt(a) * mu[:, :, None])
    std = np.sqrt(v[0])
    x = levels[None, :, None]
    hi = np.where(x > 0.999, np.inf, x + 1 / 255)
    lo = np.where(x < -0.999, -np.inf, x - 1 / 255)
    # log(Phi(b) - Phi(a)) evaluated on the far tail for accuracy
    up = (x - mean) > 0
    a_, b_ = np.where(up, -(hi - mean) / std, (lo - mean) / std), np.where(up, -(lo - mean) / std, (hi - mean) / std)
    log_p = log_ndtr(b_) + np.log1p(-np.exp(np.minimum(log_ndtr(a_) - log_ndtr(b_), -1e-300)))
    total += -np.sum(P * np.sum(w * log_p, axis=2), axis=1)
    entropy = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0), axis=1)
    return total.mean() / np.log(2), entropy.mean() / np.log(2)


def _gaussian_case(num_images, seed=0):
    rng = np.random.default_rng(seed)
    shape = (4, 4, 1)
    mu, s = rng.uniform(-0.3, 0.3, shape), rng.uniform(0.15, 0.4, shape)
    y = mu + s * rng.standard_normal((num_images, *shape))
    images = np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8)
    sch = schedules.linear(1000)
    ab = sch.alphas_cumprod
    mu_j, s2_j = jnp.asarray(mu, jnp.float32), jnp.asarray(s ** 2, jnp.float32)

    def oracle(x_t, t):
        # eps*(x_t, t) = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar): E[eps | x_t]
        # for x0 ~ N(mu, s^2), exact for continuous Gaussian data.
        a = ab[t].reshape(-1, 1, 1, 1)
        return jnp.sqrt(1.0 - a) * (x_t - jnp.sqrt(a) * mu_j) / (a * s2_j + 1.0 - a)

    return images, mu, s, sch, oracle


@pytest.mark.parametrize("variance", ["small", "large"])
def test_bits_per_dim_of_gaussian_oracle_bounds_the_discrete_entropy(variance):
    """The bound's excess over the entropy H of the 8-bit data, derived (1-based t):

      E[L] - H = E KL(q(x0 | x_1) || p_dec(x0 | x_1))            decoder
               + KL(q(x_1) || p(x_1)) + E KL(q(x_{2:T} | x_1) || p(x_{2:T} | x_1))   >= 0
    so E[L] >= H always. With the oracle the means are exact for continuous data; what is left:
    (i) the decoder's std sqrt(beta~_2) ~ 0.0074 against the true posterior's ~ sqrt(beta_1) = 0.01
    on bins 2/255 wide (~0.1-0.2 bit); (ii) the fixed reverse variance v_t against the true
    reverse variance, which near t = 1 is ~beta_t, not beta~_t = beta_t (t-1)/t: for "small" a sum
    of 1/2 (r - 1 - ln r), r = t/(t-1), ~ (pi^2/6 - ...)/4 nats ~ 0.6 bit; for "large" ~0;
    (iii) the discrete-vs-continuous prior of the oracle (variance s^2 vs s^2 + (2/255)^2/12), tiny.
    `_expected_bound_bits` computes E[L] exactly from these closed forms in float64; the margin is
    its excess over H plus 4 standard errors of the Monte-Carlo mean.
    """
    images, mu, s, sch, oracle = _gaussian_case(512)
    expected, entropy = _expected_bound_bits(mu, s, np.linspace(1e-4, 0.02, 1000, dtype=np.float64), variance)
    assert expected > entropy  # the bound, in exact arithmetic
    excess = expected - entropy
    assert 0.05 < excess < (1.0 if variance == "small" else 0.3)  # the sizes argued above
    out = likelihood.dataset_bits_per_dim(oracle, sch, images, jax.random.PRNGKey(0), batch_size=512,
                                          variance=variance)
    bpd, stderr = out["total_bpd"], out["total_bpd_stderr"]
    assert out["num_timesteps"] == 1000 and out["num_images"] == 512
    assert bpd >= entropy + excess - 4 * stderr >= entropy  # never below the entropy
    assert bpd <= entropy + excess + 4 * stderr  # within the derived margin
    assert abs(out["prior_bpd"]) < 1e-3  # abar_T ~ 4e-5: x_T is almost exactly N(0, 1)


def test_sampled_timestep_estimators_are_unbiased():
    images, mu, s, sch, oracle = _gaussian_case(400, seed=1)
    expected, _ = _expected_bound_bits(mu, s, np.linspace(1e-4, 0.02, 1000, dtype=np.float64), "small")
    results = {}
    for estimator in ("uniform", "stratified"):
        out = likelihood.dataset_bits_per_dim(oracle, sch, images, jax.random.PRNGKey(1), batch_size=400,
                                              num_timesteps=20, estimator=estimator)
        assert abs(out["total_bpd"] - expected) < 4 * out["total_bpd_stderr"], (estimator, out, expected)
        results[estimator] = out
    assert results["uniform"]["calls_per_image"] == 20 and results["stratified"]["calls_per_image"] <= 21
    # The same network calls, a far smaller error: the terms concentrate at small t.
    assert results["stratified"]["total_bpd_stderr"] < results["uniform"]["total_bpd_stderr"] / 4
    starts, sizes = likelihood.geometric_strata(1000, 20)
    assert starts[0] == 1 and starts[-1] + sizes[-1] == 1000 and np.all(starts[1:] == starts[:-1] + sizes[:-1])
    with pytest.raises(ValueError, match="uint8"):
        likelihood.dataset_bits_per_dim(oracle, sch, images.astype(np.float32), jax.random.PRNGKey(1))
    with pytest.raises(ValueError, match="estimator"):
        likelihood.dataset_bits_per_dim(oracle, sch, images, jax.random.PRNGKey(1), num_timesteps=5,
                                        estimator="importance")


# ----------------------------------------------------------------------------- classifier, pictures


TINY_ARCH = {"widths": [8], "convs_per_block": 1, "hidden": 16}


def test_classifier_trains_saves_and_loads(tmp_path):
    rng = np.random.default_rng(6)
    train_split, test_split = _class_images(rng, 1024), _class_images(rng, 256)
    meta = classifier.train_and_save("toy", str(tmp_path), arrays={"train": train_split, "test": test_split},
                                     epochs=3, batch_size=32, arch=TINY_ARCH, log=None)
    assert meta["test_accuracy"] > 0.95 and meta["num_classes"] == 4
    assert sorted(os.listdir(tmp_path)) == [classifier.META_FILE, classifier.PARAMS_FILE]  # no temp files
    model, params, loaded_meta = classifier.load(str(tmp_path))
    assert loaded_meta == json.loads(json.dumps(meta))
    feats, probs = classifier.make_apply_fn(model, params, batch_size=100)(test_split[0])
    assert feats.shape == (256, TINY_ARCH["hidden"]) and probs.shape == (256, 4)
    assert np.mean(probs.argmax(1) == test_split[1]) == pytest.approx(meta["test_accuracy"])
    with pytest.raises(FileNotFoundError, match="classifier"):
        classifier.load(str(tmp_path / "missing"))


def test_pictures(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (12, 8, 8, 1)).astype(np.float32)
    labels = np.repeat(np.arange(3), 4)
    path = pictures.save_class_grid(images, labels, str(tmp_path / "g.png"), num_classes=3, per_class=4)
    from PIL import Image

    assert Image.open(path).size == (2 * (4 * 10 + 2), 2 * (3 * 10 + 2))
    traj = rng.uniform(-1, 1, (11, 3, 8, 8, 1))
    strip = pictures.save_denoising_strip(traj, np.arange(10)[::-1] * 100, str(tmp_path / "s.png"), num_columns=6)
    assert Image.open(strip).size[0] == 3 * (6 * 10 + 2)  # scale 3
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 60):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3}) + "\n")
        f.write('{"step": 60, "lo')  # a line cut by an interrupted write is skipped
    pytest.importorskip("matplotlib")
    assert os.path.getsize(pictures.save_loss_curve(str(tmp_path / "metrics.jsonl"), str(tmp_path / "l.png"))) > 1000
    assert pictures.save_loss_curve(str(tmp_path / "none.jsonl"), str(tmp_path / "n.png")) is None


def test_evaluate_end_to_end_on_the_smoke_config(tmp_path):
    """evaluate() on the smoke experiment (8x8 synthetic data) with untrained parameters:
    every output file appears and the numbers are finite."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import smoke

    from diffusion_jax import evaluation, models

    config = smoke.get_config()
    workdir = str(tmp_path)
    # A pre-trained tiny classifier keeps the test fast (evaluate would train the default one).
    classifier.train_and_save("synthetic", os.path.join(workdir, "clf"), epochs=1, batch_size=100,
                              arch=TINY_ARCH, log=None,
                              arrays={s: evaluation.load_split(config, s) for s in ("train", "test")})
    with config.unlocked():
        config.eval.update(dict(
            num_samples=24, batch_size=24, samplers=("ddim",), steps=(3,), guidance_scales=(0.0,),
            guidance_sampler="ddim", guidance_steps=3, kid_subsets=2, bpd_num_images=10,
            bpd_num_timesteps=2, bpd_batch_size=10, classifier_dir=os.path.join(workdir, "clf"),
            grid_per_class=8, strip_num_images=2, strip_sampler="ddim", strip_steps=3))
        config.sample.method, config.sample.num_steps = "ddim", 3
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 20))
    model = models.create(config.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    summary = evaluation.evaluate(config, workdir, params=params)
    out = os.path.join(workdir, "eval")
    expected = {"bpd.json", "quality.md", "quality.json", "summary.json", "summary.md",
                "samples_per_class.png", "denoising_strip.png"}
    if pytest.importorskip("matplotlib"):
        expected |= {"quality.png", "loss.png"}
    assert expected <= set(os.listdir(out))
    assert np.isfinite(summary["bpd"]["total_bpd"]) and summary["bpd"]["calls_per_image"] == 3
    rows = summary["quality"]
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [("ddim", 3, 2.0), ("ddim", 3, 0.0)]
    assert all(np.isfinite(r["fd"]) and 0 <= r["conditional_accuracy"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="eval.samplers"):
        with config.unlocked():
            config.eval.samplers = ("euler",)
        evaluation.eval_settings(config)


def test_random_shift_translates_each_image_with_black_fill():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(64, 7, 6, 2)).astype(np.float32)
    got = classifier.random_shift(x, 2, np.random.default_rng(11))
    dy, dx = np.random.default_rng(11).integers(-2, 3, size=(2, 64))  # the same draws
    assert got.shape == x.shape and len({(a, b) for a, b in zip(dy, dx)}) > 10
    for k in range(64):
        want = np.full_like(x[k], -1.0)
        for i in range(7):
            for j in range(6):
                if 0 <= i - dy[k] < 7 and 0 <= j - dx[k] < 6:
                    want[i, j] = x[k, i - dy[k], j - dx[k]]
        np.testing.assert_array_equal(got[k], want)
    assert classifier.random_shift(x, 0, rng) is x
