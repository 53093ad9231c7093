"""The evaluation's knobs: `EVAL_DEFAULTS` and `eval_settings(config)`.

Importable without jax (experiments/default.py builds `config.eval` from
`EVAL_DEFAULTS`); `eval_settings` imports the sampler and likelihood names it
checks against when it is called.
"""

from __future__ import annotations

from typing import Any

# config.eval field -> default. None (or -1 / "" in a ConfigDict, whose fields cannot change
# type) means "taken from another part of the config" (see eval_settings).
EVAL_DEFAULTS = {
    "parts": ("bpd", "quality", "pictures"),  # which parts to run
    "seed": None,  # int; None or -1 = config.seed
    "num_samples": 500,  # generated images per sweep setting (and train images for the floor)
    "batch_size": 500,  # images per sampler call
    "samplers": ("ddpm", "ddim", "dpm_solver_pp"),  # names in samplers.NAMES
    # NFE budgets (network evaluations per image; ddpm: <= T, T = the full chain): each sampler
    # runs the most steps that fit, so rows compare samplers (and runs of other processes) at equal NFE
    "steps": (10, 20),
    "guidance_scale": None,  # w of the steps sweep; None or -1 = config.sample.guidance_scale
    "guidance_scales": (0.0, 1.0, 2.0, 4.0),  # w values swept (conditional models only) ...
    "guidance_sampler": None,  # ... with this sampler (None or "" = config.sample.method) ...
    "guidance_steps": 20,  # ... and this NFE budget
    "kid_subsets": 20,  # KID: number of random subsets
    "kid_subset_size": 1000,  # KID: images per subset (capped at the sample count)
    "bpd_num_images": 500,  # test images for bits/dim; 0 = skip
    "bpd_num_timesteps": 20,  # K: unbiased estimate from <= K+1 network calls per image; 0 = all T terms
    "bpd_estimator": "stratified",  # stratified (decoder exact + geometric strata) | uniform (diffusion.bits_per_dim)
    "bpd_batch_size": 250,  # images per bits/dim call
    # continuous processes (edm, flow, vp): the probability-flow ODE of dequantised pixels
    "bpd_ode_steps": 16,  # solver steps in log sigma (rk4: 4 network calls + VJPs each)
    "bpd_ode_solver": "rk4",  # rk4 | heun (ode_likelihood.SOLVERS)
    "bpd_ode_divergence": "rademacher",  # rademacher | gaussian (Hutchinson) | exact (D VJPs: small data)
    "bpd_ode_sigma_lo": 0.0,  # the data's smoothing level where the ODE starts; 0 = the process's sigma_min
    "classifier_dir": "",  # "" = runs/classifier_<dataset> (a generated dataset such as synthetic: <workdir>/eval/classifier)
    "train_classifier": True,  # train the classifier when classifier_dir has none
    "classifier_epochs": 4,  # epochs when evaluate trains it
    "classifier_max_shift": 2,  # random-shift augmentation (pixels) when evaluate trains it
    "grid_per_class": 8,  # images per class row in samples_per_class.png
    "strip_num_images": 6,  # rows of denoising_strip.png
    "strip_sampler": "ddpm",  # sampler of the strip
    "strip_steps": 0,  # its NFE budget; 0 = all T (ddpm) or config.sample's setting
    "strip_columns": 10,  # x_t snapshots per row
}

PARTS = ("bpd", "quality", "pictures")

# The typed stand-in of each None default: what experiments/default.py stores in config.eval
# (a ConfigDict field's type is fixed, and the command line cannot override a None field).
# eval_settings reads a stand-in exactly as None.
STAND_INS = {"seed": -1, "guidance_scale": -1.0, "guidance_sampler": ""}


def eval_settings(config: Any) -> dict:
    """config.eval merged over EVAL_DEFAULTS, with the None defaults resolved and checked."""
    given = config.get("eval", None) or {}
    given = given.to_dict() if hasattr(given, "to_dict") else dict(given)
    s = {k: given.get(k, v) for k, v in EVAL_DEFAULTS.items()}
    sample = config.get("sample", None) or {}
    unset = {k for k, v in STAND_INS.items() if s[k] is None or s[k] == v}
    if "seed" in unset:
        s["seed"] = int(config.get("seed", 0))
    if "guidance_scale" in unset:
        s["guidance_scale"] = float(sample.get("guidance_scale", 0.0))
    if "guidance_sampler" in unset:
        s["guidance_sampler"] = str(sample.get("method", "ddim"))
    for field in ("parts", "samplers", "steps", "guidance_scales"):
        value = s[field]
        s[field] = tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else tuple(value)
    s["steps"] = tuple(int(n) for n in s["steps"])
    s["guidance_scales"] = tuple(float(w) for w in s["guidance_scales"])

    from diffusion_jax import ode_likelihood, samplers  # imported here: this module stays free of jax
    from diffusion_jax.evaluation import likelihood

    unknown = [p for p in s["parts"] if p not in PARTS]
    if unknown:
        raise ValueError(f"eval.parts: unknown {unknown}; allowed: {PARTS}")
    for field in ("samplers",):
        bad = [m for m in s[field] if m not in samplers.NAMES]
        if bad:
            raise ValueError(f"eval.{field}: unknown {bad}; allowed: {samplers.NAMES}")
    if s["bpd_estimator"] not in likelihood.ESTIMATORS:
        raise ValueError(f"eval.bpd_estimator={s['bpd_estimator']!r}; allowed: {likelihood.ESTIMATORS}")
    for field, allowed in (("bpd_ode_solver", tuple(ode_likelihood.SOLVERS)),
                           ("bpd_ode_divergence", ode_likelihood.DIVERGENCES)):
        if s[field] not in allowed:
            raise ValueError(f"eval.{field}={s[field]!r}; allowed: {allowed}")
    for field in ("guidance_sampler", "strip_sampler"):
        if s[field] not in samplers.NAMES:
            raise ValueError(f"eval.{field}={s[field]!r}; allowed: {samplers.NAMES}")
    for field in ("num_samples", "batch_size", "bpd_batch_size", "kid_subsets", "kid_subset_size",
                  "grid_per_class", "strip_num_images", "strip_columns", "classifier_epochs", "bpd_ode_steps"):
        if int(s[field]) < 1:
            raise ValueError(f"eval.{field} must be an integer >= 1, got {s[field]}")
    if not float(s["bpd_ode_sigma_lo"]) >= 0:
        raise ValueError(f"eval.bpd_ode_sigma_lo must be >= 0 (0 = the process's sigma_min), got {s['bpd_ode_sigma_lo']}")
    for field in ("bpd_num_images", "bpd_num_timesteps", "strip_steps", "classifier_max_shift"):
        if int(s[field]) < 0:
            zero = {"bpd_num_images": "skip", "classifier_max_shift": "no shifts"}.get(field, "all T")
            raise ValueError(f"eval.{field} must be an integer >= 0 (0 = {zero}), got {s[field]}")
    if s["num_samples"] < 2:
        raise ValueError(f"eval.num_samples must be >= 2 for covariance-based metrics, got {s['num_samples']}")
    if any(w < 0 for w in s["guidance_scales"] + (s["guidance_scale"],)):
        raise ValueError("eval.guidance_scale / eval.guidance_scales must be >= 0")
    return s
