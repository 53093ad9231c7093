"""Validation of an experiment config before any work starts.

`validate(config, num_devices, process_count)` raises a one-line ValueError
naming the config field and what is allowed: unknown names (model, schedule,
sampler, dataset, prediction target, ...), out-of-range values, an image size
the UNet's levels cannot halve (via `models.validate`), a global batch that
does not divide over the devices, an FSDP size (parallel.fsdp) that does not.
"""

from __future__ import annotations

import math
from typing import Any

from diffusion_jax.train.state import LR_SCHEDULES, OPTIMIZERS


def _fail(field: str, allowed: str, value: Any) -> ValueError:
    return ValueError(f"config.{field} must be {allowed}, got {value!r}")


def _one_of(config: Any, field: str, names: tuple) -> None:
    value = _get(config, field)
    if value not in names:
        raise _fail(field, f"one of {tuple(names)}", value)


def _get(config: Any, field: str) -> Any:
    value = config
    for part in field.split("."):
        value = value[part]
    return value


def _in_range(config: Any, field: str, lo: float | None, hi: float | None, *, integer: bool = False,
              lo_open: bool = False, hi_open: bool = False) -> None:
    """`field` must be a number (an integer if `integer`) within the bounds, and
    finite: NaN fails every comparison and inf is never a meaningful setting,
    so both are refused even where there is no upper bound."""
    value = _get(config, field)
    kind = "an integer" if integer else "a number"
    lo_txt = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
    hi_txt = " < inf" if hi is None and not integer else "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
    allowed = f"{kind} with {lo_txt}{field.split('.')[-1]}{hi_txt}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise _fail(field, allowed, value)
    if not math.isfinite(value):
        raise _fail(field, allowed, value)
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise _fail(field, allowed, value)
    if hi is not None and (value >= hi if hi_open else value > hi):
        raise _fail(field, allowed, value)


def _bool(config: Any, field: str) -> None:
    value = _get(config, field)
    if not isinstance(value, bool):
        raise _fail(field, "True or False", value)


def validate(config: Any, *, num_devices: int = 1, process_count: int = 1, training: bool = True) -> None:
    """Raises ValueError on the first bad field; returns None for a good config.
    `training=False` (--mode sample / eval) skips the FSDP mesh check: those modes
    read the EMA onto whatever devices they have."""
    from diffusion_jax import data, models, objectives, samplers

    if not isinstance(config.experiment, str) or not config.experiment.strip():
        raise _fail("experiment", "a non-empty name", config.experiment)
    _in_range(config, "seed", 0, None, integer=True)

    # Data.
    try:
        data.check_name(config.data.dataset)
    except ValueError as e:
        raise ValueError(f"config.data.dataset: {e} (or one of {tuple(data.GENERATED)}, drawn in memory)") from None
    _bool(config, "data.random_flip")
    _one_of(config, "data.loader", data.LOADERS)
    _one_of(config, "data.source", data.SOURCES)
    if config.data.source == "records" and config.data.loader != "grain":
        raise ValueError("config.data.source 'records' is read through grain only: set config.data.loader = "
                         f"'grain' (or config.data.source = 'decoded'), got loader {config.data.loader!r}")
    _in_range(config, "data.num_workers", 0, None, integer=True)

    # Model: names first, then the model workstream's own field checks
    # (image size divisible by the UNet's levels / the DiT's patch, widths, ...).
    _one_of(config, "model.name", tuple(models.NAMES))
    try:
        models.validate(config.model)
    except ValueError as e:
        raise ValueError(f"config.model: {e}") from None
    if config.model.cond_dim > 0:
        raise _fail("model.cond_dim", "0 for training (no dataset provides text embeddings)",
                    config.model.cond_dim)

    # Diffusion process and loss ("" = the process's own, filled in here: `resolve`).
    process = resolve(config)
    for field, names in (("prediction", process.predictions),
                         ("loss_weighting", objectives.weighting_names(process))):
        if config.diffusion[field] not in names:
            raise _fail(f"diffusion.{field}", f"one of {tuple(names)} for process {process.name!r}",
                        config.diffusion[field])
    _flow_map(config, process)
    _in_range(config, "diffusion.min_snr_gamma", 0, None, lo_open=True)
    _in_range(config, "diffusion.vlb_weight", 0, None)
    learned = config.diffusion.variance == "learned_range"
    if learned != bool(config.model.learn_sigma):
        raise _fail("diffusion.variance",
                    "'learned_range' exactly when model.learn_sigma is True "
                    f"(model.learn_sigma={config.model.learn_sigma})", config.diffusion.variance)

    # Optimisation.
    t = "training."
    _in_range(config, t + "batch_size", 1, None, integer=True)
    _in_range(config, t + "num_steps", 1, None, integer=True)
    _one_of(config, t + "optimizer", OPTIMIZERS)
    _in_range(config, t + "learning_rate", 0, None, lo_open=True)
    _in_range(config, t + "muon_lr_scale", 0, None, lo_open=True)
    _one_of(config, t + "lr_schedule", LR_SCHEDULES)
    _in_range(config, t + "warmup_steps", 0, None, integer=True)
    _in_range(config, t + "b1", 0, 1, hi_open=True)
    _in_range(config, t + "b2", 0, 1, hi_open=True)
    _in_range(config, t + "eps", 0, None, lo_open=True)
    _in_range(config, t + "weight_decay", 0, None)
    _in_range(config, t + "grad_clip_norm", 0, None)
    _in_range(config, t + "ema_decay", 0, 1, hi_open=True)
    _bool(config, t + "ema_warmup")
    _in_range(config, t + "cond_drop_prob", 0, 1)
    _in_range(config, t + "log_every_steps", 1, None, integer=True)
    _in_range(config, t + "checkpoint_every_steps", 1, None, integer=True)
    _in_range(config, t + "keep_checkpoints", 1, None, integer=True)
    _bool(config, t + "async_checkpointing")
    _in_range(config, t + "sample_every_steps", 0, None, integer=True)
    _bool(config, t + "progress_bar")
    batch = config.training.batch_size
    if batch % num_devices:
        raise _fail(t + "batch_size", f"divisible by the device count {num_devices}", batch)
    if batch % process_count:
        raise _fail(t + "batch_size", f"divisible by the process count {process_count}", batch)
    _in_range(config, "parallel.fsdp", 1, None, integer=True)
    if training and num_devices % config.parallel.fsdp:
        raise _fail("parallel.fsdp", f"a divisor of the device count {num_devices}", config.parallel.fsdp)

    # Sampling: the sampler validates its own settings, the process its grid.
    _one_of(config, "sample.method", tuple(samplers.NAMES))
    if process.discrete:
        _in_range(config, "sample.num_steps", 1, config.diffusion.num_timesteps, integer=True)
    try:  # every sampler's settings (they share config.sample), then the chosen one's grid
        for name in samplers.NAMES:
            samplers.from_config({**config.sample.to_dict(), "method": name})
        samplers.from_config(config.sample).times(process)
    except ValueError as e:
        raise ValueError(f"config.sample.{e}") from None
    if config.sample.method in ("meanflow", "shortcut") and config.diffusion.prediction != "velocity":
        raise _fail("sample.method", "a sampler other than meanflow / shortcut, whose step reads the "
                    "network's output as a velocity, for prediction " + repr(config.diffusion.prediction),
                    config.sample.method)
    _in_range(config, "sample.guidance_scale", 0, None)
    _in_range(config, "sample.clip_x0", 0, None)
    interval = tuple(config.sample.get("guidance_interval", ()))
    if interval and not (len(interval) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in interval)
            and 0 <= interval[0] < interval[1]):
        raise _fail("sample.guidance_interval", "() or (lo, hi) noise levels with 0 <= lo < hi < inf",
                    config.sample.guidance_interval)
    _in_range(config, "sample.grid_per_class", 1, None, integer=True)
    _in_range(config, "sample.num_images", 1, None, integer=True)
    _in_range(config, "sample.batch_size", 1, None, integer=True)
    if config.model.num_classes == 0 and config.sample.guidance_scale > 0:
        raise _fail("sample.guidance_scale", "0 for an unconditional model (model.num_classes=0)",
                    config.sample.guidance_scale)


