"""Each checkpoint stores the whole config and the package versions; a resume
whose config changed in a field that changes what the network learns or how
stops with one line naming the field, old and new value and the override."""

import os
import sys

import flax
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import smoke  # noqa: E402

import diffusion_jax  # noqa: E402
from diffusion_jax.train import checkpoints  # noqa: E402
from diffusion_jax.train.state import make_optimizer  # noqa: E402

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
PARAMS = {"w": np.arange(3, dtype=np.float32)}


def _state(training):
    tx, _ = make_optimizer(training)
    return {"step": np.int32(5), "params": PARAMS, "ema_params": {"w": PARAMS["w"] + 1},
            "opt_state": jax.tree.map(np.asarray, tx.init(PARAMS))}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=SHARDING),
                        state)


@pytest.fixture
def workdir(tmp_path):
    config = smoke.get_config()
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(5, _state(config.training), {"next_batch": 5}, config)
    ckpt.close()
    return tmp_path


def _resume(workdir, config, **kw):
    ckpt = checkpoints.Checkpointer(str(workdir))
    try:
        return ckpt.resume(_abstract(_state(config.training)), config=config, **kw)
    finally:
        ckpt.close()


def test_checkpoint_stores_full_config_and_versions(workdir):
    ckpt = checkpoints.Checkpointer(str(workdir), read_only=True)
    saved = ckpt.saved_config(5)
    assert saved == checkpoints.config_dict(smoke.get_config())
    assert saved["diffusion"]["num_timesteps"] == 100 and saved["training"]["learning_rate"] == 1e-3
    assert ckpt.saved_versions(5) == {
        "diffusion_jax": diffusion_jax.__version__, "jax": jax.__version__, "flax": flax.__version__,
        "optax": optax.__version__, "orbax-checkpoint": ocp.__version__}
    ckpt.close()


def _set(config, field, value):
    *path, name = field.split(".")
    node = config
    for p in path:
        node = node[p]
    with config.unlocked():
        node[name] = value


DRIFT = [  # (field, new value): each changes what the network learns or how
    ("diffusion.schedule", "cosine"),
    ("diffusion.prediction", "v"),
    ("diffusion.schedule_kwargs.beta_end", 0.1),
    ("diffusion.process", "vp"),  # a field the checkpoint does not know (added to the code later)
    ("training.optimizer", "adamw"),
    ("training.grad_clip_norm", 0.0),
    ("training.learning_rate", 2e-3),
    ("training.batch_size", 16),
    ("training.ema_decay", 0.99),
    ("data.dataset", "mnist"),
    ("data.random_flip", True),
    ("seed", 1),
]


@pytest.mark.parametrize("field,value", DRIFT, ids=[d[0] for d in DRIFT])
def test_changed_field_stops_resume_with_one_line(workdir, field, value):
    config = smoke.get_config()
    old = checkpoints._flatten(checkpoints.config_dict(config)).get(field, "<absent>")
    _set(config, field, value)
    with pytest.raises(ValueError) as e:
        _resume(workdir, config)
    text = str(e.value)
    assert "\n" not in text
    assert f"{field}: checkpoint {old!r} vs config {value!r}" in text
    assert "--allow_config_change" in text


@pytest.mark.parametrize("field", sorted(checkpoints.ADDED_FIELDS))
def test_a_checkpoint_older_than_an_added_field_resumes_at_its_default(field):
    """A field added to the code after a checkpoint was written is absent from its saved
    config; it compares as ADDED_FIELDS' stand-in, which must be the default config's value
    (else every older run would stop on resume), and a non-default value is still a change."""
    from experiments import default

    section = field.split(".")[0]
    for name in ("unet", "dit"):
        config = default.get_config(name)
        current = checkpoints._flatten(checkpoints.config_dict(config))
        if field not in current:
            continue
        assert current[field] == checkpoints.ADDED_FIELDS[field], (name, field)
        saved = checkpoints.config_dict(config)
        node = saved
        for part in field.split(".")[:-1]:
            node = node[part]
        del node[field.split(".")[-1]]
        assert section in saved and checkpoints.diff_configs(saved, checkpoints.config_dict(config)) == []
        other = not current[field] if isinstance(current[field], bool) else (
            current[field] + "_other" if isinstance(current[field], str) else current[field] + 1)
        _set(config, field, other)
        flat = checkpoints._flatten(checkpoints.config_dict(config))
        unused = checkpoints._resumable(field, flat, flat)  # e.g. diffusion.flow.* when the process is ddpm
        changed = [c.field for c in checkpoints.diff_configs(saved, checkpoints.config_dict(config))]
        assert changed == ([] if unused else [field]), (name, field, changed)


def test_field_removed_from_config_is_a_change(workdir):
    config = smoke.get_config()
    with config.unlocked():
        del config.diffusion["vlb_weight"]
    with pytest.raises(ValueError, match=r"diffusion\.vlb_weight: checkpoint 0\.001 vs config '<absent>'"):
        _resume(workdir, config)


SAFE = [
    ("training.num_steps", 60), ("training.log_every_steps", 1), ("training.checkpoint_every_steps", 7),
    ("training.sample_every_steps", 2), ("training.keep_checkpoints", 9),
    ("training.async_checkpointing", False), ("training.progress_bar", True),
    ("data.data_dir", "/elsewhere"), ("data.source", "records"), ("model.dropout", 0.1), ("sample.method", "ddpm"),
    ("sample.num_steps", 10), ("eval.num_samples", 4), ("parallel.num_processes", 4), ("experiment", "renamed"),
]


