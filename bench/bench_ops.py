"""Per-kernel speed of diffusion_jax.ops: reference (lax + autodiff) vs fast (CPU custom VJPs).

For every convolution shape of the default MNIST UNet (batch 128) it times,
in interleaved rounds (medians), the weight gradient alone, and the whole
forward + backward (value and gradients wrt x and kernel) of both paths, and
prints GFLOP/s (2 * N * Ho * Wo * kh * kw * C * O per convolution, i.e. per
forward, per input gradient and per weight gradient). For GroupNorm it prints
milliseconds of the forward pass and of forward + backward.

    .venv/bin/python bench/bench_ops.py                 # all shapes, batch 128
    .venv/bin/python bench/bench_ops.py --batch 64 --rounds 5 --only conv
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import ops
from diffusion_jax.ops.conv import conv2d_weight_grad, explicit_padding

# (H=W, C_in, C_out, k, stride) of the UNet (ch 64, ch_mult (1, 2, 2), 2 res blocks, 28x28x1).
CONV_SHAPES = [
    (28, 64, 64, 3, 1),
    (28, 128, 64, 3, 1),  # up path: concatenated skip
    (28, 128, 128, 3, 1),  # upsampling conv 14 -> 28
    (28, 128, 64, 1, 1),  # 1x1 skip projection
    (28, 1, 64, 3, 1),  # conv_in
    (28, 64, 1, 3, 1),  # conv_out
    (28, 64, 64, 3, 2),  # downsampling 28 -> 14
    (14, 128, 128, 3, 1),
    (14, 256, 128, 3, 1),
    (14, 256, 128, 1, 1),
    (14, 128, 128, 3, 2),  # downsampling 14 -> 7
    (7, 128, 128, 3, 1),
    (7, 256, 128, 3, 1),
]
GN_SHAPES = [(28, 64), (28, 128), (14, 128), (7, 256)]  # (H=W, C), 32 groups


def _interleaved(fns: dict, args: tuple, rounds: int) -> dict[str, float]:
    """Median seconds per call of each jitted function, timed in alternating rounds."""
    for f in fns.values():
        jax.block_until_ready(f(*args))
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in ts.items()}


def bench_conv(batch: int, rounds: int) -> None:
    print(f"conv2d, batch {batch}: GFLOP/s (median of {rounds}); fwd+bwd = forward, dx and dW")
    print(f"{'shape':28s} {'dW ref':>8s} {'dW fast':>8s} {'x':>6s} | {'f+b ref':>8s} {'f+b fast':>8s} {'x':>6s}")
    for h, c, o, k, s in CONV_SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, h, h, c))
        kernel = jax.random.normal(kk, (k, k, c, o))
        ho = -(-h // s)
        dy = jax.random.normal(kg, (batch, ho, ho, o))
        pads = explicit_padding(x.shape, kernel.shape, (s, s), "SAME")
        flop = 2 * batch * ho * ho * k * k * c * o / 1e9

        def dw_ref(x, dy):
            _, vjp = jax.vjp(lambda w: ops.conv2d_reference(x, w, strides=(s, s)), kernel)
            return vjp(dy)[0]

        def dw_fast(x, dy):
            return conv2d_weight_grad(x, dy, kernel.shape, (s, s), pads)

        def fb(impl):
            def f(x, dy):
                y, vjp = jax.vjp(lambda x, w: impl(x, w, strides=(s, s)), x, kernel)
                return y, vjp(dy)

            return f

        t = _interleaved(
            {"dw_ref": jax.jit(dw_ref), "dw_fast": jax.jit(dw_fast),
             "fb_ref": jax.jit(fb(ops.conv2d_reference)), "fb_fast": jax.jit(fb(ops.conv2d_fast))},
            (x, dy), rounds,
        )
        name = f"{h}x{h}x{c}->{o} {k}x{k} s{s}"
        print(f"{name:28s} {flop / t['dw_ref']:8.1f} {flop / t['dw_fast']:8.1f} {t['dw_ref'] / t['dw_fast']:6.2f} | "
              f"{3 * flop / t['fb_ref']:8.1f} {3 * flop / t['fb_fast']:8.1f} {t['fb_ref'] / t['fb_fast']:6.2f}",
              flush=True)


def bench_group_norm(batch: int, rounds: int) -> None:
    print(f"\ngroup_norm (32 groups), batch {batch}: milliseconds (median of {rounds})")
    print(f"{'shape':16s} {'fwd ref':>8s} {'fwd fast':>8s} {'x':>6s} | {'f+b ref':>8s} {'f+b fast':>8s} {'x':>6s}")
    for h, c in GN_SHAPES:
        kx, kg = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, (batch, h, h, c))
        dy = jax.random.normal(kg, x.shape)
        scale, bias = jnp.ones((c,)), jnp.zeros((c,))

        def fwd(impl):
            return lambda x, dy: impl(x, scale, bias, num_groups=32)

        def fb(impl):
            def f(x, dy):
                y, vjp = jax.vjp(lambda x, s, b: impl(x, s, b, num_groups=32), x, scale, bias)
                return y, vjp(dy)

            return f

        t = _interleaved(
            {"f_ref": jax.jit(fwd(ops.group_norm_reference)), "f_fast": jax.jit(fwd(ops.group_norm_fast)),
             "fb_ref": jax.jit(fb(ops.group_norm_reference)), "fb_fast": jax.jit(fb(ops.group_norm_fast))},
            (x, dy), rounds,
        )
        ms = {k: 1e3 * v for k, v in t.items()}
        print(f"{f'{h}x{h}x{c}':16s} {ms['f_ref']:8.1f} {ms['f_fast']:8.1f} {t['f_ref'] / t['f_fast']:6.2f} | "
              f"{ms['fb_ref']:8.1f} {ms['fb_fast']:8.1f} {t['fb_ref'] / t['fb_fast']:6.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("conv", "group_norm"), default=None)
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}, jax {jax.__version__} ({jax.default_backend()})")
    if args.only in (None, "conv"):
        bench_conv(args.batch, args.rounds)
    if args.only in (None, "group_norm"):
        bench_group_norm(args.batch, args.rounds)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
