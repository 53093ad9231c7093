"""Experiment configs: each module's `get_config()` returns an ml_collections.ConfigDict
built from `experiments.default` plus a few overrides (`launch.py --config experiments/<name>.py`)."""
