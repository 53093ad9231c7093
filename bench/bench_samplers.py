"""Sampler accuracy vs number of model calls against the analytic Gaussian oracle.

For data x0 ~ N(mu, s^2 I) the exact noise predictor is
    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / (abar_t s^2 + 1 - abar_t),
and the ideal deterministic sampler transports x_T ~ N(0, I) to mu + s x_T. For the
deterministic samplers (ddim with eta = 0, dpm_solver_pp) the output is affine in x_T,
x0 = a x_T + b (a, b read off exactly from any two distinct x_T), and we print
    err = sqrt((a - s)^2 + (b - mu)^2),
the per-dimension W2 distance between the sampled N(b, a^2) and the data N(mu, s^2). Rows "diffusers-*" replay the timestep grids that diffusers'
DDIMScheduler (leading, steps_offset=0, set_alpha_to_one=True) and
DPMSolverMultistepScheduler (linspace over N+1 points without t=0, final sigma 0,
first-order last step) use by default, with this package's step functions.

Run: .venv/bin/python bench/bench_samplers.py   (two data scales: s = 0.1 and s = 0.5)
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import samplers, schedules


def oracle(schedule, mu, s):
    def eps_fn(x_t, t):
        ab = schedule.alphas_cumprod[t].reshape((-1,) + (1,) * (x_t.ndim - 1))
        sq = schedule.sqrt_alphas_cumprod[t].reshape(ab.shape)
        s1m = schedule.sqrt_one_minus_alphas_cumprod[t].reshape(ab.shape)
        return s1m * (x_t - sq * mu) / (ab * s**2 + s1m**2)

    return eps_fn


def err_of(x, x_T, mu, s):
    x, x_T = np.asarray(x, np.float64).ravel(), np.asarray(x_T, np.float64).ravel()
    a = np.cov(x, x_T)[0, 1] / np.var(x_T, ddof=1)
    b = x.mean() - a * x_T.mean()
    return float(np.hypot(a - s, b - mu))


def run_grid(method, schedule, eps_fn, ts, x_T):
    """Explicit loop over a given timestep grid with the public step functions."""
    x = x_T
    prev = np.concatenate([ts[1:], [-1]])
    prev_x0, prev_t = None, None
    for t, tp in zip(ts, prev):
        tb = jnp.full((x.shape[0],), int(t), jnp.int32)
        out = eps_fn(x, tb)
        if method == "ddim":
            x = samplers.ddim_step(schedule, x, tb, int(tp), out)
        else:
            x, x0 = samplers.dpm_solver_pp_step(schedule, x, tb, int(tp), out,
                                                prev_x0=prev_x0, prev_t=prev_t)
            prev_x0, prev_t = x0, tb
    return x


def diffusers_grid(method, T, n):
    if method == "ddim":
        return (np.arange(n) * (T // n))[::-1]
    return np.round(np.linspace(0, T - 1, n + 1))[::-1][:-1].astype(np.int64)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="0.5,0.1;0.3,0.5", help="mu,s pairs separated by ';'")
    args = p.parse_args()
    for pair in args.data.split(";"):
        mu, s = (float(v) for v in pair.split(","))
        bench(mu, s)


def bench(mu, s):
    shape = (64, 1)
    key = jax.random.PRNGKey(0)
    print(f"\n=== Gaussian oracle mu={mu} s={s}; err = W2(samples, data) per dim (lower is better)")
    for sched_name in ("linear", "cosine"):
        sch = schedules.make(sched_name)
        eps_fn = oracle(sch, mu, s)
        x, traj = sample_jit(eps_fn, sch, shape, key, "ddim", sch.num_timesteps, "linspace")
        print(f"\n[{sched_name}] ddim with all T=1000 steps: {err_of(x, traj[0], mu, s):.2e}")
        print(f"{'method':<16}{'spacing':<20}" + "".join(f"{n:>11}" for n in (10, 20, 50)))
        for method in ("ddim", "dpm_solver_pp"):
            for spacing in samplers.SPACINGS:
                errs = []
                for n in (10, 20, 50):
                    x, traj = sample_jit(eps_fn, sch, shape, key, method, n, spacing)
                    errs.append(err_of(x, traj[0], mu, s))
                print(f"{method:<16}{spacing:<20}" + "".join(f"{e:>11.2e}" for e in errs))
            errs = []
            for n in (10, 20, 50):
                x_T = jax.random.normal(key, shape)
                x = run_grid(method, sch, eps_fn, diffusers_grid(method, sch.num_timesteps, n), x_T)
                errs.append(err_of(x, x_T, mu, s))
            print(f"{method:<16}{'diffusers-default':<20}" + "".join(f"{e:>11.2e}" for e in errs))


def sample_jit(eps_fn, sch, shape, key, method, n, spacing):
    f = jax.jit(lambda k: samplers.sample(eps_fn, sch, shape, k, method=method, num_steps=n,
                                          timestep_spacing=spacing, return_trajectory=True))
    return f(key)


if __name__ == "__main__":
    main()
