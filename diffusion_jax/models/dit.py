"""Diffusion transformer with adaLN-Zero conditioning (DiT; Peebles & Xie 2023).

Flax Linen, for the same reasons as the UNet (plain parameter pytree).

    tokens = Conv(p x p, stride p)(x) + fixed 2-D sin-cos position embedding   [B, (H/p)(W/p), D]
    c      = Embedding(t, cond)                                                 [B, D]
    depth x DiTBlock:
        shift1, scale1, gate1, shift2, scale2, gate2 = Dense_zero(SiLU(c))
        x = x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)
        x = x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)
    final: shift, scale = Dense_zero(SiLU(c)); Dense_zero(LN(x) * (1 + scale) + shift)
           -> p*p*C_out per token, unpatchified to [B, H, W, C_out].

Two options from U-ViT (Bao et al. 2023), both off by default:

    long_skip: block i < depth//2 hands its output to block depth-1-i, which first
               maps concat(x, skip) back to D tokens with a Dense (Bao et al. 2023,
               Sec. 3.1: without them U-ViT's FID is far worse);
    conv_head: a 3x3 convolution on the unpatchified output (U-ViT's final conv),
               which smooths the seams between patches.

and a convolutional stem, off by default (conv_stem = C_s > 0 channels):

    stem   = ResBlock(Conv3x3(x) -> C_s, c)                 full resolution   [B, H, W, C_s]
    tokens = Conv(p x p, stride p)(stem) + position embedding
    ... the blocks as above; final Dense -> p*p*C_s per token, unpatchified   [B, H, W, C_s]
    out    = Conv3x3_zero(SiLU(GN(ResBlock(unpatchified + stem, c))))       -> C_out

Early convolutions make ViTs optimise faster and more stably than a linear patch embedding
(Xiao et al. 2021); the pixel-level skip from stem to head gives the head the fine detail
that 4x4 patches lose, as the UNet's skips do (simple diffusion's U-ViT keeps convolutions at
high resolution and transformer blocks at low, Hoogeboom et al. 2023). The ResBlocks are the
UNet's, conditioned on the same embedding c. conv_head must then be off (the head ends in a conv).

LN is parameter-free (elementwise_affine off), as in the paper; LN followed
by the modulation is one `ops.adaptive_layer_norm`, attention one
`ops.self_attention` over the packed qkv projection, and each gated residual
one `ops.gated_residual`. Because the
modulation Dense layers and the final Dense start at zero, every block starts
as the identity and the network's initial output is exactly zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import ops
from diffusion_jax.models.embeddings import Embedding
from diffusion_jax.models.layers import Conv, GroupNorm, dense, to_dtype
from diffusion_jax.models.unet import ResBlock

# name -> (hidden_size, depth, num_heads), Table 1 of Peebles & Xie 2023.
DIT_SIZES = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE / DiT style).

    Half the channels encode the row index, half the column index, each with
    the 1-D embedding [sin(pos * f_i), cos(pos * f_i)], f_i = 10000^(-i/(dim/4)).
    """
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D position embedding, got {dim}")
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def one_d(pos):
        a = pos.reshape(-1)[:, None] * freqs[None, :]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([one_d(rows), one_d(cols)], axis=1).astype(np.float32)


class DiTBlock(nn.Module):
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, train: bool) -> jax.Array:
        d = self.hidden_size
        mod = dense(6 * d, self.dtype, init_scale=0.0, name="adaLN")(nn.silu(c))
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(mod, 6, axis=-1)

        h = ops.adaptive_layer_norm(x, shift1, scale1, epsilon=1e-6)
        qkv = dense(3 * d, self.dtype, name="qkv")(h)
        h = ops.self_attention(qkv, self.num_heads)
        h = dense(d, self.dtype, name="attn_out")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        x = ops.gated_residual(x, gate1, h)

        h = ops.adaptive_layer_norm(x, shift2, scale2, epsilon=1e-6)
        h = dense(int(d * self.mlp_ratio), self.dtype, name="mlp_0")(h)
        h = ops.gelu(h)
        h = dense(d, self.dtype, name="mlp_1")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return ops.gated_residual(x, gate2, h)


class DiT(nn.Module):
    """Diffusion transformer. Call: `apply(variables, x [B,H,W,C], t [B], cond=None, train=False, h=None)`;
    t is the noise-level input c_noise of the process (`processes`; for ddpm the integer timestep)."""

    image_size: int = 28
    in_channels: int = 1
    patch_size: int = 2
    hidden_size: int = 256
    depth: int = 6
    num_heads: int = 4
    mlp_ratio: float = 4.0
    freq_dim: int = 256
    dropout: float = 0.0
    num_classes: int = 0
    cond_dim: int = 0
    cond_combine: str = "add"
    label_init_std: float = 0.02
    learn_sigma: bool = False
    long_skip: bool = False
    conv_head: bool = False
    conv_stem: int = 0
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
        b, hh, ww, _ = x.shape
        p, d = self.patch_size, self.hidden_size
        if hh % p or ww % p or hh != ww:
            raise ValueError(f"DiT: image {hh}x{ww} must be square and divisible by patch_size={p}")
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        c = Embedding(d, self.freq_dim, self.num_classes, self.cond_dim, self.cond_combine, dtype,
                      self.label_init_std, self.interval_input, name="embed")(t, cond, h)

        g = hh // p
        x = x.astype(dtype)
        if self.conv_stem:
            stem = Conv(self.conv_stem, (3, 3), dtype=dtype, name="stem_conv")(x)
            x = stem = ResBlock(self.conv_stem, dtype=dtype, name="stem_block")(stem, c, train)
        tokens = Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=dtype, name="patch_embed")(x)
        tokens = tokens.reshape(b, g * g, d) + jnp.asarray(pos_embed_2d(d, g), dtype)
        skips = []
        half = self.depth // 2 if self.long_skip else 0
        for i in range(self.depth):
            if i >= self.depth - half:  # U-ViT: the matching shallow block's output comes back
                tokens = dense(d, dtype, name=f"skip_{i}")(jnp.concatenate([tokens, skips.pop()], axis=-1))
            tokens = DiTBlock(d, self.num_heads, self.mlp_ratio, self.dropout, dtype, name=f"block_{i}")(tokens, c, train)
            if i < half:
                skips.append(tokens)

        shift, scale = jnp.split(dense(2 * d, dtype, init_scale=0.0, name="final_adaLN")(nn.silu(c)), 2, axis=-1)
        tokens = ops.adaptive_layer_norm(tokens, shift, scale, epsilon=1e-6)
        out_ch = self.in_channels * (2 if self.learn_sigma else 1)
        head_ch = self.conv_stem or out_ch
        out = dense(p * p * head_ch, dtype, init_scale=0.0, name="final_linear")(tokens)
        # unpatchify: [B, g*g, p*p*C] -> [B, g, g, p, p, C] -> [B, g*p, g*p, C]
        out = out.reshape(b, g, g, p, p, head_ch).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, head_ch)
        if self.conv_stem:
            out = ResBlock(self.conv_stem, dtype=dtype, name="head_block")(out + stem, c, train)
            out = nn.silu(GroupNorm(32, dtype=dtype, name="head_norm")(out))
            out = Conv(out_ch, (3, 3), init_scale=0.0, dtype=dtype, name="head_conv")(out)
        elif self.conv_head:
            out = Conv(out_ch, (3, 3), dtype=dtype, name="conv_head")(out)
        return out.astype(jnp.float32)
