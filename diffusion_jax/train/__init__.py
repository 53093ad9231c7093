"""Training: validated configs, the data-parallel jit train step, Orbax checkpoints, the loop.

Modules, each one job (the test-only "synthetic" dataset is `diffusion_jax.data.synthetic`):
    config       validate(config, ...) before any work; model-vs-dataset checks
    state        TrainState, optimiser + learning-rate schedule, EMA
    step         the jit train step (state, batch, key) -> (state, metrics)
    parallel     device mesh, batch / replicated shardings, jax.distributed start-up
    checkpoints  Orbax save / resume, data-iterator state, config and version provenance
    preemption   SIGTERM / SIGINT: finish the step, save it, stop (one sync step on all hosts)
    workdir      one trainer per workdir (lock file), restarts.jsonl
    writers      metrics.jsonl, TensorBoard, PNG grids
    sampling     make_denoise_fn, sample grids, `--mode sample`
    loop         train(config, workdir)

For evaluation: `restore_ema_params(config, workdir)` and
`make_denoise_fn(config, params, cond=None, guidance_scale=0.0)`.
"""

from diffusion_jax.train.checkpoints import latest_step, restore_ema_params
from diffusion_jax.train.sampling import make_denoise_fn

__all__ = ["latest_step", "make_denoise_fn", "restore_ema_params"]
