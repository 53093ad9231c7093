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


def truncate_metrics(path: str, last_step: int) -> int:
    """Drops the lines of a metrics.jsonl with step > last_step (and a torn last
    line), rewriting the file atomically; returns how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    keep, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                ok = int(json.loads(line)["step"]) <= last_step
            except (ValueError, KeyError, TypeError):
                ok = False
            if ok:
                keep.append(line)
            else:
                dropped += 1
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


class MetricWriter:
    """Appends {"step": s, **scalars} lines to <workdir>/metrics.jsonl and writes
    the same scalars (prefixed "train/") and images to TensorBoard event files in
    <workdir>/tensorboard.

    `start_step`: the step training continues from (0 on a fresh start). What
    an earlier run logged after it (steps it did again after a resume) is
    dropped: from metrics.jsonl here, from TensorBoard by its purge_step, so
    each step appears once."""

    def __init__(self, workdir: str, *, active: bool = True, start_step: int = 0):
        self.active = active
        if not active:
            return
        from tensorboardX import SummaryWriter

        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        truncate_metrics(path, start_step)
        self._jsonl = open(path, "a")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=start_step + 1)

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
