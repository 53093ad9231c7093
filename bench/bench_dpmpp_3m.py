"""DPM-Solver++(3M) against the probability-flow ODE on EDM's Karras grid (issue #21).

Data 0.7 N(-2, 0.5^2) + 0.3 N(1.5, 0.3^2) with its exact denoiser, the EDM process,
get_sigmas_karras(n, 0.002, 80, rho=7) (`time_grid(EDM(), n, "rho")`), x_T = 80 * the
N(0, 1) quantiles at (i + 1/2) / 2048, float64. Prints mean |x - x_ode| (x_ode: Heun with
4,000 steps) for the published 3M (d2_weight = 1, the default, as k-diffusion's
`sample_dpmpp_3m_sde(eta=0)`), the Taylor-exact 3M (d2_weight = 2, the default before
issue #21) and 2M. Run: python bench/bench_dpmpp_3m.py (about a minute on 2 cores).
"""

import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffusion_jax import oracles, processes, samplers  # noqa: E402

LAW = oracles.GaussianMixture((0.7, 0.3), (-2.0, 1.5), (0.5, 0.3))


def solve(update, process, x, ts):
    """A multistep DPM-Solver++ loop in float64 with `update(x, x0, a, s, a_n, s_n, hist)`."""
    denoise = LAW.denoiser(process)
    hist = []
    for t, t_n in zip(ts[:-1], ts[1:]):
        (a, s), (a_n, s_n) = process.alpha_sigma(jnp.float64(t)), process.alpha_sigma(jnp.float64(t_n))
        x0 = denoise(x, jnp.float64(t)).x0
        full = hist + [(jnp.zeros_like(x), 1.0, 1.0, False)] * 2
        x = update(x, x0, a, s, a_n, s_n, tuple(full[:2]))
        hist = [(x0, a, s, True)] + hist[:1]
    return x


def main():
    p = processes.EDM()
    z = np.sort(np.asarray(jax.scipy.special.ndtri((np.arange(2048) + 0.5) / 2048)))
    x_T = jnp.asarray(80.0 * z, jnp.float64).reshape(-1, 1)
    ode = samplers.make("heun", num_steps=4000)(LAW.denoiser(p), p, x_T, None)
    variants = {
        "3M (d2_weight=1)": functools.partial(samplers.dpmpp_update, order=3, d2_weight=1.0),
        "3M (d2_weight=2)": functools.partial(samplers.dpmpp_update, order=3, d2_weight=2.0),
        "2M": functools.partial(samplers.dpmpp_update, order=2),
    }
    print("steps | " + " | ".join(variants))
    for n in (10, 20, 40, 80, 160):
        ts = samplers.time_grid(p, n, "rho")
        errs = [float(jnp.abs(solve(u, p, x_T, ts) - ode).mean()) for u in variants.values()]
        print(f"{n:5d} | " + " | ".join(f"{e:.3e}" for e in errs), flush=True)


if __name__ == "__main__":
    main()
