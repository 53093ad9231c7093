"""Per-kernel speed of diffusion_jax.ops: reference (lax + autodiff), fast (pure-XLA
custom VJPs) and native (oneDNN / C++ custom calls).

For every convolution shape of the default MNIST UNet (batch 128) it times,
in interleaved rounds (medians), the forward pass and the whole forward +
backward (value and gradients wrt x and kernel) of each implementation, and
prints GFLOP/s (2 * N * Ho * Wo * kh * kw * C * O per convolution, i.e. per
forward, per input gradient and per weight gradient). For GroupNorm it prints
milliseconds of the forward pass and of forward + backward; likewise for the
default DiT's dense layers and attention (GFLOP/s) and its adaLN, GELU and
gated residual (milliseconds). The process
starts with `diffusion_jax.ops.allocator.keep_freed_memory()`, as launch.py.

    .venv/bin/python bench/bench_ops.py                 # all shapes, batch 128
    .venv/bin/python bench/bench_ops.py --batch 64 --rounds 5 --only conv
    .venv/bin/python bench/bench_ops.py --only dit
"""

from __future__ import annotations

import argparse
import os
import time

from diffusion_jax.ops import allocator

allocator.keep_freed_memory()  # before JAX starts its threads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import ops  # noqa: E402

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
# The default DiT (28x28, patch 2: 196 tokens, width 256, 4 heads, MLP 1024): dense (in, out).
DENSE_SHAPES = [(256, 768), (256, 256), (256, 1024), (1024, 256)]


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


IMPLS = ("reference", "fast", "native")


def _time_impls(op: str, call, x, params: tuple, dy, rounds: int) -> dict[str, float]:
    """Median seconds of forward (f_<impl>) and forward+backward (fb_<impl>) of ops.<op>_<impl>.

    `call(impl, x, *params)` applies one implementation; the backward pass is
    the VJP wrt x and every parameter, for output gradient dy.
    """
    def pair(impl):
        def fwd(x, dy):
            return call(impl, x, *params)

        def fb(x, dy):
            y, vjp = jax.vjp(lambda *a: call(impl, *a), x, *params)
            return y, vjp(dy)

        return jax.jit(fwd), jax.jit(fb)

    fns = {}
    for i in IMPLS:
        fns[f"f_{i}"], fns[f"fb_{i}"] = pair(ops.implementation(op, i))
    return _interleaved(fns, (x, dy), rounds)


def _header(width: int) -> str:
    return (f"{'shape':{width}s} " + " ".join(f"{'fwd ' + i[:3]:>8s}" for i in IMPLS) + " | "
            + " ".join(f"{'f+b ' + i[:3]:>8s}" for i in IMPLS) + f" | {'nat/ref':>7s}")


def _row(name: str, width: int, t: dict[str, float], fwd_value, fb_value) -> str:
    """One line: fwd_value(seconds) and fb_value(seconds) per implementation, then the speed-up."""
    return (f"{name:{width}s} " + " ".join(f"{fwd_value(t[f'f_{i}']):8.1f}" for i in IMPLS) + " | "
            + " ".join(f"{fb_value(t[f'fb_{i}']):8.1f}" for i in IMPLS)
            + f" | {t['fb_reference'] / t['fb_native']:7.2f}")


