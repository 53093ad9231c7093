"""The evaluation classifier (diffusion_jax.evaluation.classifier): training, saving, shifts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffusion_jax.evaluation import classifier
from evaluation_support import TINY_ARCH, _class_images


def test_classifier_trains_saves_and_loads(tmp_path):
    rng = np.random.default_rng(6)
    train_split, test_split = _class_images(rng, 1024), _class_images(rng, 256)
    meta = classifier.train_and_save("toy", str(tmp_path), arrays={"train": train_split, "test": test_split},
                                     epochs=3, batch_size=32, arch=TINY_ARCH, log=None)
    assert meta["test_accuracy"] > 0.95 and meta["num_classes"] == 4
    assert sorted(os.listdir(tmp_path)) == [classifier.META_FILE, classifier.PARAMS_FILE]  # no temp files
    model, params, loaded_meta = classifier.load(str(tmp_path))
    assert loaded_meta == json.loads(json.dumps(meta))
    feats, probs = classifier.make_apply_fn(model, params, batch_size=100)(test_split[0])
    assert feats.shape == (256, TINY_ARCH["hidden"]) and probs.shape == (256, 4)
    assert np.mean(probs.argmax(1) == test_split[1]) == pytest.approx(meta["test_accuracy"])
    with pytest.raises(FileNotFoundError, match="classifier"):
        classifier.load(str(tmp_path / "missing"))


def test_random_shift_translates_each_image_with_black_fill():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(64, 7, 6, 2)).astype(np.float32)
    got = classifier.random_shift(x, 2, np.random.default_rng(11))
    dy, dx = np.random.default_rng(11).integers(-2, 3, size=(2, 64))  # the same draws
    assert got.shape == x.shape and len({(a, b) for a, b in zip(dy, dx)}) > 10
    for k in range(64):
        want = np.full_like(x[k], -1.0)
        for i in range(7):
            for j in range(6):
                if 0 <= i - dy[k] < 7 and 0 <= j - dx[k] < 6:
                    want[i, j] = x[k, i - dy[k], j - dx[k]]
        np.testing.assert_array_equal(got[k], want)
    assert classifier.random_shift(x, 0, rng) is x
