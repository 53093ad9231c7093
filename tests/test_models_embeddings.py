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
