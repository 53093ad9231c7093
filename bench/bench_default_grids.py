"""Default grids against diffusers' on the DDPM process, with issue #21's wide mixture.

tests/test_samplers.py::test_default_grids_are_at_least_as_accurate_as_diffusers holds DDIM
and DPM-Solver++(2M) on their default grids to the same samplers on diffusers' default grids
(DDIMScheduler: "leading", set_alpha_to_one; DPMSolverMultistepScheduler: "linspace" over
N + 1 points without t = 0, final sigma 0) from the same x_T. This script prints that
comparison as a table, method x steps x data law x schedule (linear, cosine; T = 1000), for
the test's laws (broad N(0.3, 0.5^2), sharp N(0.3, 0.1^2), the two-mode
0.5 N(-0.5, 0.1^2) + 0.5 N(0.5, 0.5^2)) and issue #21's wide mixture
0.7 N(-2, 0.5^2) + 0.3 N(1.5, 0.3^2) (outside [-1, 1]), through two entry points:

  sampler  the sampler object on the prior's 4,096 quantile points (the test's measure);
  sample   `samplers.sample` (the DDPM API: an eps model output) on 16,384 draws from one
           key (issue #21's measure), and diffusers' grid from the x_T that key draws.

Each number is the W2 distance of the outputs to the data law (`oracles.transport_error`);
"ratio" is ours / diffusers' (at most 1: ours at least as accurate).

Run: python bench/bench_default_grids.py [--steps 10,20,50] [--methods ddim,dpm_solver_pp]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import oracles, processes, samplers, schedules

G = oracles.GaussianMixture
LAWS = {
    "broad": oracles.gaussian(0.3, 0.5),
    "sharp": oracles.gaussian(0.3, 0.1),
    "mixture": G((0.5, 0.5), (-0.5, 0.5), (0.1, 0.5)),
    "wide": G((0.7, 0.3), (-2.0, 1.5), (0.5, 0.3)),
}
DRAWS = 16384


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="10,20,50")
    parser.add_argument("--methods", default="ddim,dpm_solver_pp")
    args = parser.parse_args()
    probs, z = oracles.prior_quantile_points(4096)
    x_q = jnp.asarray(z, jnp.float32).reshape(-1, 1)
    key = jax.random.PRNGKey(1)
    x_d = jax.random.normal(jax.random.split(key)[0], (DRAWS, 1), jnp.float32)  # `draw`'s x_T for `key`
    p_d = np.sort(oracles.gaussian(0.0, 1.0).cdf(np.asarray(x_d, np.float64)).ravel())
    start = time.time()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; W2 to the data law, ours / diffusers' grid")
    print("| schedule | method | N | data | sampler: ours | diffusers | ratio | `sample`: ours | diffusers | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = {}
    for schedule in ("linear", "cosine"):
        sch = schedules.make(schedule, num_timesteps=1000)
        p = processes.DDPM(sch)
        for method in args.methods.split(","):
            for n in (int(v) for v in args.steps.split(",")):
                sampler = samplers.make(method, num_steps=n)
                theirs = jnp.asarray(oracles.diffusers_grid(method, p.num_timesteps, n))
                on_grid = jax.jit(lambda law, x, ts: sampler(law.denoiser(p), p, x, None, ts=ts))
                sample = jax.jit(lambda law: samplers.sample(functools.partial(law.eps, p), sch, (DRAWS, 1),
                                                             key, method=method, num_steps=n))
                for name, law in LAWS.items():
                    arrays = G(*(jnp.asarray(v, jnp.float32) for v in law))
                    row = []
                    for ours, x_T, ps in ((on_grid(arrays, x_q, jnp.asarray(sampler.times(p))), x_q, probs),
                                          (sample(arrays), x_d, p_d)):
                        e_ours = oracles.transport_error(np.asarray(ours), law, ps)
                        e_theirs = oracles.transport_error(np.asarray(on_grid(arrays, x_T, theirs)), law, ps)
                        row.append((e_ours, e_theirs))
                    worst[(method, name)] = max(worst.get((method, name), 0.0), *(a / b for a, b in row))
                    print(f"| {schedule} | {method} | {n} | {name} | "
                          + " | ".join(f"{a:.3e} | {b:.3e} | {a / b:.2f}" for a, b in row) + " |", flush=True)
    print("largest ratio: " + ", ".join(f"{m} {d} {r:.2f}" for (m, d), r in worst.items())
          + f" ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
