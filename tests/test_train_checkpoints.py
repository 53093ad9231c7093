"""Checkpointer: damaged or empty newest steps are skipped, killed saves' temporary
folders removed, a failed background save reported at the next check, and the
EMA parameters restored alone. Small pytrees; no model compile."""

import logging
import os
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import smoke  # noqa: E402

from diffusion_jax import models  # noqa: E402
from diffusion_jax.train import checkpoints  # noqa: E402
from diffusion_jax.train.state import dummy_inputs  # noqa: E402

SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
ABSTRACT = {"w": jax.ShapeDtypeStruct((3,), np.float32, sharding=SHARDING)}


def _save_steps(workdir, steps, keep=5):
    ckpt = checkpoints.Checkpointer(str(workdir), keep=keep, async_save=False)
    for s in steps:
        ckpt.save(s, {"w": np.full((3,), s, np.float32)}, {"next_batch": s}, smoke.get_config())
        ckpt.wait()
    ckpt.close()
    return workdir / "checkpoints"


def _restore(workdir):
    ckpt = checkpoints.Checkpointer(str(workdir), keep=5)
    try:
        return ckpt.resume(ABSTRACT, config=smoke.get_config())
    finally:
        ckpt.close()


def _largest_file(directory):
    files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
    return max(files, key=os.path.getsize)


def test_damaged_and_empty_newest_steps_fall_back_to_the_newest_that_restores(tmp_path, caplog):
    d = _save_steps(tmp_path, [1, 2])
    path = _largest_file(d / "2" / "state")  # the array data of step 2, cut short
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
    (d / "99").mkdir()  # an empty step directory
    with caplog.at_level(logging.WARNING):
        restored = _restore(tmp_path)
    assert restored.step == 1
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), [1, 1, 1])
    assert restored.data_state == {"next_batch": 1}
    skipped = [r.getMessage() for r in caplog.records if "does not restore, skipping it" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoints/99 " in skipped[0] and "checkpoints/2 " in skipped[1]
    assert all("\n" not in m for m in skipped)


def test_damaged_latest_step_is_moved_aside_and_never_blocks_a_later_save(tmp_path, caplog):
    """Issue #21 (checkpoint_every_steps=2, keep_checkpoints=3, the largest file of step 6 cut to
    16 bytes, then on to step 9): the resume restores step 4 and moves step 6 to
    checkpoints/damaged/6 (logged, kept); saving 6, 8 and 9 again works (it stopped with
    StepAlreadyExistsError) and step 6 is never the damaged one again."""
    d = _save_steps(tmp_path, [2, 4, 6], keep=3)
    path = _largest_file(d / "6")
    with open(path, "r+b") as f:
        f.truncate(16)
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3, async_save=False)
    with caplog.at_level(logging.WARNING):
        assert ckpt.resume(ABSTRACT, config=smoke.get_config()).step == 4
    moved = [r.getMessage() for r in caplog.records if "moved damaged checkpoint" in r.getMessage()]
    assert len(moved) == 1 and "checkpoints/damaged/6" in moved[0], moved
    assert ckpt.all_steps() == [2, 4] and os.path.isdir(d / "damaged" / "6")
    for s in (6, 8, 9):
        ckpt.save(s, {"w": np.full((3,), s, np.float32)}, {"next_batch": s}, smoke.get_config())
        ckpt.wait()
    ckpt.close()
    assert sorted(os.listdir(d)) == ["6", "8", "9", "damaged"]
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3)
    try:
        assert ckpt.resume(ABSTRACT, config=smoke.get_config(), step=6).data_state == {"next_batch": 6}
        assert ckpt.resume(ABSTRACT, config=smoke.get_config()).step == 9
    finally:
        ckpt.close()


def test_no_restorable_step_is_an_error_not_a_fresh_start(tmp_path):
    d = _save_steps(tmp_path, [1])
    (d / "1" / "config" / "metadata").write_text("{not json")
    with pytest.raises(ValueError, match=r"no checkpoint in .*checkpoints restores \(step 1: "):
        _restore(tmp_path)
    assert sorted(os.listdir(d)) == ["1"]  # nothing moved: a rerun stops again instead of starting afresh


def test_interrupted_saves_are_removed(tmp_path):
    d = _save_steps(tmp_path, [1])
    (d / "2.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    (d / "3.orbax-checkpoint-tmp").mkdir()
    removed = checkpoints.remove_interrupted_saves(str(tmp_path))
    assert removed == ["2.orbax-checkpoint-tmp-1234", "3.orbax-checkpoint-tmp"]
    assert sorted(os.listdir(d)) == ["1"]


def test_failed_background_save_is_reported_at_the_next_check(tmp_path, monkeypatch):
    original = ocp.StandardCheckpointHandler.async_save

    class FailingCommit:
        def result(self, timeout=None):
            raise OSError("disk full (simulated)")

    async def failing_async_save(self, *args, **kwargs):
        return [*(await original(self, *args, **kwargs) or []), FailingCommit()]

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", failing_async_save)
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2, async_save=True)
    ckpt.save(4, {"w": np.ones((3,), np.float32)}, {"next_batch": 4}, smoke.get_config())
    deadline = time.time() + 30
    while ckpt.manager.is_saving_in_progress() and time.time() < deadline:
        time.sleep(0.02)
    with pytest.raises(checkpoints.CheckpointSaveError,
                       match=r"saving checkpoint 4 in .* failed \(OSError: disk full \(simulated\)\)"):
        ckpt.check_for_errors()
    ckpt.check_for_errors()  # reported once
    assert ckpt.all_steps() == []
    ckpt.close()


def test_ema_parameters_are_restored_alone(tmp_path):
    """--mode sample / eval: the checkpoint's optimiser state is neither built nor read."""
    config = smoke.get_config()
    model = models.create(config.model)
    shapes = jax.eval_shape(lambda k: model.init({"params": k}, *dummy_inputs(config.model), train=False),
                            jax.random.PRNGKey(0))["params"]
    ema = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
    state = {"step": np.int32(7), "params": jax.tree.map(np.zeros_like, ema), "ema_params": ema,
             "opt_state": {"an optimiser this config cannot build": np.zeros((5,), np.float32)}}
    ckpt = checkpoints.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(7, state, {"next_batch": 7}, config)
    ckpt.close()
    step, params = checkpoints.restore_ema(config, str(tmp_path))
    assert step == 7
    for leaf in jax.tree.leaves(params):
        np.testing.assert_array_equal(np.asarray(leaf), 0.5)
    assert jax.tree.structure(params) == jax.tree.structure(ema)


def test_checkpoints_do_not_import_the_train_state_module_cycle():
    import ast
    import inspect

    from diffusion_jax.train import state

    tree = ast.parse(inspect.getsource(state))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "diffusion_jax.train" not in imported and not hasattr(state, "restore_ema_params")
