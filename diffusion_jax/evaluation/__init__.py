"""Evaluation of a trained diffusion model: likelihood, sample quality, pictures.

    evaluate(config, workdir)        # what `launch.py --mode eval` calls

writes under workdir/eval/:

    bpd.json                 test-set bits/dim (ddpm: variational bound; edm, flow, vp: the
                             probability-flow ODE), standard error
    quality.md, quality.json classifier-FD, KID, IS analogue, conditional accuracy per
                             (sampler, steps, guidance), with the train-vs-test floor
    quality.png              those metrics against sampler steps
    loss.png                 training loss from workdir/metrics.jsonl
    samples_per_class.png    one row per class (or a square grid if unconditional)
    denoising_strip.png      x_t at several t of the reverse process, a few samples
    summary.json, summary.md everything above in one place, with timings

Modules: `settings` (EVAL_DEFAULTS, eval_settings; no jax), `runner`
(evaluate, Generator), `report` (summary.md), `metrics` (Frechet distance,
KID, IS analogue, conditional accuracy), `classifier` (the feature network,
trained by `python -m diffusion_jax.evaluation.classifier --dataset mnist`),
`likelihood`, `quality` (the sweep), `pictures`.

Knobs are read from `config.eval` with the defaults in `EVAL_DEFAULTS` (see
`eval_settings`); absent fields take their default.
"""

from __future__ import annotations

import importlib

from diffusion_jax.evaluation.settings import EVAL_DEFAULTS, PARTS, eval_settings

# Everything else loads on first use, so `settings` (no jax) is all that
# `import diffusion_jax.evaluation` costs; experiments/default.py relies on it.
_LAZY = {"evaluate": "runner", "Generator": "runner", "load_split": "runner", "summary_markdown": "report"}
_SUBMODULES = ("classifier", "likelihood", "metrics", "pictures", "quality", "report", "runner")

__all__ = ["EVAL_DEFAULTS", "PARTS", "Generator", "classifier", "eval_settings", "evaluate", "likelihood",
           "load_split", "metrics", "pictures", "quality", "summary_markdown"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
