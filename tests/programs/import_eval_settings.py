"""Run by tests/test_evaluation_settings.py in a fresh interpreter: the experiment defaults and
the evaluation knobs load without jax. Prints "ok" when they do."""

import sys

from diffusion_jax.evaluation import EVAL_DEFAULTS, eval_settings  # noqa: F401
from diffusion_jax.evaluation.settings import PARTS

assert "jax" not in sys.modules, sorted(m for m in sys.modules if m.startswith("jax"))
assert set(PARTS) == set(EVAL_DEFAULTS["parts"])
print("ok")
