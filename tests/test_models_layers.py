"""diffusion_jax.models.layers: Conv, GroupNorm and LayerNorm against numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import layers


# --------------------------------------------------------------------------- layers


def test_conv_matches_numpy_direct_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3))
    conv = layers.Conv(4, (3, 3))
    v = conv.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    k = rng.normal(size=(3, 3, 3, 4))
    b = rng.normal(size=(4,))
    y = conv.apply({"params": {"kernel": jnp.asarray(k, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}},
                   jnp.asarray(x, jnp.float32))
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ref = np.zeros((2, 5, 6, 4)) + b
    for i in range(5):
        for j in range(6):
            ref[:, i, j] += np.einsum("nhwc,hwco->no", xp[:, i:i + 3, j:j + 3], k)
    assert v["params"]["kernel"].shape == (3, 3, 3, 4)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-4, atol=1e-4)


def test_group_norm_and_layer_norm_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 4, 4, 12)) * 3 + 1
    gn = layers.GroupNorm(num_groups=32)  # 12 channels -> 6 groups (largest divisor <= 32 with >= 2 channels each)
    v = gn.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    y = np.asarray(gn.apply(v, jnp.asarray(x, jnp.float32)))
    xg = x.reshape(2, 4, 4, 6, 2)
    ref = ((xg - xg.mean((1, 2, 4), keepdims=True)) / np.sqrt(xg.var((1, 2, 4), keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    assert layers.num_groups_for(128) == 32 and layers.num_groups_for(8) == 4 and layers.num_groups_for(48) == 24

    tok = rng.normal(size=(2, 5, 8)) * 2 - 1
    ln = layers.LayerNorm(use_scale=False, use_bias=False)
    y = np.asarray(ln.apply({}, jnp.asarray(tok, jnp.float32)))
    ref = (tok - tok.mean(-1, keepdims=True)) / np.sqrt(tok.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
