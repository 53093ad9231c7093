"""diffusion_jax.evaluation.settings: EVAL_DEFAULTS and the eval_settings checks, importable without jax."""

from __future__ import annotations

import os
import subprocess
import sys

import ml_collections
import pytest

from diffusion_jax import evaluation
from diffusion_jax.evaluation import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_settings_import_without_jax():
    program = os.path.join(ROOT, "tests", "programs", "import_eval_settings.py")
    out = subprocess.run([sys.executable, program], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_package_reexports_the_settings():
    assert evaluation.EVAL_DEFAULTS is settings.EVAL_DEFAULTS
    assert evaluation.eval_settings is settings.eval_settings


def _config(**eval_fields):
    return ml_collections.ConfigDict({"seed": 3, "sample": {"guidance_scale": 1.5, "method": "ddim"},
                                      "eval": eval_fields})


def test_defaults_resolve_from_the_rest_of_the_config():
    s = settings.eval_settings(_config())
    assert s["seed"] == 3 and s["guidance_scale"] == 1.5 and s["guidance_sampler"] == "ddim"
    assert s["steps"] == tuple(settings.EVAL_DEFAULTS["steps"])
    assert settings.eval_settings(_config(steps="5, 7"))["steps"] == (5, 7)  # comma strings from the CLI


def test_experiment_configs_take_every_eval_field_from_the_command_line():
    """The None defaults are typed stand-ins in experiments/default.py, so each field has a
    type the CLI can override, and they resolve like None."""
    from experiments import default

    config = default.get_config()
    assert {k: type(v) for k, v in config.eval.items() if k in ("seed", "guidance_scale", "guidance_sampler")} == {
        "seed": int, "guidance_scale": float, "guidance_sampler": str}
    config.seed, config.sample.guidance_scale, config.sample.method = 5, 2.5, "heun"
    s = settings.eval_settings(config)
    assert (s["seed"], s["guidance_scale"], s["guidance_sampler"]) == (5, 2.5, "heun")
    config.eval.guidance_sampler = "euler"  # what --config.eval.guidance_sampler=euler does
    assert settings.eval_settings(config)["guidance_sampler"] == "euler"


@pytest.mark.parametrize("field, value, match", [
    ("parts", ("bpd", "fid"), "eval.parts"),
    ("samplers", ("rk45",), "eval.samplers"),
    ("bpd_estimator", "importance", "eval.bpd_estimator"),
    ("num_samples", 1, "eval.num_samples"),
    ("strip_steps", -1, "eval.strip_steps"),
    ("guidance_scales", (-1.0,), "guidance_scale"),
])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        settings.eval_settings(_config(**{field: value}))
