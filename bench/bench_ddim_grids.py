"""DDIM's default grid against diffusers' and the former default on more data laws.

bench_samplers.py and tests/test_samplers.py hold DDIM's default grid ("cosine_half") to
diffusers' DDIMScheduler grid ("leading", set_alpha_to_one) on three data laws. This script
adds laws they do not use (unit-variance, offset, very narrow, other mixtures) and step
counts (15, 30) on the discrete DDPM process with linear and cosine schedules, and prints
the W2 error of DDIM (eta = 0, exact data prediction, the prior's 4096 quantile points) on
"cosine_half", on the former default "cosine" and on diffusers' grid, with the ratios.

Run: python bench/bench_ddim_grids.py [--steps 10,15,20,30,50]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import oracles, processes, samplers, schedules

G = oracles.GaussianMixture
LAWS = {
    "broad N(0.3, 0.5^2)": G((1.0,), (0.3,), (0.5,)),
    "sharp N(0.3, 0.1^2)": G((1.0,), (0.3,), (0.1,)),
    "mixture (test)": G((0.5, 0.5), (-0.5, 0.5), (0.1, 0.5)),
    "N(0, 1)": G((1.0,), (0.0,), (1.0,)),
    "N(-0.2, 0.3^2)": G((1.0,), (-0.2,), (0.3,)),
    "N(0.8, 0.2^2)": G((1.0,), (0.8,), (0.2,)),
    "N(0, 0.05^2)": G((1.0,), (0.0,), (0.05,)),
    ".3 N(-1, .2^2) + .7 N(.8, .3^2)": G((0.3, 0.7), (-1.0, 0.8), (0.2, 0.3)),
    ".8 N(.6, .3^2) + .2 N(-.6, .1^2)": G((0.8, 0.2), (0.6, -0.6), (0.3, 0.1)),
    "3 modes (-.7, 0, .6; std .05, .2, .1)": G((0.2, 0.5, 0.3), (-0.7, 0.0, 0.6), (0.05, 0.2, 0.1)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="10,15,20,30,50")
    args = parser.parse_args()
    probs, z = oracles.prior_quantile_points(4096)
    x_T = jnp.asarray(z, jnp.float32).reshape(-1, 1)
    start = time.time()
    print("| schedule | N | data | cosine_half | cosine | diffusers | / diffusers | / cosine |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for schedule in ("linear", "cosine"):
        p = processes.DDPM(schedules.make(schedule, num_timesteps=1000))
        for n in (int(v) for v in args.steps.split(",")):
            sampler = samplers.make("ddim", num_steps=n)
            run = jax.jit(lambda law, ts: sampler(law.denoiser(p), p, x_T, None, ts=ts))
            grids = (samplers.time_grid(p, n, "cosine_half"), samplers.time_grid(p, n, "cosine"),
                     oracles.diffusers_grid("ddim", p.num_timesteps, n))
            for name, law in LAWS.items():
                arrays = G(*(jnp.asarray(v, jnp.float32) for v in law))
                ours, cos, theirs = (oracles.transport_error(np.asarray(run(arrays, jnp.asarray(ts))), law, probs)
                                     for ts in grids)
                ratios.append((ours / theirs, ours / cos))
                print(f"| {schedule} | {n} | {name} | {ours:.3e} | {cos:.3e} | {theirs:.3e} | "
                      f"{ours / theirs:.3f} | {ours / cos:.3f} |", flush=True)
    r = np.array(ratios)
    print(f"cosine_half / diffusers: max {r[:, 0].max():.3f}, wins {int((r[:, 0] <= 1).sum())} of {len(r)}; "
          f"/ cosine: max {r[:, 1].max():.3f}, geometric mean {np.exp(np.log(r[:, 1]).mean()):.3f} "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
