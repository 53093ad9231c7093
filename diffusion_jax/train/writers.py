"""Scalars to TensorBoard and metrics.jsonl, and image grids to PNG.

Only process 0 writes (`MetricWriter(..., active=jax.process_index() == 0)`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image

from diffusion_jax.images import tile, to_uint8


def save_image_grid(path: str, images: np.ndarray, ncol: int) -> np.ndarray:
    """Writes images in [-1, 1] as a PNG grid with `ncol` columns; returns the uint8 grid."""
    grid = tile(to_uint8(images), ncol)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return grid


class MetricWriter:
    """Appends {"step": s, **scalars} lines to <workdir>/metrics.jsonl and writes
    the same scalars (prefixed "train/") and images to TensorBoard event files in
    <workdir>/tensorboard."""

    def __init__(self, workdir: str, *, active: bool = True):
        self.active = active
        if not active:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.active:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
        self._jsonl.flush()
        for k, v in scalars.items():
            self._tb.add_scalar(f"train/{k}", v, int(step))

    def write_image(self, step: int, tag: str, grid_uint8: np.ndarray) -> None:
        if self.active:
            self._tb.add_image(tag, grid_uint8, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self.active:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.active:
            self._jsonl.close()
            self._tb.close()
            self.active = False
