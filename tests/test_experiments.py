"""The experiments of every process validate, bad process fields give one-line errors naming
the field, and an EDM and a flow model go through launch.py's train, sample and eval modes."""

import json
import math
import os
import subprocess
import sys

import pytest

from diffusion_jax.train import config as config_lib
from experiments import mnist, mnist_flow, smoke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_edm_and_flow_experiments_use_the_mnist_network():
    base, edm, flow = smoke.get_config(), mnist.get_config(), mnist_flow.get_config()
    from experiments import mnist_ddpm

    assert edm.model == flow.model and mnist_ddpm.get_config().diffusion.process == "ddpm"
    assert (edm.diffusion.process, edm.diffusion.prediction, edm.sample.method) == ("edm", "edm", "dpm_solver_pp")
    assert (flow.diffusion.process, flow.diffusion.prediction, flow.sample.method) == ("flow", "velocity", "euler")
    for config in (edm, flow):
        config_lib.validate(config)
    assert base.diffusion.process == "ddpm"


BAD = [
    ({"diffusion.process": "sde"}, "config.diffusion.process must be one of ('ddpm', 'vp', 'edm', 'flow')"),
    ({"diffusion.process": "edm", "diffusion.prediction": "score"},
     "config.diffusion.prediction must be one of ('edm', 'x0', 'eps', 'v') for process 'edm'"),
    ({"diffusion.process": "flow", "diffusion.prediction": "eps"}, "config.diffusion.prediction"),
    ({"diffusion.process": "edm", "diffusion.edm.sigma_data": math.nan}, "config.diffusion.edm.sigma_data"),
    ({"diffusion.process": "vp", "diffusion.vp.schedule": "sigmoid"}, "config.diffusion.vp.schedule"),
    ({"diffusion.process": "flow", "diffusion.flow.sigma_max": math.inf}, "config.diffusion.flow.sigma_max"),
    ({"diffusion.process": "edm", "diffusion.variance": "large"}, "config.diffusion.variance must be 'small'"),
    ({"diffusion.process": "edm", "diffusion.loss_weighting": "vlb"}, "config.diffusion.loss_weighting"),
    ({"sample.method": "heun", "sample.rho": -1.0}, "config.sample.rho"),
    ({"sample.s_churn": math.nan}, "config.sample.s_churn"),
    ({"sample.grid": "uniform"}, "config.sample.grid"),
    ({"sample.method": "ddim", "sample.grid": "leading", "diffusion.process": "edm",
      "diffusion.prediction": "edm"}, "config.sample.grid 'leading'"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_process_or_sampler_fields_raise_one_line_errors(fields, message):
    config = smoke.get_config()
    with config.unlocked():
        for path, value in fields.items():
            section, *rest = path.split(".")
            target = config[section]
            for part in rest[:-1]:
                target = target[part]
            target[rest[-1]] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("process,extra", [
    ("edm", ["--config.diffusion.prediction=edm", "--config.diffusion.loss_weighting=edm",
             "--config.sample.method=heun", "--config.sample.num_steps=3"]),
    ("flow", ["--config.diffusion.prediction=velocity", "--config.sample.method=euler",
              "--config.sample.grid=trailing"]),
])
def test_continuous_processes_train_sample_and_evaluate_through_launch(tmp_path, env, process, extra):
    """EDM through all three modes and the eval's pictures; flow through train and eval's quality
    rows (its sample mode is the same code path as EDM's, tests/test_launch.py runs it on ddpm)."""
    workdir = str(tmp_path / process)
    base = [sys.executable, os.path.join(REPO, "launch.py"), "--config", os.path.join(REPO, "experiments", "smoke.py"),
            f"--workdir={workdir}", f"--config.diffusion.process={process}", *extra]
    parts = "('quality', 'pictures')" if process == "edm" else "('quality',)"
    eval_flags = [f"--config.eval.parts={parts}", "--config.eval.samplers=('euler', 'dpm_solver_pp')",
                  "--config.eval.steps=(3,)", "--config.eval.guidance_scales=(2.0,)", "--config.eval.guidance_steps=3",
                  "--config.eval.classifier_epochs=1", "--config.eval.strip_steps=3", "--config.eval.strip_sampler=euler"]
    modes = (("train", []), ("sample", []), ("eval", eval_flags)) if process == "edm" else (
        ("train", []), ("eval", eval_flags))
    for mode, flags in modes:  # env: tests/conftest.py
        done = subprocess.run(base + [f"--mode={mode}", *flags], capture_output=True, text=True, env=env,
                              cwd=REPO, timeout=600)
        assert done.returncode == 0, (mode, done.stderr[-3000:])
    samples = os.listdir(os.path.join(workdir, "samples"))
    assert any(f.startswith("step_") for f in samples)  # the trainer's grid
    assert any(f.endswith(".npz") for f in samples) == (process == "edm")  # --mode sample's draws
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        summary = json.load(f)
    assert "bpd" not in summary  # the VLB is ddpm's
    rows = [(r["sampler"], r["nfe"]) for r in summary["quality"]]
    assert rows[:2] == [("euler", 3), ("dpm_solver_pp", 3)] and all(nfe == 3 for _, nfe in rows)