def bench_conv(batch: int, rounds: int) -> None:
    print(f"conv2d, batch {batch}: GFLOP/s (median of {rounds}) of forward, forward+backward (forward, dx, dW)")
    print(_header(24))
    for h, c, o, k, s in CONV_SHAPES:
        kx, kk, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (batch, h, h, c))
        kernel = jax.random.normal(kk, (k, k, c, o))
        ho = -(-h // s)
        dy = jax.random.normal(kg, (batch, ho, ho, o))
        flop = 2 * batch * ho * ho * k * k * c * o / 1e9
        t = _time_impls("conv2d", lambda impl, x, w: impl(x, w, strides=(s, s)), x, (kernel,), dy, rounds)
        print(_row(f"{h}x{h}x{c}->{o} {k}x{k} s{s}", 24, t, lambda sec: flop / sec, lambda sec: 3 * flop / sec),
              flush=True)


def bench_group_norm(batch: int, rounds: int) -> None:
    print(f"\ngroup_norm (32 groups), batch {batch}: milliseconds (median of {rounds})")
    print(_header(16))
    for h, c in GN_SHAPES:
        kx, kg = jax.random.split(jax.random.key(1))
        x = jax.random.normal(kx, (batch, h, h, c))
        dy = jax.random.normal(kg, x.shape)
        params = (jnp.ones((c,)), jnp.zeros((c,)))
        t = _time_impls("group_norm", lambda impl, x, s, b: impl(x, s, b, num_groups=32), x, params, dy, rounds)
        print(_row(f"{h}x{h}x{c}", 16, t, lambda sec: 1e3 * sec, lambda sec: 1e3 * sec), flush=True)


def bench_dit(batch: int, rounds: int) -> None:
    """The DiT's dense layers and attention in GFLOP/s; its adaLN, GELU and gated residual in milliseconds."""
    n, d, heads = 196, 256, 4
    keys = iter(jax.random.split(jax.random.key(2), 32))
    print(f"\nDiT ops, batch {batch} x {n} tokens: dense and attention GFLOP/s; adaLN, GELU, gated residual ms "
          f"(median of {rounds})")
    print(_header(24))
    for k, o in DENSE_SHAPES:
        x = jax.random.normal(next(keys), (batch, n, k))
        params = (jax.random.normal(next(keys), (k, o)), jnp.zeros((o,)))
        dy = jax.random.normal(next(keys), (batch, n, o))
        flop = 2 * batch * n * k * o / 1e9
        t = _time_impls("dense", lambda impl, x, w, b: impl(x, w, b), x, params, dy, rounds)
        print(_row(f"dense {k}->{o}", 24, t, lambda sec: flop / sec, lambda sec: 3 * flop / sec), flush=True)
    qkv = jax.random.normal(next(keys), (batch, n, 3 * d))
    dy = jax.random.normal(next(keys), (batch, n, d))
    flop = 4 * batch * n * n * d / 1e9  # q k^T and p v
    t = _time_impls("self_attention", lambda impl, a: impl(a, heads), qkv, (), dy, rounds)
    print(_row(f"attention {heads}x{d // heads}", 24, t, lambda sec: flop / sec, lambda sec: 3 * flop / sec),
          flush=True)
    x = jax.random.normal(next(keys), (batch, n, d))
    mod = (jax.random.normal(next(keys), (batch, d)), jax.random.normal(next(keys), (batch, d)))
    t = _time_impls("adaptive_layer_norm", lambda impl, x, a, b: impl(x, a, b), x, mod, x, rounds)
    print(_row(f"adaLN {n}x{d}", 24, t, lambda sec: 1e3 * sec, lambda sec: 1e3 * sec), flush=True)
    h = jax.random.normal(next(keys), (batch, n, 4 * d))
    t = _time_impls("gelu", lambda impl, x: impl(x), h, (), h, rounds)
    print(_row(f"gelu {n}x{4 * d}", 24, t, lambda sec: 1e3 * sec, lambda sec: 1e3 * sec), flush=True)
    gate, branch = jax.random.normal(next(keys), (batch, d)), jax.random.normal(next(keys), (batch, n, d))
    t = _time_impls("gated_residual", lambda impl, x, g, h: impl(x, g, h), x, (gate, branch), x, rounds)
    print(_row(f"gated residual {n}x{d}", 24, t, lambda sec: 1e3 * sec, lambda sec: 1e3 * sec), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=("conv", "group_norm", "dit"), default=None)
    args = parser.parse_args()
    ops.native.available()  # build the native kernels before any trace
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.1f}, jax {jax.__version__} ({jax.default_backend()})")
    if args.only in (None, "conv"):
        bench_conv(args.batch, args.rounds)
    if args.only in (None, "group_norm"):
        bench_group_norm(args.batch, args.rounds)
    if args.only in (None, "dit"):
        bench_dit(args.batch, args.rounds)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
