"""diffusion_jax.models.embeddings: the sinusoidal timestep embedding against its formula."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from diffusion_jax.models.embeddings import timestep_embedding


# --------------------------------------------------------------------------- embeddings


def test_timestep_embedding_matches_numpy_formula():
    t = np.array([0, 1, 17, 999])
    for dim in (8, 7):
        half = dim // 2
        ref = np.zeros((4, dim))
        for n, tt in enumerate(t):
            for i in range(half):
                w = 10000.0 ** (-i / half)
                ref[n, i] = math.sin(tt * w)
                ref[n, half + i] = math.cos(tt * w)
        np.testing.assert_allclose(np.asarray(timestep_embedding(jnp.asarray(t), dim)), ref, atol=2e-4)


def test_label_table_is_drawn_with_label_init_std():
    """model.label_init_std reaches the label table of both networks: the sample std of its
    (num_classes + 1) x features entries is within 10% of the setting (a few % spread at n >= 2,000).
    Tiny networks with 200 classes give the table its size (tests/models_support.py)."""
    import jax
    import pytest
    from models_support import TINY, jit

    from diffusion_jax import models
    from diffusion_jax.train.state import dummy_inputs

    for name in ("unet", "dit"):
        for std in (0.02, 1.0):
            c = TINY[name](num_classes=200, label_init_std=std)
            model = models.create(c)
            params = jit(lambda k, model=model, c=c: model.init({"params": k}, *dummy_inputs(c), train=False))(
                jax.random.PRNGKey(0))["params"]
            table = np.asarray(params["embed"]["cond"]["label_table"]["embedding"])
            assert table.size >= 2000 and abs(table.std() / std - 1) < 0.1, (name, std, table.std())
    c = models.default_config("unet")
    c.label_init_std = -1.0
    with pytest.raises(ValueError, match="label_init_std"):
        models.create(c)
