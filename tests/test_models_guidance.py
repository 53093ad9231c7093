"""diffusion_jax.models.guidance: classifier-free guidance and the null condition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import models
from diffusion_jax.models import guidance
from models_support import jit, random_variables, tiny_dit, tiny_unet


# --------------------------------------------------------------------------- classifier-free guidance


def test_cfg_matches_two_separate_passes():
    """Learned-variance model: the C prediction channels are guided, the C variance channels stay conditional."""
    learn_sigma = True
    cfg = tiny_dit(num_classes=5, learn_sigma=learn_sigma)
    model = models.create(cfg)
    v = random_variables(model, cfg, cond=jnp.zeros(2, jnp.int32), seed=13)
    x, t, y = jax.random.normal(jax.random.key(14), (3, 16, 16, 1)), jnp.array([1, 50, 999]), jnp.array([0, 2, 4])
    w = 3.0
    calls = []

    def counting_apply(variables, *args):
        calls.append(args[0].shape[0])
        return model.apply(variables, *args)

    fn = guidance.guided_denoise_fn(counting_apply, v["params"], y, w, config=cfg)
    got = np.asarray(jit(fn)(x, t))
    assert calls == [6]  # one batched pass over [x; x]
    apply = jit(model.apply)
    cond = np.asarray(apply(v, x, t, y), np.float64)
    uncond = np.asarray(apply(v, x, t, jnp.full(3, 5)), np.float64)
    expected = (1 + w) * cond - w * uncond
    if learn_sigma:
        expected[..., 1:] = cond[..., 1:]  # variance channels: conditional
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # w = 0 is the conditional model
    fn0 = guidance.guided_denoise_fn(apply, v, y, 0.0, uncond=models.null_cond(cfg, 3))
    np.testing.assert_allclose(np.asarray(fn0(x, t)), cond, rtol=1e-5, atol=1e-5)


def test_null_cond_and_drop_condition():
    assert models.null_cond(tiny_unet(), 4) is None
    np.testing.assert_array_equal(np.asarray(models.null_cond(tiny_unet(num_classes=10), 3)), [10, 10, 10])
    assert models.null_cond(tiny_unet(cond_dim=7), 2).shape == (2, 7)
    labels = jnp.arange(1000) % 10
    dropped = guidance.drop_condition(labels, jax.random.key(0), 0.2, jnp.full(1000, 10))
    frac = float(jnp.mean(dropped == 10))
    assert 0.15 < frac < 0.25  # binomial(1000, 0.2): sd 0.013
    assert bool(jnp.all((dropped == labels) | (dropped == 10)))
