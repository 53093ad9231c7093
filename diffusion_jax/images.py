"""Pixel conversions and image grids shared by training, sampling and evaluation (numpy only).

Models see images as float32 in [-1, 1]; stored images are uint8 levels
0..255 with level k at k / 127.5 - 1.
"""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float -> [0, 255] uint8, rounded to the nearest level (as a sample becomes a stored image)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def to_float(images) -> np.ndarray:
    """uint8 levels [0, 255] -> float32 in [-1, 1] on the grid k / 127.5 - 1."""
    return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def tile(images: np.ndarray, ncol: int, *, pad: int = 2, background: int = 0) -> np.ndarray:
    """uint8 [N, H, W, C] -> one uint8 [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] image,
    filled row by row, `pad` pixels of `background` between and around the tiles."""
    n, h, w, c = images.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), background, np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid
