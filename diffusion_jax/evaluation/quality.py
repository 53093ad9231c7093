"""Sample quality against sampler, number of steps and guidance scale.

A *reference* holds the classifier's penultimate features of the test set and the
floor: the same metrics for `num_samples` train images against the test set (what
a perfect generator of that sample size would score). `score` puts a set of
generated images through the same classifier; `sweep` does so for each setting
(sampler, steps, guidance) and `write_table` / `plot` report the result.

Generated images are quantised to uint8 before scoring, as they would be stored.

Features are divided by one constant per reference, the root-mean-square of the test
features: the classifier's feature scale is arbitrary (unlike Inception's pool features,
for which the KID kernel (x.y/d + 1)^3 was designed), and without it the cubic kernel is
dominated by feature norms. FD is then in units of that RMS squared; every row and the
floor share the scale, so they compare directly.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from diffusion_jax.evaluation import metrics
from diffusion_jax.images import to_uint8 as quantize

# (name in the result dict, column header, format)
COLUMNS = (
    ("sampler", "sampler", "{}"),
    ("steps", "NFE budget", "{}"),
    ("sampler_steps", "steps", "{}"),
    ("nfe", "NFE", "{}"),
    ("guidance", "guidance w", "{:g}"),
    ("fd", "classifier FD", "{:.3f}"),
    ("kid", "KID x1e3", "{:.3f}"),
    ("inception_score", "IS analogue", "{:.3f}"),
    ("conditional_accuracy", "cond. acc.", "{:.4f}"),
    ("worst_class_accuracy", "worst class", "{:.3f}"),
    ("seconds", "time (s)", "{:.0f}"),
)


@dataclass
class Reference:
    """Test-set features and the train-vs-test floor, computed once per evaluation."""

    test_features: np.ndarray  # already divided by feature_scale
    floor: dict
    num_classes: int
    kid_subsets: int
    kid_subset_size: int
    feature_scale: float = 1.0


def score(apply_fn: Callable, images, reference: Reference, *, labels=None) -> dict:
    """Metrics of images (uint8, or float in [-1, 1]) against the reference test features.

    apply_fn: images -> (features [N, d], probs [N, classes]) (classifier.make_apply_fn).
    labels: the class each image was generated for (conditional models), else None.
    Returns fd, kid, kid_std, inception_score and, with labels, conditional_accuracy, its value
    per class (conditional_accuracy_per_class) and the lowest of those (worst_class_accuracy).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = quantize(images)
    features, probs = apply_fn(images)
    features = features / reference.feature_scale
    kid, kid_std = metrics.kernel_inception_distance(
        features, reference.test_features, num_subsets=reference.kid_subsets,
        subset_size=reference.kid_subset_size)
    result = {
        "num_samples": int(images.shape[0]),
        "fd": metrics.frechet_distance_from_features(features, reference.test_features),
        "kid": kid, "kid_std": kid_std,
        "inception_score": metrics.inception_score(probs)[0],
    }
    if labels is not None:
        result["conditional_accuracy"] = metrics.conditional_accuracy(probs, labels)
        per_class = metrics.conditional_accuracy_per_class(probs, labels, probs.shape[1])
        result["conditional_accuracy_per_class"] = per_class
        result["worst_class_accuracy"] = min(a for a in per_class if a is not None)
    return result


def make_reference(apply_fn: Callable, test_images, train_images, *, num_samples: int,
                   num_classes: int, train_labels=None, seed: int = 0, kid_subsets: int = 20,
                   kid_subset_size: int = 1000) -> Reference:
    """Test features, and the floor: `num_samples` random train images scored against them.

    FD is biased upwards at small sample sizes, so the floor uses the same number of
    images as each generated set; it is what a sampler of the true distribution would get.
    With `train_labels`, the floor's conditional accuracy is the classifier's accuracy on
    those train images (the best a conditional sampler can be credited with).
    """
    if num_samples > len(train_images):
        raise ValueError(f"eval.num_samples={num_samples} exceeds the {len(train_images)} train images")
    test_features, _ = apply_fn(test_images)
    scale = float(np.sqrt(np.mean(np.square(test_features)))) or 1.0
    reference = Reference(test_features / scale, {}, num_classes, kid_subsets, kid_subset_size, scale)
    idx = np.random.default_rng(seed).choice(len(train_images), num_samples, replace=False)
    labels = None if train_labels is None else np.asarray(train_labels)[idx]
    reference.floor = score(apply_fn, np.asarray(train_images)[idx], reference, labels=labels)
    return reference


