"""Shared by the model tests: tiny UNet / DiT configs, fast-compiling init and random variables."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import models


def tiny_unet(**kw) -> ml_collections.ConfigDict:
    c = models.default_config("unet")
    c.image_size, c.ch, c.ch_mult, c.num_res_blocks = 16, 8, (1, 2), 1
    c.attn_resolutions, c.dropout, c.num_heads = (8,), 0.0, 2
    c.update(kw)
    return c


def tiny_dit(**kw) -> ml_collections.ConfigDict:
    c = models.default_config("dit")
    c.image_size, c.patch_size, c.hidden_size, c.depth, c.num_heads = 16, 4, 32, 2, 2
    c.freq_dim = 32
    c.update(kw)
    return c


TINY = {"unet": tiny_unet, "dit": tiny_dit}

# The tests' networks are tiny, so XLA's backend optimisation buys nothing at run
# time but costs most of the compile time (about 3.5x on this CPU).
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def shapes_and_inputs(cfg, batch=2, cond=None):
    x = jnp.zeros((batch, cfg.image_size, cfg.image_size, cfg.in_channels))
    return x, jnp.zeros((batch,), jnp.int32), cond


def init(model, cfg, batch=2, cond=None, key=0):
    """Real initialisation, jit-compiled. The rbg PRNG compiles ~4x faster than threefry on CPU."""
    return jit(model.init)(jax.random.key(key, impl="unsafe_rbg"), *shapes_and_inputs(cfg, batch, cond))


def random_variables(model, cfg, cond=None, seed=0):
    """Variables with the model's shapes filled by numpy draws (no init compile).

    Every parameter is random, so no zero-initialised layer blocks the signal:
    kernels/tables ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), norm scales ~ 1 + N(0, 0.1^2).
    """
    shapes = jax.eval_shape(model.init, jax.random.key(0), *shapes_and_inputs(cfg, 2, cond))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if path[-1].key == "scale":
            return jnp.asarray(1 + 0.1 * rng.normal(size=s.shape), jnp.float32)
        std = 0.1 if len(s.shape) == 1 else 1 / math.sqrt(np.prod(s.shape[:-1]))
        return jnp.asarray(std * rng.normal(size=s.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def count(tree) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))
