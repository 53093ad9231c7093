"""The sample-quality sweep (diffusion_jax.evaluation.quality): floor vs noise, table and plot."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from diffusion_jax.evaluation import classifier, quality
from evaluation_support import _class_images


# ----------------------------------------------------------------------------- floor vs noise


def _random_feature_map(dim=16, num_classes=4, size=8, seed=0):
    """A fixed random ReLU feature map and a linear class read-out, as a stand-in classifier."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((size * size, dim)) / size
    v = rng.standard_normal((dim, num_classes))

    def apply_fn(images):
        x = classifier.to_model_input(images).reshape(len(images), -1).astype(np.float64)
        f = np.maximum(x @ w, 0.0)
        logits = f @ v
        p = np.exp(logits - logits.max(1, keepdims=True))
        return f, p / p.sum(1, keepdims=True)

    return apply_fn


def test_test_set_samples_score_at_the_floor_and_noise_far_worse():
    rng = np.random.default_rng(4)
    train, _ = _class_images(rng, 3000)
    test, test_labels = _class_images(rng, 2000)
    apply_fn = _random_feature_map()
    ref = quality.make_reference(apply_fn, test, train, num_samples=500, num_classes=4,
                                 kid_subsets=10, kid_subset_size=500)
    from_test = quality.score(apply_fn, test[rng.choice(len(test), 500, replace=False)], ref)
    noise = quality.score(apply_fn, rng.uniform(-1, 1, (500, 8, 8, 1)).astype(np.float32), ref)
    floor = ref.floor
    assert floor["fd"] > 0
    # Test-set samples are as good as train samples (same distribution, same sample size).
    assert from_test["fd"] < 1.5 * floor["fd"]
    assert abs(from_test["kid"]) < 5 * floor["kid_std"] + abs(floor["kid"])
    # Pure noise: orders of magnitude worse.
    assert noise["fd"] > 50 * floor["fd"]
    assert noise["kid"] > 50 * (abs(floor["kid"]) + floor["kid_std"])


def test_sweep_table_and_plot(tmp_path):
    rng = np.random.default_rng(5)
    train, _ = _class_images(rng, 600)
    test, _ = _class_images(rng, 600)
    apply_fn = _random_feature_map()
    ref = quality.make_reference(apply_fn, test, train, num_samples=100, num_classes=4,
                                 kid_subsets=2, kid_subset_size=100)

    def generate(sampler, steps, guidance, labels, seed):
        # "Better" with more steps: less noise mixed into real images.
        base = classifier.to_model_input(_class_images(np.random.default_rng(seed), len(labels))[0])
        return np.clip(base + (1.0 / steps) * rng.standard_normal(base.shape), -1, 1)

    settings = quality.settings_from(["ddim", "ddpm"], [1, 10], 1.0, [0.0, 1.0, 2.0], "ddim", 10)
    assert len(settings) == 6  # (ddim, 10, 1.0) appears once
    rows = quality.sweep(generate, apply_fn, ref, settings, num_samples=100, conditional=True)
    by = {(r["sampler"], r["steps"], r["guidance"]): r for r in rows}
    assert by[("ddim", 1, 1.0)]["fd"] > by[("ddim", 10, 1.0)]["fd"]
    assert all(0 <= r["conditional_accuracy"] <= 1 for r in rows)
    md, js = quality.write_table(rows, ref.floor, str(tmp_path))
    table = open(md).read()
    assert table.count("\n") == 2 + 1 + len(rows) and "floor" in table
    assert len(json.load(open(js))["rows"]) == len(rows)
    pytest.importorskip("matplotlib")
    png = quality.plot(rows, ref.floor, str(tmp_path / "q.png"))
    assert os.path.getsize(png) > 1000
