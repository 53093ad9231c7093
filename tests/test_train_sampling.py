"""--mode sample: bad sample.labels fail before any restore; non-finite images are never written."""

import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import smoke  # noqa: E402

from diffusion_jax import models  # noqa: E402
from diffusion_jax.train import checkpoints, loop, sampling  # noqa: E402
from diffusion_jax.train.state import dummy_inputs  # noqa: E402


@pytest.mark.parametrize("labels", ["1,3", "0,x", "-1"])
def test_bad_labels_fail_before_any_restore(tmp_path, labels):
    config = smoke.get_config()
    config.sample.labels = labels
    for call in (lambda: sampling.run_sample_mode(config, str(tmp_path)), lambda: loop.prepare(config)):
        with pytest.raises(ValueError) as e:
            call()  # (the workdir has no checkpoint: a restore would fail differently)
        assert str(e.value) == (f"config.sample.labels must be comma-separated integers in [0, 3) "
                                f"(model.num_classes=3), got {labels!r}")


def test_non_finite_images_are_not_written(tmp_path, monkeypatch):
    config = smoke.get_config()
    model = models.create(config.model)
    shapes = jax.eval_shape(lambda k: model.init({"params": k}, *dummy_inputs(config.model), train=False),
                            jax.random.PRNGKey(0))["params"]
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": zeros, "ema_params": zeros, "opt_state": {}}, {}, config)
    ckpt.close()

    def nan_images(config, params, num, labels, key):  # what a diverging sampler returns
        images = np.zeros((num, 8, 8, 1), np.float32)
        images[1, 2, 3, 0] = np.nan
        return images

    monkeypatch.setattr(sampling, "sample_images", nan_images)
    with pytest.raises(ValueError, match=r"^sampling from checkpoint 3 gave non-finite values in 1 of 6 images "
                                         r"\(config\.sample: .*\); nothing written"):
        sampling.run_sample_mode(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "samples")


def test_guidance_interval_guides_only_inside_it():
    """With sample.guidance_interval = (lo, hi), the denoiser's network output is
    (1 + w) out(x, c) - w out(x, null) where sigma(t) = sqrt((1 - abar_t) / abar_t) lies in
    (lo, hi], and out(x, c) elsewhere; per example, sigma from the linear schedule in float64."""
    config = smoke.get_config()  # ddpm, linear betas, T = num_timesteps
    config.sample.guidance_interval = (0.5, 2.0)
    model = models.create(config.model)
    from models_support import jit  # one cheap compile per call, not one per eager op

    params = jit(lambda k: model.init({"params": k}, *dummy_inputs(config.model), train=False))(
        jax.random.PRNGKey(0))["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
    T = int(config.diffusion.num_timesteps)
    kw = config.diffusion.schedule_kwargs
    betas = np.linspace(kw.beta_start, kw.beta_end, T, dtype=np.float64)
    abar = np.cumprod(1 - betas)
    sigma = np.sqrt((1 - abar) / abar)
    t = np.asarray([0, np.argmax(sigma > 0.5), np.argmax(sigma > 1.0), np.argmax(sigma > 2.0), T - 1], np.int32)
    inside = (sigma[t] > 0.5) & (sigma[t] <= 2.0)
    assert inside.any() and (~inside).any()
    b, w = len(t), 2.0
    x = jax.random.normal(jax.random.PRNGKey(2), (b, 8, 8, 1))
    labels = np.asarray([0, 1, 2, 1, 0], np.int32)
    out = jit(lambda p, x, t: sampling.make_denoiser(config, p, labels, w)(x, t).out)(params, x, t)
    apply = jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    cond, null = apply(params, x, t, labels), apply(params, x, t, models.null_cond(config.model, b))
    want = np.where(inside[:, None, None, None], (1 + w) * cond - w * null, cond)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(cond - null)).max() > 1e-3  # the two branches differ


@pytest.mark.parametrize("interval", [(1.0,), (2.0, 1.0), (-0.1, 1.0), (0.0, float("inf")), ("a", 1.0)])
def test_bad_guidance_intervals_are_refused(interval):
    from diffusion_jax.train import config as config_lib
    config = smoke.get_config()
    config.sample.guidance_interval = interval
    with pytest.raises(ValueError, match=r"^config\.sample\.guidance_interval must be \(\) or \(lo, hi\)"):
        config_lib.validate(config)