def resolve(config: Any):
    """Fills config.diffusion.prediction and .loss_weighting where they are "" (their default:
    the process's own, `processes.own_objective`) in place, so that the config stored with
    checkpoints and in config.json, and compared on resume, holds the real values; returns
    the process. `validate` (hence every launch mode) calls it first."""
    from diffusion_jax import processes

    process = _process(config)
    d = config.diffusion
    d.prediction, d.loss_weighting = processes.own_objective(process, d.prediction, d.loss_weighting)
    return process


def _flow_map(config: Any, process: Any) -> None:
    """config.diffusion.objective and its sub-config (`flow_maps.make`), and that the network
    can be a flow map (`flow_maps.check`)."""
    from diffusion_jax import flow_maps, models

    d = config.diffusion
    name = d.get("objective", flow_maps.DEFAULT)
    if name not in flow_maps.NAMES:
        raise _fail("diffusion.objective", f"one of {flow_maps.NAMES}", name)
    try:
        objective = flow_maps.make(d)
    except TypeError as e:
        raise ValueError(f"config.diffusion.{name}: {e}; its fields are "
                         f"{tuple(flow_maps.default_fields(name))}") from None
    except ValueError as e:
        raise ValueError(f"config.diffusion.{name}.{e}") from None
    if objective is not None:
        try:
            flow_maps.check(objective, process, d.prediction, models.validate(config.model))
        except ValueError as e:
            raise ValueError(f"config.diffusion.objective: {e}") from None


def _process(config: Any):
    """The experiment's process, with a one-line error naming the bad diffusion field."""
    from diffusion_jax import diffusion, processes, schedules

    d = config.diffusion
    _one_of(config, "diffusion.process", processes.NAMES)
    if d.process == "ddpm":
        _one_of(config, "diffusion.schedule", tuple(schedules.NAMES))
        _in_range(config, "diffusion.num_timesteps", 1, None, integer=True)
        _one_of(config, "diffusion.variance", tuple(diffusion.VARIANCES))
        try:
            return processes.make(d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"config.diffusion.schedule_kwargs: {e}") from None
    if d.variance != "small":
        raise _fail("diffusion.variance", f"'small' for process {d.process!r} (the variance choice "
                    "is the discrete ddpm process's)", d.variance)
    try:
        return processes.make(d)
    except TypeError as e:
        raise ValueError(f"config.diffusion.{d.process}: {e}; its fields are "
                         f"{tuple(processes.default_fields(d.process))}") from None
    except ValueError as e:
        raise ValueError(f"config.diffusion.{d.process}.{e}") from None


def check_against_dataset(config: Any, image_shape: tuple[int, int, int], num_classes: int) -> None:
    """The model's image size / channels / classes must match the dataset's."""
    h, w, c = image_shape
    mc = config.model
    if mc.image_size != h or h != w:
        raise _fail("model.image_size", f"the dataset's image size {h} (images {h}x{w}x{c})",
                    mc.image_size)
    if mc.in_channels != c:
        raise _fail("model.in_channels", f"the dataset's channel count {c}", mc.in_channels)
    if mc.num_classes not in (0, num_classes):
        raise _fail("model.num_classes",
                    f"0 (unconditional) or the dataset's class count {num_classes}", mc.num_classes)
