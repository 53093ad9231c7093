"""Shared by the evaluation tests: labelled toy images and the tiny classifier architecture."""

from __future__ import annotations

import numpy as np

TINY_ARCH = {"widths": [8], "convs_per_block": 1, "hidden": 16}


def _class_images(rng, n, num_classes=4, size=8):
    """Synthetic uint8 images: class k is a bright square in quadrant k, plus noise."""
    labels = rng.integers(0, num_classes, n)
    images = np.full((n, size, size, 1), 30.0)
    half = size // 2
    for k in range(num_classes):
        r, c = divmod(k, 2)
        images[labels == k, r * half:(r + 1) * half, c * half:(c + 1) * half] = 220.0
    images += 20.0 * rng.standard_normal(images.shape)
    return np.clip(np.round(images), 0, 255).astype(np.uint8), labels
