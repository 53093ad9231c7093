"""--mode sample: bad sample.labels fail before any restore; non-finite images are never written."""

import os
import sys

import jax
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import smoke  # noqa: E402

from diffusion_jax import models  # noqa: E402
from diffusion_jax.train import checkpoints, loop, sampling  # noqa: E402
from diffusion_jax.train.state import dummy_inputs  # noqa: E402


@pytest.mark.parametrize("labels", ["1,3", "0,x", "-1"])
def test_bad_labels_fail_before_any_restore(tmp_path, labels):
    config = smoke.get_config()
    config.sample.labels = labels
    for call in (lambda: sampling.run_sample_mode(config, str(tmp_path)), lambda: loop.prepare(config)):
        with pytest.raises(ValueError) as e:
            call()  # (the workdir has no checkpoint: a restore would fail differently)
        assert str(e.value) == (f"config.sample.labels must be comma-separated integers in [0, 3) "
                                f"(model.num_classes=3), got {labels!r}")


def test_non_finite_images_are_not_written(tmp_path, monkeypatch):
    config = smoke.get_config()
    model = models.create(config.model)
    shapes = jax.eval_shape(lambda k: model.init({"params": k}, *dummy_inputs(config.model), train=False),
                            jax.random.PRNGKey(0))["params"]
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": zeros, "ema_params": zeros, "opt_state": {}}, {}, config)
    ckpt.close()

    def nan_images(config, params, num, labels, key):  # what a diverging sampler returns
        images = np.zeros((num, 8, 8, 1), np.float32)
        images[1, 2, 3, 0] = np.nan
        return images

    monkeypatch.setattr(sampling, "sample_images", nan_images)
    with pytest.raises(ValueError, match=r"^sampling from checkpoint 3 gave non-finite values in 1 of 6 images "
                                         r"\(config\.sample: .*\); nothing written"):
        sampling.run_sample_mode(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "samples")
