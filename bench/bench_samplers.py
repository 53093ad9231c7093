"""Sampler accuracy against exact denoisers, for every process x sampler x NFE.

Data (per dimension): broad N(0.3, 0.5^2), sharp N(0.3, 0.1^2) and the two-mode mixture
0.5 N(-0.5, 0.1^2) + 0.5 N(0.5, 0.5^2). The model is the exact data prediction
E[x0 | x_t] (`diffusion_jax.oracles`), so every error is the sampler's own: the W2 distance
between the law of its outputs and the data law (deterministic samplers: outputs of the
prior's 4096 quantile points, since the probability-flow ODE is monotone in 1-D;
stochastic ones: 65536 random draws, whose Monte-Carlo floor is about 0.002).

Rows "diffusers-ddim" and "diffusers-dpm" replay, on the ddpm processes, the grids that
diffusers' DDIMScheduler ("leading", set_alpha_to_one) and DPMSolverMultistepScheduler
("linspace" over N + 1 points without t = 0, final sigma 0, first-order last step) use by
default, with this package's DDIM and DPM-Solver++(2M).

Run: python bench/bench_samplers.py [--nfe 5,10,20,50] [--markdown]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import oracles, processes, samplers, schedules

DATA = {
    "broad": oracles.GaussianMixture((0.5, 0.5), (0.3, 0.3), (0.5, 0.5)),
    "sharp": oracles.GaussianMixture((0.5, 0.5), (0.3, 0.3), (0.1, 0.1)),
    "mixture": oracles.GaussianMixture((0.5, 0.5), (-0.5, 0.5), (0.1, 0.5)),
}
PROCESSES = {
    "ddpm-linear": lambda: processes.DDPM(schedules.linear(1000)),
    "ddpm-cosine": lambda: processes.DDPM(schedules.cosine(1000)),
    "vp-linear": lambda: processes.VP("linear"),
    "vp-cosine": lambda: processes.VP("cosine"),
    "edm": lambda: processes.EDM(),
    "flow": lambda: processes.Flow(),
}
STOCHASTIC = ("ddpm", "edm_sde")


def errors(process, sampler, ts, num: int, key) -> dict[str, float]:
    """W2 error on each data law for one compiled sampler."""
    stochastic = sampler.name in STOCHASTIC
    if stochastic:
        p = (np.arange(num) + 0.5) / num
        x_T = process.prior_std * jax.random.normal(key, (num, 1, 1, 1), jnp.float32)
    else:
        p, z = oracles.prior_quantile_points(num)
        x_T = jnp.asarray(process.prior_std * z, jnp.float32).reshape(num, 1, 1, 1)

    @jax.jit
    def run(data, x_T, key):
        return sampler(data.denoiser(process), process, x_T, key, ts=ts)

    out = {}
    for name, law in DATA.items():
        arrays = oracles.GaussianMixture(*(jnp.asarray(v, jnp.float32) for v in law))
        x = run(arrays, x_T, jax.random.fold_in(key, 1))
        out[name] = oracles.transport_error(np.asarray(x), law, p)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nfe", default="5,10,20,50")
    parser.add_argument("--processes", default=",".join(PROCESSES))
    parser.add_argument("--samplers", default=",".join(samplers.NAMES))
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    nfes = [int(v) for v in args.nfe.split(",")]
    key = jax.random.PRNGKey(0)
    start = time.time()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; W2 error of the output law")
    print("| process | sampler | grid | NFE | " + " | ".join(DATA) + " |")
    print("|---|---|---|---|" + "---|" * len(DATA))
    for pname in args.processes.split(","):
        process = PROCESSES[pname]()
        names = args.samplers.split(",")
        if process.discrete:
            names += ["diffusers-ddim", "diffusers-dpm"]
        for sname in names:
            for nfe in nfes:
                if sname.startswith("diffusers"):
                    method = "ddim" if sname.endswith("ddim") else "dpm_solver_pp"
                    sampler = samplers.make(method, num_steps=nfe)
                    ts, grid = oracles.diffusers_grid(method, process.num_timesteps, nfe), "diffusers"
                else:
                    sampler = samplers.make(sname).with_nfe(process, nfe)
                    ts, grid = sampler.times(process), sampler.grid or sampler.default_grid
                num = 65536 if sampler.name in STOCHASTIC else 4096
                errs = errors(process, sampler, ts, num, key)
                used = nfe if sname.startswith("diffusers") else sampler.nfe(process)
                print(f"| {pname} | {sname} | {grid} | {used} | "
                      + " | ".join(f"{errs[d]:.2e}" for d in DATA) + " |", flush=True)
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
