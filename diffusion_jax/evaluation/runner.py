"""`evaluate(config, workdir)`: the parts of `config.eval` run in order, outputs under workdir/eval/.

`Generator` draws images and reverse trajectories from the model; it and the
denoising strip's timesteps are this package's only calls into
`diffusion_jax.samplers`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from diffusion_jax import ode_likelihood
from diffusion_jax.evaluation import classifier, likelihood, pictures, quality
from diffusion_jax.evaluation.report import summary_markdown
from diffusion_jax.evaluation.settings import eval_settings


def _log(msg: str) -> None:
    logging.info("eval: %s", msg)


# ----------------------------------------------------------------------------- data


def _dataset_name(config: Any) -> str:
    return str(config.data.dataset)


def load_split(config: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N,H,W,C], int32 labels [N]) of the experiment's dataset.

    A generated dataset (the test-only "synthetic" one: 2,000 train / 1,000 test
    images) is drawn from config.seed, so the whole evaluation runs in tests
    without prepared data.
    """
    from diffusion_jax import data

    images, labels = data.load_arrays(_dataset_name(config), split, data_dir=config.data.get("data_dir", "") or None,
                                      geometry=data.model_geometry(config.model), seed=int(config.seed))
    return np.asarray(images, np.uint8), np.asarray(labels, np.int32)


def _classifier(config: Any, workdir: str, settings: dict, train_split, test_split):
    """(module, params, meta) of the evaluation classifier; trained first if missing."""
    from diffusion_jax import data

    name = _dataset_name(config)
    # A generated dataset is drawn at this run's geometry, so its classifier belongs to the run.
    default = (os.path.join(workdir, "eval", "classifier") if name in data.GENERATED
               else os.path.join("runs", f"classifier_{name}"))
    directory = settings["classifier_dir"] or default
    if not os.path.exists(os.path.join(directory, classifier.META_FILE)):
        if not settings["train_classifier"]:
            raise FileNotFoundError(
                f"no classifier in {directory!r} and eval.train_classifier=False; run "
                f"`python -m diffusion_jax.evaluation.classifier --dataset {name} --workdir {directory}`")
        _log(f"no classifier in {directory}; training one ({settings['classifier_epochs']} epochs)")
        classifier.train_and_save(name, directory, arrays={"train": train_split, "test": test_split},
                                  epochs=int(settings["classifier_epochs"]),
                                  max_shift=int(settings["classifier_max_shift"]), seed=settings["seed"], log=_log)
    model, params, meta = classifier.load(directory)
    if tuple(meta["image_shape"]) != tuple(test_split[0].shape[1:]) or meta["dataset"] != name:
        raise ValueError(f"classifier in {directory!r} is for {meta['dataset']} {meta['image_shape']}, "
                         f"not {name} {list(test_split[0].shape[1:])}; set eval.classifier_dir")
    return model, params, meta


# ----------------------------------------------------------------------------- model


def _model_bits(config: Any):
    from diffusion_jax.train import sampling

    process = sampling.make_process(config)
    mc = config.model
    shape = (int(mc.image_size), int(mc.image_size), int(mc.in_channels))
    return process, shape, int(mc.num_classes)


def sampler_for(config: Any, process: Any, method: str, nfe: int):
    """config.sample's settings for `method`, with the most steps whose network evaluations
    per image fit in `nfe` (`Sampler.with_nfe`); for ddpm, nfe = T is the full chain."""
    from diffusion_jax import samplers

    fields = dict(config.sample.to_dict() if hasattr(config.sample, "to_dict") else config.sample)
    return samplers.from_config({**fields, "method": method}).with_nfe(process, nfe)


