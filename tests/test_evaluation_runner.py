"""diffusion_jax.evaluation.runner: evaluate() end to end."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.evaluation import classifier
from evaluation_support import TINY_ARCH


@pytest.mark.slow
def test_evaluate_end_to_end_on_the_smoke_config(tmp_path):
    """evaluate() on the smoke experiment (8x8 synthetic data) with untrained parameters:
    every output file appears and the numbers are finite."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from experiments import smoke

    from diffusion_jax import evaluation, models

    config = smoke.get_config()
    workdir = str(tmp_path)
    # A pre-trained tiny classifier keeps the test fast (evaluate would train the default one).
    classifier.train_and_save("synthetic", os.path.join(workdir, "clf"), epochs=1, batch_size=100,
                              arch=TINY_ARCH, log=None,
                              arrays={s: evaluation.load_split(config, s) for s in ("train", "test")})
    with config.unlocked():
        config.eval.update(dict(
            num_samples=24, batch_size=24, samplers=("ddim",), steps=(3,), guidance_scales=(0.0,),
            guidance_sampler="ddim", guidance_steps=3, kid_subsets=2, bpd_num_images=10,
            bpd_num_timesteps=2, bpd_batch_size=10, classifier_dir=os.path.join(workdir, "clf"),
            grid_per_class=8, strip_num_images=2, strip_sampler="ddim", strip_steps=3))
        config.sample.method, config.sample.num_steps = "ddim", 3
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 20))
    model = models.create(config.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    summary = evaluation.evaluate(config, workdir, params=params)
    out = os.path.join(workdir, "eval")
    expected = {"bpd.json", "quality.md", "quality.json", "summary.json", "summary.md",
                "samples_per_class.png", "denoising_strip.png"}
    if pytest.importorskip("matplotlib"):
        expected |= {"quality.png", "loss.png"}
    assert expected <= set(os.listdir(out))
    assert np.isfinite(summary["bpd"]["total_bpd"]) and summary["bpd"]["calls_per_image"] == 3
    rows = summary["quality"]
    assert [(r["sampler"], r["steps"], r["guidance"]) for r in rows] == [("ddim", 3, 2.0), ("ddim", 3, 0.0)]
    assert [(r["sampler_steps"], r["nfe"]) for r in rows] == [(3, 3), (3, 3)]  # DDIM: one call a step
    assert all(np.isfinite(r["fd"]) and 0 <= r["conditional_accuracy"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="eval.samplers"):
        with config.unlocked():
            config.eval.samplers = ("rk45",)
        evaluation.eval_settings(config)


def test_sweep_rows_hold_samplers_to_equal_network_evaluations():
    """An NFE budget gives Heun (2N - 1 calls) and the EDM sampler fewer steps than DDIM."""
    from diffusion_jax.evaluation import runner
    from diffusion_jax.evaluation.settings import eval_settings
    from experiments import smoke

    config = smoke.get_config()
    with config.unlocked():
        config.eval.update(samplers=("ddim", "heun", "edm_sde", "dpm_solver_pp_3m"), steps=(9, 20),
                           guidance_scales=())
    gen = runner.Generator(config, params=None, batch_size=4)
    rows = runner._valid_settings(config, eval_settings(config), False, gen)
    got = {(r["sampler"], r["steps"]): (r["sampler_steps"], r["nfe"]) for r in rows}
    assert got == {("ddim", 9): (9, 9), ("ddim", 20): (20, 20), ("heun", 9): (5, 9), ("heun", 20): (10, 19),
                   ("edm_sde", 9): (5, 9), ("edm_sde", 20): (10, 19), ("dpm_solver_pp_3m", 9): (9, 9),
                   ("dpm_solver_pp_3m", 20): (20, 20)}


def test_bits_per_dim_of_a_continuous_process_comes_from_the_ode(tmp_path):
    """On an EDM config the bpd part runs the probability-flow ODE (not skipped, as it was
    before there was one), counts its calls per image, and summary.md says which it ran."""
    from diffusion_jax import evaluation, models
    from diffusion_jax.evaluation import report, runner
    from diffusion_jax.evaluation.settings import eval_settings
    from experiments import smoke

    config = smoke.get_config()
    with config.unlocked():
        config.diffusion.process, config.diffusion.prediction = "edm", "edm"
        config.eval.update(bpd_num_images=4, bpd_batch_size=4, bpd_ode_steps=2, bpd_ode_solver="heun")
    model = models.create(config.model)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32),
                        jnp.zeros((1,), jnp.int32))["params"]
    test_images = evaluation.load_split(config, "test")[0]
    out = runner._bpd(config, params, eval_settings(config), test_images, str(tmp_path))
    assert np.isfinite(out["total_bpd"]) and out["num_images"] == 4
    assert out["calls_per_image"] == 2 * 2 and out["sigma_hi"] == 80.0
    assert json.load(open(tmp_path / "bpd.json"))["total_bpd"] == out["total_bpd"]
    text = report.summary_markdown({"workdir": "w", "bpd": out, "timings_s": {}})
    assert "probability-flow ODE, heun 2 steps" in text
    with pytest.raises(ValueError, match="eval.bpd_ode_solver"):
        with config.unlocked():
            config.eval.bpd_ode_solver = "rk45"
        eval_settings(config)