@pytest.mark.parametrize("field,value", SAFE, ids=[s[0] for s in SAFE])
def test_bookkeeping_fields_may_change(workdir, field, value):
    config = smoke.get_config()
    _set(config, field, value)
    restored = _resume(workdir, config)
    assert restored.step == 5 and restored.changes == [] and not restored.opt_state_reset


def test_num_steps_moves_a_decaying_schedule(tmp_path):
    config = smoke.get_config()
    config.training.lr_schedule = "cosine"
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(5, _state(config.training), {"next_batch": 5}, config)
    ckpt.close()
    config.training.num_steps = 60
    with pytest.raises(ValueError, match=r"training\.num_steps: checkpoint 6 vs config 60"):
        _resume(tmp_path, config)


def test_model_change_is_never_allowed(workdir):
    config = smoke.get_config()
    config.model.ch = 16
    with pytest.raises(ValueError, match=r"different model config \(model\.ch: checkpoint 8 vs config 16\)"):
        _resume(workdir, config, allow_config_change=True)


def test_allowed_optimizer_change_keeps_params_and_resets_its_state(workdir):
    config = smoke.get_config()
    config.training.optimizer = "adamw"
    config.training.grad_clip_norm = 0.0  # the optimiser state's tree changes
    restored = _resume(workdir, config, allow_config_change=True)
    assert restored.step == 5 and restored.opt_state_reset
    assert [c.field for c in restored.changes] == ["training.grad_clip_norm", "training.optimizer"]
    np.testing.assert_array_equal(np.asarray(restored.state["params"]["w"]), PARAMS["w"])
    np.testing.assert_array_equal(np.asarray(restored.state["ema_params"]["w"]), PARAMS["w"] + 1)
    assert int(restored.state["step"]) == 5 and "opt_state" not in restored.state


def test_allowed_change_with_same_tree_restores_everything(workdir):
    config = smoke.get_config()
    config.training.learning_rate = 5e-4
    restored = _resume(workdir, config, allow_config_change=True)
    assert not restored.opt_state_reset and [str(c) for c in restored.changes] == [
        "training.learning_rate: checkpoint 0.001 vs config 0.0005"]


def test_checkpoint_of_an_older_version_compares_the_model_only(tmp_path):
    config = smoke.get_config()
    mgr = ocp.CheckpointManager(tmp_path / "checkpoints", item_handlers={
        "state": ocp.StandardCheckpointHandler(), "data": checkpoints.DataStateHandler(),
        "model_config": ocp.JsonCheckpointHandler()})
    mgr.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(_state(config.training)),
                                        data=checkpoints.DataStateSave({"next_batch": 5}),
                                        model_config=ocp.args.JsonSave(checkpoints.config_dict(config)["model"])))
    mgr.wait_until_finished()
    mgr.close()
    config.diffusion.schedule = "cosine"
    assert _resume(tmp_path, config).step == 5
    config.model.ch = 16
    with pytest.raises(ValueError, match=r"model\.ch: checkpoint 8 vs config 16"):
        _resume(tmp_path, config)


def test_launch_stops_on_a_changed_optimizer_and_resumes_with_the_flag(tmp_path, env):
    """End to end through launch.py: without the flag one line names the fields; with
    --allow_config_change the run continues (parameters kept, the new optimiser's state fresh).
    env: tests/conftest.py (cheap compiles, the run's shared compilation cache)."""
    import json
    import subprocess

    workdir = str(tmp_path / "run")
    base = [sys.executable, "launch.py", "--config", os.path.join(REPO, "experiments", "smoke.py"),
            "--workdir", workdir, "--config.training.checkpoint_every_steps=2"]

    def launch(*flags):
        return subprocess.run([*base, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    first = launch("--config.training.num_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    changed = ("--config.training.num_steps=4", "--config.training.optimizer=adamw",
               "--config.training.grad_clip_norm=0.0")
    refused = launch(*changed)
    assert refused.returncode != 0
    (line,) = [l for l in refused.stderr.splitlines() if "was written by a different config" in l]
    assert ("training.grad_clip_norm: checkpoint 1.0 vs config 0.0; "
            "training.optimizer: checkpoint 'adam' vs config 'adamw'") in line and "--allow_config_change" in line
    allowed = launch(*changed, "--allow_config_change")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "optimiser state of checkpoint 2 does not fit" in allowed.stderr
    starts = [json.loads(l) for l in open(os.path.join(workdir, "restarts.jsonl"))]
    assert [s["resumed_from"] for s in starts] == [None, 2] and starts[1]["optimizer_state_reset"]
    assert len(starts[1]["config_changes"]) == 2
    assert [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))] == [2, 4]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_knobs_of_a_process_neither_run_uses_may_change():
    from diffusion_jax.train import checkpoints
    from experiments import smoke

    saved = checkpoints.config_dict(smoke.get_config())
    config = smoke.get_config()
    config.diffusion.edm.sigma_data = 0.7  # process is ddpm: EDM's knobs are not read
    assert checkpoints.diff_configs(saved, checkpoints.config_dict(config)) == []
    config.diffusion.process = "edm"
    fields = {c.field for c in checkpoints.diff_configs(saved, checkpoints.config_dict(config))}
    assert {"diffusion.process", "diffusion.edm.sigma_data"} <= fields