class Generator:
    """Draws images (and reverse trajectories) from the model with any sampler at an NFE budget.

    One jit-compiled sampler per (method, nfe, guided or not, batch), run in batches of
    `batch_size` (the last padded); params are jit arguments, not baked-in constants.
    """

    def __init__(self, config: Any, params: Any, *, batch_size: int):
        self.config, self.params, self.batch_size = config, params, int(batch_size)
        self.process, self.shape, self.num_classes = _model_bits(config)
        self._compiled: dict = {}

    def sampler(self, method: str, nfe: int):
        return sampler_for(self.config, self.process, method, int(nfe))

    def _fn(self, method: str, nfe: int, guided: bool, conditional: bool, trajectory: bool, batch: int):
        """jit-compiled run(params, labels, rng, w); w is a traced argument when guided, so every
        guidance scale > 0 shares one compilation (w = 0 runs the conditional model alone)."""
        key = (method, nfe, guided, conditional, trajectory, batch)
        if key not in self._compiled:
            from diffusion_jax import samplers
            from diffusion_jax.train import sampling

            config, process, sampler = self.config, self.process, self.sampler(method, nfe)

            def run(params, labels, rng, w):
                denoise = sampling.make_denoiser(config, params, labels if conditional else None,
                                                 w if guided else 0.0, process)
                out = samplers.draw(sampler, denoise, process, (batch, *self.shape), rng,
                                    return_trajectory=trajectory)
                return jax.tree.map(lambda x: jnp.clip(x, -1.0, 1.0), out)

            self._compiled[key] = jax.jit(run)
        return self._compiled[key]

    def images(self, method: str, nfe: int, guidance: float, *, labels=None, num: int | None = None,
               seed: int = 0) -> np.ndarray:
        """float32 [N,H,W,C] in [-1, 1]; N = len(labels) (conditional) or num (unconditional)."""
        n = len(labels) if labels is not None else int(num)
        batch = min(self.batch_size, n)
        fn = self._fn(method, int(nfe), labels is not None and guidance != 0, labels is not None, False, batch)
        w = jnp.float32(guidance)
        key = jax.random.PRNGKey(seed)
        out = []
        for i, lo in enumerate(range(0, n, batch)):
            valid = min(batch, n - lo)
            lab = None if labels is None else jnp.asarray(np.resize(labels[lo:lo + valid], batch), jnp.int32)
            out.append(np.asarray(fn(self.params, lab, jax.random.fold_in(key, i), w))[:valid])
        return np.concatenate(out)

    def trajectory(self, method: str, nfe: int, guidance: float, *, labels=None, num: int,
                   seed: int = 0) -> np.ndarray:
        """[steps + 1, num, H, W, C]: start noise, the state after each step, the sample."""
        fn = self._fn(method, int(nfe), labels is not None and guidance != 0, labels is not None, True, int(num))
        lab = None if labels is None else jnp.asarray(labels, jnp.int32)
        _, traj = fn(self.params, lab, jax.random.PRNGKey(seed), jnp.float32(guidance))
        return np.asarray(traj)


# ----------------------------------------------------------------------------- evaluate


def _bpd(config, params, settings, test_images, out_dir) -> dict:
    """Test-set bits/dim of the unconditional model (the null label of CFG training; Ho &
    Salimans 2022): the variational bound for ddpm, the probability-flow ODE otherwise."""
    from diffusion_jax import models, processes, samplers

    from diffusion_jax.train import sampling

    process, _, num_classes = _model_bits(config)
    n = min(int(settings["bpd_num_images"]), len(test_images))
    batch = min(int(settings["bpd_batch_size"]), n)
    uncond = models.null_cond(config.model, batch) if num_classes > 0 else None
    key = jax.random.PRNGKey(settings["seed"] + 17)
    prediction = processes.own_objective(process, config.diffusion.prediction)[0]  # "": the process's own
    if process.discrete:
        def denoise(p, x_t, t):
            return sampling.make_denoise_fn(config, p, uncond, 0.0)(x_t, t)

        k = int(settings["bpd_num_timesteps"]) or None
        result = likelihood.dataset_bits_per_dim(
            denoise, process.schedule, test_images[:n], key, params=params, batch_size=batch,
            num_timesteps=k, estimator=settings["bpd_estimator"], prediction=prediction,
            variance=config.diffusion.variance, log=_log)
        result.update(variance=config.diffusion.variance)
    else:
        def denoise(p, x_t, t):  # no x0 clipping: the ODE needs the network's own derivative
            return samplers.denoiser(sampling.make_denoise_fn(config, p, uncond, 0.0), process, prediction)(x_t, t)

        result = likelihood.dataset_bits_per_dim_ode(
            denoise, process, test_images[:n], key, params=params, batch_size=batch,
            num_steps=int(settings["bpd_ode_steps"]), solver=settings["bpd_ode_solver"],
            divergence=settings["bpd_ode_divergence"], sigma_lo=float(settings["bpd_ode_sigma_lo"]) or None,
            log=_log)
    result.update(condition="null label (unconditional)" if num_classes > 0 else "unconditional")
    with open(os.path.join(out_dir, "bpd.json"), "w") as f:
        json.dump(result, f, indent=2)
    _log(f"bits/dim {result['total_bpd']:.4f} +- {result['total_bpd_stderr']:.4f} "
         f"(N={n}, {result['estimator']}, {result['seconds']:.0f}s)")
    return result


