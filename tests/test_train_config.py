"""config.validate refuses NaN and inf in every float field, one line naming the field."""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import smoke  # noqa: E402

from diffusion_jax.train import config as config_lib  # noqa: E402

FLOAT_FIELDS = [
    "training.learning_rate", "training.b1", "training.b2", "training.eps", "training.weight_decay",
    "training.grad_clip_norm", "training.ema_decay", "training.cond_drop_prob",
    "diffusion.min_snr_gamma", "diffusion.vlb_weight",
    "sample.eta", "sample.guidance_scale", "sample.clip_x0",
]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_non_finite_float_field_is_refused(field, value):
    config = smoke.get_config()
    section, name = field.split(".")
    config[section][name] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    text = str(e.value)
    assert text.startswith(f"config.{field} must be a number with ") and "\n" not in text
    assert text.endswith(f"got {value!r}")


def test_unbounded_fields_say_finite_and_finite_values_pass():
    config = smoke.get_config()
    config.training.learning_rate = float("inf")
    with pytest.raises(ValueError, match=r"^config\.training\.learning_rate must be a number with "
                                         r"0 < learning_rate < inf, got inf$"):
        config_lib.validate(config)
    config.training.learning_rate = 1e30  # large but finite: a range check's business, not this one's
    config_lib.validate(config)


OWN = {"ddpm": ("eps", "none"), "vp": ("eps", "none"), "edm": ("edm", "edm"), "flow": ("velocity", "none")}


def test_one_field_switches_the_formulation(env):
    """experiments/smoke.py with only diffusion.process changed, for all four processes (issue
    #21; flow used to stop on prediction 'eps'): the process's own prediction and loss
    weighting are filled in, one train step gives a finite loss and every registered sampler
    (the flow-map ones on flow only) draws finite images (tests/programs/switch_process.py, in a fresh process with the suite's
    cheap-compile settings, tests/conftest.py)."""
    import math
    import subprocess

    program = os.path.join(REPO, "tests", "programs", "switch_process.py")
    done = subprocess.run([sys.executable, program, *OWN], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()[:1] in ([p] for p in OWN)}
    from diffusion_jax import samplers

    for process, (prediction, weighting) in OWN.items():
        _, got_prediction, got_weighting, loss, finite = lines[process]
        assert (got_prediction, got_weighting) == (prediction, weighting), lines[process]
        assert math.isfinite(float(loss.split("=")[1])), lines[process]
        usable = [n for n in samplers.NAMES if process == "flow" or n not in ("meanflow", "shortcut")]
        assert finite.split("=")[1].split(",") == usable, lines[process]


def test_data_source_is_one_of_two_and_records_needs_grain():
    config = smoke.get_config()
    config.data.source = "pngs"
    with pytest.raises(ValueError, match=r"^config\.data\.source must be one of \('decoded', 'records'\), "
                                         r"got 'pngs'$"):
        config_lib.validate(config)
    config.data.source = "records"
    config.data.loader = "numpy"
    with pytest.raises(ValueError, match=r"^config\.data\.source 'records' is read through grain only: set "
                                         r"config\.data\.loader = 'grain' .*got loader 'numpy'$"):
        config_lib.validate(config)
    config.data.loader = "grain"
    config_lib.validate(config)
