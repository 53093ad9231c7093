"""Classifier-free guidance (Ho & Salimans 2022).

A conditional network trained with the condition replaced by the null
condition some of the time (`drop_condition`) gives both eps(x_t, c) and
eps(x_t, null). Guided prediction, with guidance scale w >= 0:

    eps_guided = (1 + w) * eps(x_t, c) - w * eps(x_t, null)

w = 0 is the plain conditional model. Both terms come from ONE forward pass on
the batch [x_t; x_t] with conditions [c; null]. With a learned variance
(2C output channels), only the first C (prediction) channels are guided; the
variance channels are the conditional ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax.models.embeddings import null_cond


def drop_condition(cond: jax.Array, key: jax.Array, p: float, uncond: jax.Array) -> jax.Array:
    """Replaces each example's condition by the null one with probability p (CFG training).

    `uncond` is `null_cond(config, batch)`; works for labels [B] and vectors [B, D].
    """
    return where_dropped(jax.random.bernoulli(key, p, (cond.shape[0],)), cond, uncond)


def where_dropped(drop: jax.Array, cond: jax.Array, uncond: jax.Array) -> jax.Array:
    """`cond` with example i replaced by `uncond[i]` where `drop[i]` (bool [B]).

    For callers that draw the drop mask themselves (the trainer draws it per example,
    so it does not depend on how the batch is sharded); labels [B] or vectors [B, D].
    """
    drop = drop.reshape((-1,) + (1,) * (cond.ndim - 1))
    return jnp.where(drop, uncond, cond)


def _variables(params: Any) -> Any:
    if isinstance(params, Mapping) and "params" in params:
        return params
    return {"params": params}


def guided_denoise_fn(
    apply_fn: Callable[..., jax.Array],
    params: Any,
    cond: jax.Array | None,
    guidance_scale: float | jax.Array,
    *,
    uncond: jax.Array | None = None,
    config: Any = None,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns `denoise_fn(x_t, t, h=None)` = (1 + w) * model(x_t, t, cond) - w * model(x_t, t, uncond),
    h the interval input of a flow-map network (model.interval_input), passed on when given.

    apply_fn: `model.apply`; params: the parameter tree, or a variables dict
    with a "params" entry. cond: labels [B] or vectors [B, D] (a scalar label
    or a single [D] vector is broadcast to the batch), or None for an
    unconditional model (no guidance then). uncond: the null condition of the
    same batch; if omitted it is built from `config` (`null_cond`).

    A Python-number guidance_scale of 0 runs the conditional model alone; any
    other (or traced) scale runs one forward pass on a batch of 2B.
    """
    variables = _variables(params)

    def call(x_t, t, c, h):  # h: the interval input of a flow-map network, passed only when given
        return apply_fn(variables, x_t, t, c) if h is None else apply_fn(variables, x_t, t, c, h=h)

    if cond is None:
        return lambda x_t, t, h=None: call(x_t, t, None, h)
    if uncond is None and config is None:
        raise ValueError("guided_denoise_fn: give uncond=null_cond(config, B) or config=model config")
    cond = jnp.asarray(cond)
    plain = isinstance(guidance_scale, (int, float)) and guidance_scale == 0

    def denoise_fn(x_t: jax.Array, t: jax.Array, h: jax.Array | None = None) -> jax.Array:
        b = x_t.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        c = cond
        if c.ndim == 0 or (c.ndim == 1 and jnp.issubdtype(c.dtype, jnp.floating)):
            c = jnp.broadcast_to(c, (b,) + c.shape)
        if plain:
            return call(x_t, t, c, h)
        u = uncond if uncond is not None else null_cond(config, b)
        u = jnp.broadcast_to(jnp.asarray(u, c.dtype), c.shape)
        h2 = None if h is None else jnp.concatenate([jnp.broadcast_to(h, (b,))] * 2, axis=0)
        out = call(
            jnp.concatenate([x_t, x_t], axis=0),
            jnp.concatenate([t, t], axis=0),
            jnp.concatenate([c, u], axis=0),
            h2,
        )
        out_c, out_u = out[:b], out[b:]
        w = jnp.asarray(guidance_scale, out.dtype)
        w = w.reshape(w.shape + (1,) * (out.ndim - w.ndim)) if w.ndim else w  # per example [B]
        ch = x_t.shape[-1]  # learn_sigma: guide the first C channels only
        guided = (1 + w) * out_c[..., :ch] - w * out_u[..., :ch]
        return jnp.concatenate([guided, out_c[..., ch:]], axis=-1)

    return denoise_fn