def _plan(config, settings, sweep_settings, num_classes, generator, parts) -> dict:
    """Image x network-call counts of each part (a guided call counts twice), for budgeting;
    the samplers count their own calls (`Sampler.nfe`)."""
    conditional, process = num_classes > 0, generator.process
    g = lambda w: 2 if conditional and w != 0 else 1  # noqa: E731
    plan = {}
    if "bpd" in parts and settings["bpd_num_images"] and process.discrete:
        k, T = int(settings["bpd_num_timesteps"]), process.num_timesteps
        calls = T if k == 0 else (
            1 + len(likelihood.geometric_strata(T, k)[0]) if settings["bpd_estimator"] == "stratified" else k)
        plan["bpd"] = int(settings["bpd_num_images"]) * calls
    elif "bpd" in parts and settings["bpd_num_images"]:  # each call also takes a vector-Jacobian product
        plan["bpd"] = int(settings["bpd_num_images"]) * ode_likelihood.network_calls(
            int(settings["bpd_ode_steps"]), settings["bpd_ode_divergence"],
            int(np.prod(generator.shape)), settings["bpd_ode_solver"])
    if "quality" in parts:
        plan["quality"] = sum(int(settings["num_samples"]) * r["nfe"] * g(r["guidance"]) for r in sweep_settings)
    if "pictures" in parts:
        per_class = int(settings["grid_per_class"])
        grid_images = num_classes * per_class if conditional else per_class * per_class
        grid = generator.sampler(*_grid_setting(config, process)).nfe(process)
        strip = generator.sampler(settings["strip_sampler"], _strip_nfe(config, settings, process)).nfe(process)
        plan["pictures"] = g(settings["guidance_scale"]) * (
            grid_images * grid + int(settings["strip_num_images"]) * strip)
    return plan


def _grid_setting(config, process) -> tuple[str, int]:
    """(method, nfe) of config.sample, the setting of the training grids."""
    from diffusion_jax.train import sampling

    return str(config.sample.method), sampling.make_sampler(config).nfe(process)


def _strip_nfe(config, settings, process) -> int:
    """eval.strip_steps as an NFE budget; 0 = all T (ddpm) or config.sample's setting."""
    budget = int(settings["strip_steps"])
    if process.discrete:
        return min(budget or process.num_timesteps, process.num_timesteps)
    return budget or _grid_setting(config, process)[1]


def _valid_settings(config, settings, conditional: bool, generator) -> list[dict]:
    """The sweep rows: every sampler at each NFE budget of eval.steps (its "steps" label), with
    the sampler steps that fit ("sampler_steps") and the network calls they make ("nfe")."""
    process = generator.process
    limit = process.num_timesteps if process.discrete else float("inf")
    steps = [n for n in settings["steps"] if 1 <= n <= limit]
    if len(steps) < len(settings["steps"]):
        _log(f"eval.steps: dropped {sorted(set(settings['steps']) - set(steps))} (> T={limit})")
    guidance_steps = int(min(int(settings["guidance_steps"]), limit))
    rows = quality.settings_from(
        settings["samplers"], steps, settings["guidance_scale"] if conditional else 0.0,
        settings["guidance_scales"] if conditional else (),
        settings["guidance_sampler"] if conditional else None, guidance_steps)
    if process.discrete and process.variance != "small":
        # Respaced ancestral sampling supports the "small" variance only (samplers.Ancestral).
        rows = [r for r in rows if not (r["sampler"] == "ddpm" and r["steps"] != limit)]
    for r in rows:
        sampler = generator.sampler(r["sampler"], r["steps"])
        r.update(sampler_steps=sampler.num_steps, nfe=sampler.nfe(process))
    return rows


