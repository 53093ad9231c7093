"""Pictures of a trained model: training-loss curve, per-class sample grid, denoising strip.

Image grids are drawn with PIL (uint8, nearest-neighbour upscaling); the loss
curve with matplotlib (Agg backend, imported only when plotting).
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from diffusion_jax import images as image_lib


def _to_uint8(images) -> np.ndarray:
    images = np.asarray(images)
    return images if images.dtype == np.uint8 else image_lib.to_uint8(images)


def grid(images, ncol: int, *, pad: int = 2, scale: int = 2, background: int = 255) -> Image.Image:
    """Tile images [N,H,W,C] (uint8 or float in [-1, 1]) row-major into `ncol` columns."""
    images = _to_uint8(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N,H,W,C] with C in (1, 3), got {images.shape}")
    canvas = image_lib.tile(images, ncol, pad=pad, background=background)
    picture = Image.fromarray(canvas[..., 0] if images.shape[-1] == 1 else canvas)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _with_header(picture: Image.Image, labels: Sequence[str], cell_width: int, *, height: int = 14,
                 offset: int = 0) -> Image.Image:
    """Add a strip of text labels above a grid, one per column."""
    out = Image.new(picture.mode, (picture.width, picture.height + height), 255)
    out.paste(picture, (0, height))
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(labels):
        draw.text((offset + i * cell_width + 2, 1), text, fill=0)
    return out


def save_class_grid(images, labels, path: str, *, num_classes: int, per_class: int) -> str:
    """PNG with one row per class: `per_class` images generated for label k in row k.

    images [N,H,W,C] with labels [N]; for an unconditional model pass labels=None and
    the images fill a square-ish grid.
    """
    images = _to_uint8(images)
    if labels is None:
        ordered, ncol = images, per_class
    else:
        labels = np.asarray(labels)
        rows = []
        for k in range(num_classes):
            chosen = images[labels == k][:per_class]
            if len(chosen) < per_class:
                raise ValueError(f"class {k} has {len(chosen)} images, need per_class={per_class}")
            rows.append(chosen)
        ordered, ncol = np.concatenate(rows), per_class
    grid(ordered, ncol).save(path)
    return path


def save_denoising_strip(trajectory, timesteps, path: str, *, num_columns: int = 8) -> str:
    """PNG: rows = samples, columns = x_t at `num_columns` points of the reverse process.

    trajectory [S+1, B, H, W, C] from `samplers.draw(..., return_trajectory=True)`: entry
    0 is the start noise, entry i < S the state fed to the model at timesteps[i], entry S
    the final sample. Columns are labelled in the papers' 1-based notation (index t is
    x_{t+1}; the final column is x_0).
    """
    trajectory = np.asarray(trajectory)
    timesteps = np.asarray(timesteps)
    num_states = trajectory.shape[0]
    if timesteps.shape != (num_states - 1,):
        raise ValueError(f"need len(timesteps) == trajectory.shape[0] - 1, got {timesteps.shape} "
                         f"and {trajectory.shape}")
    picks = np.unique(np.round(np.linspace(0, num_states - 1, min(num_columns, num_states))).astype(int))
    h, w = trajectory.shape[2:4]
    # [B, columns, H, W, C] in row-major order: one row per sample.
    cells = np.clip(trajectory[picks], -1.0, 1.0).transpose(1, 0, 2, 3, 4).reshape(-1, h, w, trajectory.shape[-1])
    scale, pad = 3, 2
    picture = grid(cells, len(picks), pad=pad, scale=scale)
    labels = [f"x{timesteps[i] + 1}" if i < num_states - 1 else "x0" for i in picks]
    _with_header(picture, labels, (w + pad) * scale, offset=pad * scale).save(path)
    return path


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl (one JSON object per line); unreadable lines are skipped."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interrupted write
    return rows


def save_loss_curve(metrics_path: str, path: str) -> str | None:
    """PNG of every scalar whose name contains "loss" against "step" (log y axis, with a
    moving average over ~5% of the points). Returns None when there is nothing to plot."""
    if not os.path.exists(metrics_path):
        return None
    rows = [r for r in read_metrics(metrics_path) if "step" in r]
    keys = sorted({k for r in rows for k, v in r.items() if "loss" in k and isinstance(v, (int, float))})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = sorted((r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)))
        steps, values = np.array(pts, np.float64).T
        line, = ax.plot(steps, values, alpha=0.35, lw=1)
        window = max(1, len(values) // 20)
        if window > 1:
            smooth = np.convolve(values, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=line.get_color(), lw=2, label=f"{key} (moving avg)")
        else:
            line.set_label(key)
    if all(np.all(np.array([r[k] for r in rows if k in r]) > 0) for k in keys):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
