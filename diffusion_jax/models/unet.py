"""The DDPM / ADM UNet denoiser (Ho et al. 2020; Nichol & Dhariwal 2021; Dhariwal & Nichol 2021).

Written with Flax Linen rather than NNX: Linen modules are stateless
descriptions whose parameters are a plain pytree, which is what `jax.jit`
with shardings, optax, EMA averaging and Orbax checkpoints all take without
adapters; the trainer handles `{"params": ...}` and nothing else.

Architecture (levels l = 0 .. L-1, L = len(ch_mult), widths ch * ch_mult[l]):

    emb   = Embedding(t, cond)                        width 4 * ch, sinusoid dim ch
    h     = Conv3x3(x)                                 -> skips
    down: per level, num_res_blocks x [ResBlock (+ Attention if res in attn_resolutions)]
          -> skips; then Downsample (not at the last level) -> skips
    mid:  ResBlock, Attention, ResBlock
    up:   per level reversed, (num_res_blocks + 1) x [concat(skip), ResBlock (+ Attention)],
          then Upsample (not at level 0)
    out:  GroupNorm, SiLU, Conv3x3 (zero-initialised) -> C or 2C channels (learn_sigma)

ResBlock: GroupNorm, SiLU, Conv3x3, + Dense(emb) [or, with use_scale_shift_norm,
GroupNorm(h) * (1 + scale) + shift after the second norm (ADM)], GroupNorm,
SiLU, Dropout, Conv3x3 (zero-initialised); a 1x1 conv on the shortcut when the
width changes. With resblock_updown the resampling happens inside a ResBlock
(ADM, BigGAN-style: nearest-neighbour up / 2x2 average-pool down); otherwise a
3x3 conv with stride 2 (down) or nearest-neighbour x2 followed by a 3x3 conv (up).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import ops
from diffusion_jax.models.embeddings import Embedding
from diffusion_jax.models.layers import Conv, GroupNorm, dense, to_dtype


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 upsampling of NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling, stride 2, of NHWC (H, W even)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class ResBlock(nn.Module):
    """Residual block with the embedding injected by add or scale-shift (see module docstring)."""

    out_ch: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resample: str | None = None  # None | "up" | "down"
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_0")(x))
        if self.resample == "up":
            h, x = upsample_nearest(h), upsample_nearest(x)
        elif self.resample == "down":
            h, x = avg_pool2(h), avg_pool2(x)
        h = Conv(self.out_ch, (3, 3), dtype=self.dtype, name="conv_0")(h)
        emb_out = dense(
            2 * self.out_ch if self.use_scale_shift_norm else self.out_ch,
            self.dtype,
            name="emb_proj",
        )(nn.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)
            h = GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_1")(h)
            h = h * (1 + scale) + shift
        else:
            h = GroupNorm(self.norm_groups, dtype=self.dtype, name="norm_1")(h + emb_out)
        h = nn.silu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = Conv(self.out_ch, (3, 3), init_scale=0.0, dtype=self.dtype, name="conv_1")(h)
        if x.shape[-1] != self.out_ch:
            x = Conv(self.out_ch, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, zero-initialised output.

    Heads: `head_channels` channels each if head_channels > 0, else `num_heads`.
    q, k, v from one 1x1 projection (DDPM's NIN layers), softmax in float32.
    """

    num_heads: int = 1
    head_channels: int = -1
    norm_groups: int = 32
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, hh, ww, c = x.shape
        heads = c // self.head_channels if self.head_channels > 0 else self.num_heads
        if c % heads:
            raise ValueError(
                f"attention: channels {c} not divisible into {heads} heads; "
                "change num_heads / head_channels"
            )
        h = GroupNorm(self.norm_groups, dtype=self.dtype, name="norm")(x).reshape(n, hh * ww, c)
        qkv = dense(3 * c, self.dtype, name="qkv")(h)
        out = ops.self_attention(qkv, heads)
        out = dense(c, self.dtype, init_scale=0.0, name="proj_out")(out)
        return x + out.reshape(n, hh, ww, c)


class UNet(nn.Module):
    """DDPM/ADM UNet. Call: `apply(variables, x [B,H,W,C], t [B], cond=None, train=False, h=None)`; t is
    the noise-level input c_noise of the process (`processes`; for ddpm the integer timestep)."""

    image_size: int = 28
    in_channels: int = 1
    ch: int = 64
    ch_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = (7,)
    dropout: float = 0.0
    num_heads: int = 1
    head_channels: int = -1
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    norm_groups: int = 32
    num_classes: int = 0
    cond_dim: int = 0
    cond_combine: str = "add"
    label_init_std: float = 0.02
    learn_sigma: bool = False
    dtype: Any = "float32"
    interval_input: bool = False

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: jax.Array | None = None,
        *,
        train: bool = False,
        h: jax.Array | None = None,
    ) -> jax.Array:
        dtype = to_dtype(self.dtype)
        batch = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (batch,))
        emb = Embedding(
            4 * self.ch,
            self.ch,
            self.num_classes,
            self.cond_dim,
            self.cond_combine,
            dtype,
            self.label_init_std,
            self.interval_input,
            name="embed",
        )(t, cond, h)

        def res(out_ch, name, resample=None):
            return ResBlock(
                out_ch,
                self.dropout,
                self.use_scale_shift_norm,
                resample,
                self.norm_groups,
                dtype,
                name=name,
            )

        def attn(name):
            return AttentionBlock(self.num_heads, self.head_channels, self.norm_groups, dtype, name=name)

        h = Conv(self.ch, (3, 3), dtype=dtype, name="conv_in")(x.astype(dtype))
        skips = [h]
        levels = len(self.ch_mult)
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res(self.ch * mult, f"down_{level}_res_{i}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"down_{level}_attn_{i}")(h)
                skips.append(h)
            if level != levels - 1:
                if self.resblock_updown:
                    h = res(h.shape[-1], f"down_{level}_resample", "down")(h, emb, train)
                else:
                    h = Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=dtype, name=f"down_{level}_resample")(h)
                skips.append(h)

        h = res(h.shape[-1], "mid_res_0")(h, emb, train)
        h = attn("mid_attn")(h)
        h = res(h.shape[-1], "mid_res_1")(h, emb, train)

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(self.ch * mult, f"up_{level}_res_{i}")(h, emb, train)
                if h.shape[1] in self.attn_resolutions:
                    h = attn(f"up_{level}_attn_{i}")(h)
            if level != 0:
                if self.resblock_updown:
                    h = res(h.shape[-1], f"up_{level}_resample", "up")(h, emb, train)
                else:
                    h = Conv(h.shape[-1], (3, 3), dtype=dtype, name=f"up_{level}_resample")(
                        upsample_nearest(h)
                    )
        assert not skips

        h = nn.silu(GroupNorm(self.norm_groups, dtype=dtype, name="norm_out")(h))
        out_ch = self.in_channels * (2 if self.learn_sigma else 1)
        h = Conv(out_ch, (3, 3), init_scale=0.0, dtype=dtype, name="conv_out")(h)
        return h.astype(jnp.float32)