def evaluate(config: Any, workdir: str, *, params: Any = None) -> dict:
    """Run the evaluation parts of `config.eval` on the latest EMA parameters in `workdir`
    (or on `params`), write everything under workdir/eval/ and return the summary dict."""
    start = time.time()
    settings = eval_settings(config)
    out_dir = os.path.join(workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    summary: dict = {"workdir": workdir, "settings": {k: list(v) if isinstance(v, tuple) else v
                                                      for k, v in settings.items()}, "timings_s": {}}
    if params is None:
        from diffusion_jax.train.checkpoints import restore_ema

        # the step actually restored (the newest that restores, not merely the newest folder)
        summary["checkpoint_step"], params = restore_ema(config, workdir)
    generator = Generator(config, params, batch_size=settings["batch_size"])
    num_classes = generator.num_classes
    conditional = num_classes > 0
    parts = settings["parts"]
    sweep_settings = _valid_settings(config, settings, conditional, generator)
    plan = _plan(config, settings, sweep_settings, num_classes, generator, parts)
    summary["planned_image_network_calls"] = plan
    _log("planned network evaluations (images x calls; x2 with guidance): "
         + ", ".join(f"{k} {v:,}" for k, v in plan.items()))
    test_split = load_split(config, "test")

    if "bpd" in parts and settings["bpd_num_images"] > 0:
        t0 = time.time()
        summary["bpd"] = _bpd(config, params, settings, test_split[0], out_dir)
        summary["timings_s"]["bpd"] = round(time.time() - t0, 1)

    if "quality" in parts:
        t0 = time.time()
        train_split = load_split(config, "train")
        model, cparams, meta = _classifier(config, workdir, settings, train_split, test_split)
        summary["classifier"] = {k: meta[k] for k in ("dataset", "test_accuracy", "arch")}
        apply_fn = classifier.make_apply_fn(model, cparams)
        reference = quality.make_reference(
            apply_fn, test_split[0], train_split[0], num_samples=settings["num_samples"],
            num_classes=meta["num_classes"], train_labels=train_split[1] if conditional else None,
            seed=settings["seed"],
            kid_subsets=settings["kid_subsets"], kid_subset_size=settings["kid_subset_size"])
        _log("floor (train vs test): " + quality.format_row(reference.floor))
        rows = quality.sweep(
            lambda m, n, w, labels, seed: generator.images(m, n, w, labels=labels, num=settings["num_samples"],
                                                           seed=seed),
            apply_fn, reference, sweep_settings,
            num_samples=settings["num_samples"], conditional=conditional, seed=settings["seed"], log=_log)
        quality.write_table(rows, reference.floor, out_dir, extra={"num_samples": settings["num_samples"]})
        quality.plot(rows, reference.floor, os.path.join(out_dir, "quality.png"))
        summary.update(floor=reference.floor, quality=rows)
        summary["timings_s"]["quality"] = round(time.time() - t0, 1)

    if "pictures" in parts:
        t0 = time.time()
        summary["pictures"] = _pictures(config, workdir, settings, generator, num_classes, out_dir)
        summary["timings_s"]["pictures"] = round(time.time() - t0, 1)

    summary["timings_s"]["total"] = round(time.time() - start, 1)
    summary["ms_per_image_call"] = {
        part: round(1e3 * summary["timings_s"][part] / plan[part], 3)
        for part in plan if plan[part] and part in summary["timings_s"]}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(summary_markdown(summary))
    _log(f"done in {summary['timings_s']['total']:.0f}s; results in {out_dir}")
    return summary


def _pictures(config, workdir, settings, generator, num_classes, out_dir) -> dict:
    paths = {}
    loss = pictures.save_loss_curve(os.path.join(workdir, "metrics.jsonl"), os.path.join(out_dir, "loss.png"))
    if loss:
        paths["loss_curve"] = loss
    process = generator.process
    method, nfe = _grid_setting(config, process)
    w = float(settings["guidance_scale"]) if num_classes > 0 else 0.0
    per_class = int(settings["grid_per_class"])
    if num_classes > 0:
        labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    else:
        labels = None
    images = generator.images(method, nfe, w, labels=labels, num=per_class * per_class, seed=settings["seed"] + 1)
    paths["class_grid"] = pictures.save_class_grid(
        images, labels, os.path.join(out_dir, "samples_per_class.png"), num_classes=num_classes, per_class=per_class)
    paths["class_grid_setting"] = f"{method}, {nfe} NFE, w={w:g}"

    strip = generator.sampler(settings["strip_sampler"], _strip_nfe(config, settings, process))
    n = int(settings["strip_num_images"])
    strip_labels = (np.arange(n) % num_classes).astype(np.int32) if num_classes > 0 else None
    traj = generator.trajectory(strip.name, strip.nfe(process), w, labels=strip_labels, num=n,
                                seed=settings["seed"] + 2)
    paths["denoising_strip"] = pictures.save_denoising_strip(
        traj, strip.times(process)[:-1], os.path.join(out_dir, "denoising_strip.png"),
        num_columns=int(settings["strip_columns"]))
    paths["strip_setting"] = f"{strip.name}, {strip.num_steps} steps ({strip.nfe(process)} NFE), w={w:g}"
    return paths
