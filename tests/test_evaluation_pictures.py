"""PNG outputs of diffusion_jax.evaluation.pictures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffusion_jax.evaluation import pictures


def test_pictures(tmp_path):
    rng = np.random.default_rng(7)
    images = rng.uniform(-1, 1, (12, 8, 8, 1)).astype(np.float32)
    labels = np.repeat(np.arange(3), 4)
    path = pictures.save_class_grid(images, labels, str(tmp_path / "g.png"), num_classes=3, per_class=4)
    from PIL import Image

    assert Image.open(path).size == (2 * (4 * 10 + 2), 2 * (3 * 10 + 2))
    traj = rng.uniform(-1, 1, (11, 3, 8, 8, 1))
    strip = pictures.save_denoising_strip(traj, np.arange(10)[::-1] * 100, str(tmp_path / "s.png"), num_columns=6)
    assert Image.open(strip).size[0] == 3 * (6 * 10 + 2)  # scale 3
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 60):
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-3}) + "\n")
        f.write('{"step": 60, "lo')  # a line cut by an interrupted write is skipped
    pytest.importorskip("matplotlib")
    assert os.path.getsize(pictures.save_loss_curve(str(tmp_path / "metrics.jsonl"), str(tmp_path / "l.png"))) > 1000
    assert pictures.save_loss_curve(str(tmp_path / "none.jsonl"), str(tmp_path / "n.png")) is None
