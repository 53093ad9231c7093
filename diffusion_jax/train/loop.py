"""The training loop: build, resume, step, log, sample, checkpoint.

    train(config, workdir)

Running it again with the same workdir resumes from the newest checkpoint
that restores (train state and data-iterator position), so the run continues
exactly where it stopped; a config that changed in a field that changes what
the network learns or how stops it first (`checkpoints.check_config`). SIGTERM
or SIGINT finishes the current step, saves it and returns (`preemption`).
Outputs under `workdir`:

    config.json            the experiment config of the first start
    restarts.jsonl         one line per start (fresh or resumed, versions, accepted changes)
    lock                   pid and host of the trainer running in it (`workdir`)
    checkpoints/<step>/    Orbax checkpoints (last `keep_checkpoints`)
    metrics.jsonl          one JSON line of scalars per log step (each step once)
    tensorboard/           TensorBoard event files (scalars + sample grids)
    samples/step_<s>.png   EMA sample grids (one row per class if conditional)
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from diffusion_jax import models, ops
from diffusion_jax.train import checkpoints, parallel, preemption, sampling, workdir as workdir_lib
from diffusion_jax.train import config as config_lib
from diffusion_jax.train.writers import MetricWriter, save_image_grid
from diffusion_jax.train.state import TrainState, create_train_state, make_optimizer, num_params
from diffusion_jax.train.step import jit_train_step, make_train_step


class NonFiniteError(FloatingPointError):
    """The loss, the gradient norm or an updated parameter became NaN or infinite."""


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
        geometry=data.model_geometry(config.model), loader=config.data.get("loader", "numpy"),
        num_workers=config.data.get("num_workers", 0), source=config.data.get("source", "decoded"))


def prepare(config: Any, *, training: bool = True) -> None:
    """Multi-host start-up and validation, before any work (idempotent); `training=False`
    for --mode sample / eval (no FSDP mesh check, `config_lib.validate`)."""
    parallel.maybe_initialize_distributed(config.parallel)
    config_lib.validate(config, num_devices=jax.device_count(), process_count=jax.process_count(),
                        training=training)
    config_lib.check_against_dataset(config, *dataset_info(config))
    sampling.parse_labels(config, 1)  # config.sample.labels, before any restore


def _check_finite(step: int, metrics: dict, ckpt: checkpoints.Checkpointer) -> dict:
    host = parallel.to_host(metrics)
    if not host["finite"]:
        raise NonFiniteError(
            f"non-finite training at step {step}: loss={float(host['loss'])}, "
            f"grad_norm={float(host['grad_norm'])} (or a non-finite updated parameter); "
            f"the update was discarded and not saved; "
            f"last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}")
    return host


def train(config: Any, workdir: str, *,
          step_callback: Callable[[int, TrainState], None] | None = None,
          allow_config_change: bool = False) -> TrainState:
    """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the final state
    (the state of the step it stopped at after SIGTERM / SIGINT).

    `step_callback(step, state)`, if given, runs after every step (after that
    step's checkpoint save was started) on every process. `allow_config_change`
    resumes although the config changed in a field that changes training (the
    changes are logged; a new optimiser's state starts from zero).
    """
    prepare(config)
    lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
    if lock is not None:
        lock.acquire()  # WorkdirBusyError when another trainer runs in workdir
    try:
        if lock is not None:
            checkpoints.remove_interrupted_saves(workdir)
        with preemption.Preemption(distributed=jax.process_count() > 1) as stop:
            return _train(config, workdir, step_callback, allow_config_change, stop)
    finally:
        if lock is not None:
            lock.release()


def _resume(config, workdir, ckpt, init, init_key, tx, shardings,
            allow_config_change) -> tuple[TrainState, dict | None]:
    """(state, data-iterator state or None): the checkpoint's, or a fresh state; records the start.
    The checkpoint is read straight onto `shardings` (this run's mesh), whatever mesh wrote it."""
    abstract = checkpoints.abstract_like(jax.eval_shape(init, init_key), shardings)
    restored = ckpt.resume(abstract, config=config, allow_config_change=allow_config_change)
    primary = jax.process_index() == 0
    if primary:
        os.makedirs(workdir, exist_ok=True)
        if not os.path.exists(os.path.join(workdir, "config.json")):  # keeps the first start's
            with open(os.path.join(workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2))
    if restored is None:
        state = init(init_key)
        logging.info("fresh start: %d parameters", num_params(state.params))
        if primary:
            workdir_lib.log_start(workdir, {"resumed_from": None, "versions": checkpoints.versions()})
        return state, None
    for change in restored.changes:
        logging.warning("config changed since checkpoint %d, continuing as asked (allow_config_change): %s",
                        restored.step, change)
    if restored.opt_state_reset:
        parts = restored.state
        state = jax.jit(lambda p: TrainState(step=p["step"], params=p["params"], ema_params=p["ema_params"],
                                             opt_state=tx.init(p["params"])), out_shardings=shardings)(parts)
        logging.warning("the optimiser state of checkpoint %d does not fit the changed config.training: "
                        "it starts again from zero (parameters and EMA restored)", restored.step)
    else:
        state = restored.state
    saved_versions = ckpt.saved_versions(restored.step)
    now = checkpoints.versions()
    if saved_versions is not None and saved_versions != now:
        logging.warning("checkpoint %d was written with %s; running %s", restored.step, saved_versions, now)
    logging.info("resumed from step %d in %s", int(parallel.to_host(state.step)), ckpt.directory)
    if primary:
        workdir_lib.log_start(workdir, {
            "resumed_from": restored.step, "versions": now, "checkpoint_versions": saved_versions,
            "config_changes": [str(c) for c in restored.changes],
            "optimizer_state_reset": restored.opt_state_reset})
    return state, restored.data_state


def _train(config, workdir, step_callback, allow_config_change, stop) -> TrainState:
    tc = config.training
    primary = jax.process_index() == 0
    mesh = parallel.make_mesh(fsdp=config.parallel.fsdp)
    repl = parallel.replicated_sharding(mesh)
    model = models.create(config.model)
    process = sampling.make_process(config)
    tx, lr_schedule = make_optimizer(tc)

    ckpt = checkpoints.Checkpointer(workdir, keep=tc.keep_checkpoints,
                                    async_save=tc.async_checkpointing)
    writer = bar = data_iter = None
    try:
        # The kernels (a C++ compiler in a subprocess on a fresh machine) build while this thread
        # prepares the data (a download and tfds' writer on a fresh machine); nothing is traced
        # before both are done, so every trace sees the chosen kernels.
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ops-prepare") as pool:
            chosen = pool.submit(ops.prepare)  # chooses, builds and logs the kernels once
            data_iter = make_train_iterator(config)
        chosen.result()  # the kernels' own error, if choosing them failed
        key = jax.random.PRNGKey(config.seed)
        init_key, step_key, sample_key = (parallel.replicate_array(mesh, k) for k in jax.random.split(key, 3))
        create = lambda k: create_train_state(model, config.model, tx, k)  # noqa: E731
        shardings = parallel.state_sharding(mesh, jax.eval_shape(create, init_key))
        init = jax.jit(create, out_shardings=shardings)
        state, data_state = _resume(config, workdir, ckpt, init, init_key, tx, shardings, allow_config_change)
        if data_state is not None:
            data_iter.set_state(data_state)

        train_step = jit_train_step(make_train_step(config, model, process, tx, lr_schedule), mesh, shardings)
        labels, ncol = sampling.grid_labels(config)
        num_grid = len(labels) if labels is not None else ncol * ncol
        sample_fn = sampling.make_sample_fn(config, num_grid, out_sharding=repl)
        grid_labels = None if labels is None else parallel.replicate_array(mesh, labels)

        start, num_steps = int(parallel.to_host(state.step)), int(tc.num_steps)
        writer = MetricWriter(workdir, active=primary, start_step=start)
        bar = tqdm(total=num_steps, initial=start, disable=not (primary and tc.progress_bar),
                   dynamic_ncols=True, mininterval=2.0, desc=config.experiment)
        last_log_step, last_log_time = start, time.perf_counter()
        pending = None  # (step, metrics) dispatched but not yet checked for finiteness
        for s in range(start + 1, num_steps + 1):  # s: number of updates done after this step
            batch = parallel.global_batch(mesh, next(data_iter))
            state, metrics = train_step(state, batch, step_key)
            ckpt.check_for_errors()  # a failed background save stops the run here, not at the next save
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
                logging.info("checkpoint %d saving to %s (loss %.4f)", s, ckpt.directory, float(host["loss"]))
            if do_sample:
                images = parallel.to_host(sample_fn(state.ema_params, grid_labels, sample_key))
                if primary and not np.isfinite(images).all():
                    logging.warning("sample grid of step %d has non-finite values: not written", s)
                elif primary:
                    path = os.path.join(workdir, "samples", f"step_{s:07d}.png")
                    grid = save_image_grid(path, images, ncol)
                    writer.write_image(s, "samples/ema", grid)
                    logging.info("samples of step %d written to %s", s, path)
                last_log_time = time.perf_counter()  # keep sampling out of images/s
            bar.update(1)
            if step_callback is not None:
                step_callback(s, state)
            if s < num_steps and stop.reached(s):
                if pending is not None:
                    _check_finite(*pending, ckpt)
                    pending = None
                if not do_ckpt:
                    ckpt.save(s, state, data_iter.get_state(), config)
                ckpt.wait()  # committed (or the save's error raised) before we say so
                logging.warning("%s: stopped after step %d of %d; checkpoint %d is saved in %s; "
                                "run the same command again to resume from it",
                                stop.signal_name, s, num_steps, s, ckpt.directory)
                break
        if pending is not None:
            _check_finite(*pending, ckpt)
        ckpt.wait()
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        if hasattr(data_iter, "close"):  # grain's worker processes
            data_iter.close()
        ckpt.close()
    return state