def settings_from(samplers: Sequence[str], steps: Sequence[int], guidance_scale: float,
                  guidance_scales: Sequence[float] = (), guidance_sampler: str | None = None,
                  guidance_steps: int | None = None) -> list[dict]:
    """The sweep: every sampler x steps at `guidance_scale`, then `guidance_scales` at
    (guidance_sampler, guidance_steps); duplicates dropped, order kept."""
    out = [dict(sampler=s, steps=int(n), guidance=float(guidance_scale)) for s in samplers for n in steps]
    if guidance_sampler is not None:
        out += [dict(sampler=guidance_sampler, steps=int(guidance_steps), guidance=float(w))
                for w in guidance_scales]
    unique = []
    for s in out:
        if s not in unique:
            unique.append(s)
    return unique


def sweep(generate: Callable, apply_fn: Callable, reference: Reference, settings: Sequence[dict],
          *, num_samples: int, conditional: bool, seed: int = 0,
          log: Callable[[str], None] | None = None) -> list[dict]:
    """Score `num_samples` images from `generate(sampler, steps, guidance, labels, seed)` per
    setting (`steps`: the setting's NFE budget).

    Conditional models get balanced labels (i mod num_classes); every setting uses the
    same seed, so rows differ only in sampler, steps and guidance.
    """
    labels = np.arange(num_samples) % reference.num_classes if conditional else None
    rows = []
    for s in settings:
        start = time.time()
        images = generate(s["sampler"], s["steps"], s["guidance"], labels, seed)
        seconds = time.time() - start
        row = dict(s, **score(apply_fn, images, reference, labels=labels), seconds=round(seconds, 1))
        rows.append(row)
        if log:
            log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    return ", ".join(f"{head}={fmt.format(row[key] * (1e3 if key == 'kid' else 1))}"
                     for key, head, fmt in COLUMNS if key in row)


def markdown_table(rows: Sequence[dict], floor: dict) -> str:
    """Markdown table of the sweep with the train-vs-test floor as the first row."""
    keys = [c for c in COLUMNS if any(c[0] in r for r in rows) or c[0] in floor]
    lines = ["| " + " | ".join(head for _, head, _ in keys) + " |",
             "|" + "---|" * len(keys)]
    floor_row = dict(floor, sampler="floor: train vs test", steps="-", sampler_steps="-", nfe="-", guidance="-")
    for row in [floor_row, *rows]:
        cells = []
        for key, _, fmt in keys:
            value = row.get(key)
            if value is None or isinstance(value, str) and fmt != "{}":
                cells.append("-" if value is None else str(value))
            else:
                cells.append(fmt.format(value * 1e3 if key == "kid" else value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict], floor: dict, out_dir: str, *, name: str = "quality",
                extra: dict | None = None) -> tuple[str, str]:
    """Write <name>.md and <name>.json under out_dir; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, json_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.json")
    with open(md_path, "w") as f:
        f.write(markdown_table(rows, floor))
    with open(json_path, "w") as f:
        json.dump(dict(extra or {}, floor=floor, rows=list(rows)), f, indent=2)
    return md_path, json_path


def plot(rows: Sequence[dict], floor: dict, path: str) -> str:
    """PNG: classifier FD (and conditional accuracy if present) against steps, one line per
    (sampler, guidance); the floor as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fd", "classifier FD (lower is better)")]
    if any("conditional_accuracy" in r for r in rows):
        panels.append(("conditional_accuracy", "conditional accuracy"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    groups = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["guidance"]), []).append(r)
    for ax, (key, title) in zip(axes[0], panels):
        for (sampler, w), group in groups.items():
            group = sorted(group, key=lambda r: r["steps"])
            style = "o-" if len(group) > 1 else "s"
            ax.plot([r["steps"] for r in group], [r[key] for r in group], style, label=f"{sampler}, w={w:g}")
        if key in floor:
            ax.axhline(floor[key], color="k", ls="--", lw=1, label="train vs test (floor)")
        ax.set_xscale("log")
        ticks = sorted({r["steps"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        if key == "fd" and all(r[key] > 0 for r in rows):
            ax.set_yscale("log")
        ax.set_xlabel("sampler steps (network evaluations per image, x2 with guidance)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
