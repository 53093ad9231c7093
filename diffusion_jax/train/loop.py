"""The training loop: build, resume, step, log, sample, checkpoint.

    train(config, workdir)

Running it again with the same workdir resumes from the latest checkpoint
(train state and data-iterator position), so the run continues exactly where
it stopped. Outputs under `workdir`:

    config.json            the full experiment config
    checkpoints/<step>/    Orbax checkpoints (last `keep_checkpoints`)
    metrics.jsonl          one JSON line of scalars per log step
    tensorboard/           TensorBoard event files (scalars + sample grids)
    samples/step_<s>.png   EMA sample grids (one row per class if conditional)
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from tqdm import tqdm

from diffusion_jax import models, ops
from diffusion_jax.train import checkpoints, parallel, sampling
from diffusion_jax.train import config as config_lib
from diffusion_jax.train.writers import MetricWriter, save_image_grid
from diffusion_jax.train.state import TrainState, create_train_state, make_optimizer, num_params
from diffusion_jax.train.step import jit_train_step, make_train_step


class NonFiniteError(FloatingPointError):
    """The loss or the gradient norm became NaN or infinite."""


def dataset_info(config: Any) -> tuple[tuple[int, int, int], int]:
    """(image_shape, num_classes) of config.data.dataset."""
    from diffusion_jax import data

    info = data.info(config.data.dataset, data_dir=config.data.data_dir or None,
                     geometry=data.model_geometry(config.model))
    return tuple(info.image_shape), int(info.num_classes)


def make_train_iterator(config: Any):
    """This process's iterator over the training split (global batch size)."""
    tc = config.training
    from diffusion_jax import data

    return data.make_iterator(
        config.data.dataset, "train", batch_size=tc.batch_size, seed=config.seed, shuffle=True,
        random_flip=config.data.random_flip, process_index=jax.process_index(),
        process_count=jax.process_count(), data_dir=config.data.data_dir or None,
        geometry=data.model_geometry(config.model))


def prepare(config: Any) -> None:
    """Multi-host start-up and validation, before any work (idempotent)."""
    parallel.maybe_initialize_distributed(config.parallel)
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count())
    config_lib.check_against_dataset(config, *dataset_info(config))


def _check_finite(step: int, metrics: dict, ckpt: checkpoints.Checkpointer) -> dict:
    host = parallel.to_host(metrics)
    if not host["finite"]:
        raise NonFiniteError(
            f"non-finite training at step {step}: loss={float(host['loss'])}, "
            f"grad_norm={float(host['grad_norm'])}; the update was discarded and not saved; "
            f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")
    return host


def train(config: Any, workdir: str, *,
          step_callback: Callable[[int, TrainState], None] | None = None) -> TrainState:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state.

    `step_callback(step, state)`, if given, runs after every step (after that
    step's checkpoint save was started) on every process.
    """
    prepare(config)
    tc = config.training
    primary = jax.process_index() == 0
    mesh = parallel.make_mesh()
    repl = parallel.replicated(mesh)
    model = models.create(config.model)
    process = sampling.make_process(config)
    tx, lr_schedule = make_optimizer(tc)
    ops.prepare()  # chooses, builds (outside any trace) and logs the kernels once

    ckpt = checkpoints.Checkpointer(workdir, keep=tc.keep_checkpoints,
                                    async_save=tc.async_checkpointing)
    try:
        ckpt.check_model_config(config)  # a clear error before any restore
    except ValueError:
        ckpt.close()
        raise

    key = jax.random.PRNGKey(config.seed)
    init_key, step_key, sample_key = (parallel.replicate(mesh, k) for k in jax.random.split(key, 3))
    init = jax.jit(lambda k: create_train_state(model, config.model, tx, k), out_shardings=repl)
    data_iter = make_train_iterator(config)
    restored = ckpt.restore(checkpoints.abstract_like(jax.eval_shape(init, init_key), repl))
    if restored is None:
        state = init(init_key)
        logging.info("fresh start: %d parameters", num_params(state.params))
    else:
        state, data_state = restored
        data_iter.set_state(data_state)
        logging.info("resumed from step %d in %s", int(state.step), ckpt.directory)
    if primary:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))

    train_step = jit_train_step(make_train_step(config, model, process, tx, lr_schedule), mesh)
    labels, ncol = sampling.grid_labels(config)
    num_grid = len(labels) if labels is not None else ncol * ncol
    sample_fn = sampling.make_sample_fn(config, num_grid, out_sharding=repl)
    grid_labels = None if labels is None else parallel.replicate(mesh, labels)

    writer = MetricWriter(workdir, active=primary)
    start, num_steps = int(parallel.to_host(state.step)), int(tc.num_steps)
    bar = tqdm(total=num_steps, initial=start, disable=not (primary and tc.progress_bar),
               dynamic_ncols=True, mininterval=2.0, desc=config.experiment)
    last_log_step, last_log_time = start, time.perf_counter()
    pending = None  # (step, metrics) dispatched but not yet checked for finiteness
    try:
        for s in range(start + 1, num_steps + 1):  # s: number of updates done after this step
            batch = parallel.global_batch(mesh, next(data_iter))
            state, metrics = train_step(state, batch, step_key)
            if pending is not None:  # check the previous step while this one runs
                _check_finite(*pending, ckpt)
            pending = (s, metrics)
            do_log = s % tc.log_every_steps == 0 or s == num_steps
            do_ckpt = s % tc.checkpoint_every_steps == 0 or s == num_steps
            do_sample = (tc.sample_every_steps > 0 and s % tc.sample_every_steps == 0) or s == num_steps
            if do_log or do_ckpt or do_sample:
                host = _check_finite(*pending, ckpt)
                pending = None
            elif s == start + 1:  # keep the compilation out of images/s
                jax.block_until_ready(metrics)
                last_log_step, last_log_time = s, time.perf_counter()
            if do_log:
                now = time.perf_counter()
                rate = (s - last_log_step) * tc.batch_size / max(now - last_log_time, 1e-9)
                scalars = {k: v for k, v in host.items() if k != "finite"}
                scalars["images_per_sec"] = rate
                writer.write_scalars(s, scalars)
                bar.set_postfix(loss=f"{float(host['loss']):.4f}", img_s=f"{rate:.0f}")
                last_log_step, last_log_time = s, now
            if do_ckpt:
                ckpt.save(s, state, data_iter.get_state(), config)
            if do_sample:
                images = parallel.to_host(sample_fn(state.ema_params, grid_labels, sample_key))
                if primary:
                    grid = save_image_grid(
                        os.path.join(workdir, "samples", f"step_{s:07d}.png"), images, ncol)
                    writer.write_image(s, "samples/ema", grid)
                last_log_time = time.perf_counter()  # keep sampling out of images/s
            bar.update(1)
            if step_callback is not None:
                step_callback(s, state)
        if pending is not None:
            _check_finite(*pending, ckpt)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    return state

