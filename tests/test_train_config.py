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
