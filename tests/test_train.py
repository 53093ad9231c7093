"""Train-package units: config validation, learning-rate schedule, EMA, the
synthetic test data, image grids and metric files, the data-state checkpoint
item and Orbax's handling of an interrupted save. In-process, no model compile."""

import json
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import cifar10, default, fashion_mnist, mnist, mnist_ddpm, mnist_dit, smoke  # noqa: E402

from diffusion_jax.train import checkpoints, config as config_lib  # noqa: E402
from diffusion_jax.images import tile as make_grid, to_uint8  # noqa: E402
from diffusion_jax.train.writers import MetricWriter  # noqa: E402
from diffusion_jax.train.state import ema_decay_at, ema_update, make_learning_rate_schedule  # noqa: E402
from diffusion_jax.data.synthetic import SyntheticIterator  # noqa: E402


@pytest.mark.parametrize("module", [smoke, mnist, mnist_ddpm, mnist_dit, fashion_mnist, cifar10])
def test_experiment_configs_validate(module):
    config = module.get_config()
    config_lib.validate(config, num_devices=1)
    assert set(config) >= set(default.get_config())


def test_mnist_and_cifar10_are_what_they_claim():
    m, d = mnist.get_config(), mnist_ddpm.get_config()
    assert (m.model.name, m.model.num_classes, m.diffusion.process, m.diffusion.prediction) == (
        "unet", 10, "edm", "edm")
    assert (d.model.name, d.diffusion.process, d.diffusion.prediction, d.diffusion.schedule) == (
        "unet", "ddpm", "eps", "linear")
    assert m.training.cond_drop_prob > 0 and d.training.cond_drop_prob > 0
    c = cifar10.get_config().training
    assert (c.batch_size, c.learning_rate, c.warmup_steps, c.grad_clip_norm, c.ema_decay, c.num_steps) == (
        128, 2e-4, 5000, 1.0, 0.9999, 800_000)
    assert cifar10.get_config().model.dropout == 0.1


BAD = [
    ("model.name", "vae", "config.model.name must be one of ('unet', 'dit')"),
    ("diffusion.schedule", "quadratic", "config.diffusion.schedule must be one of"),
    ("sample.method", "rk45", "config.sample.method must be one of"),  # euler is a sampler now
    ("diffusion.prediction", "noise", "config.diffusion.prediction must be one of ('eps', 'x0', 'v', 'score')"),
    ("diffusion.loss_weighting", "snr", "config.diffusion.loss_weighting must be one of"),
    ("training.optimizer", "sgd", "config.training.optimizer must be one of ('adam', 'adamw', 'muon')"),
    ("training.learning_rate", -1.0, "config.training.learning_rate must be a number with 0 < learning_rate"),
    ("training.muon_lr_scale", 0.0, "config.training.muon_lr_scale must be a number with 0 < muon_lr_scale"),
    ("training.ema_decay", 1.5, "config.training.ema_decay must be a number with 0 <= ema_decay < 1"),
    ("training.cond_drop_prob", 2.0, "config.training.cond_drop_prob"),
    ("training.num_steps", 0, "config.training.num_steps must be an integer with 1 <= num_steps"),
    ("sample.num_steps", 101, "config.sample.num_steps must be an integer with 1 <= num_steps <= 100"),
    ("model.image_size", 30, "image_size"),
]


@pytest.mark.parametrize("field,value,message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_raises_one_line_error_naming_the_field(field, value, message):
    config = mnist.get_config() if field == "model.image_size" else smoke.get_config()
    section, name = field.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(ValueError) as e:
        config_lib.validate(config)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert field.split(".")[-1] in text


def test_unet_levels_must_divide_image_size():
    config = mnist.get_config()  # ch_mult (1, 2, 4): two halvings
    config.model.image_size = 30
    with pytest.raises(ValueError, match=r"config\.model: .*'image_size'.*not divisible by .* 4"):
        config_lib.validate(config)


def test_unknown_dataset():
    config = smoke.get_config()
    config.data.dataset = "no_such_dataset_xyz"
    with pytest.raises(ValueError, match=r"config\.data\.dataset: .*no_such_dataset_xyz"):
        config_lib.validate(config)


def test_global_batch_must_divide_over_devices():
    config = smoke.get_config()
    config.training.batch_size = 12
    with pytest.raises(ValueError, match=r"config\.training\.batch_size must be divisible by the device count 8, got 12"):
        config_lib.validate(config, num_devices=8)
    config_lib.validate(config, num_devices=4)


def test_model_must_match_dataset():
    config = mnist.get_config()
    config_lib.check_against_dataset(config, (28, 28, 1), 10)
    with pytest.raises(ValueError, match=r"config\.model\.in_channels must be the dataset's channel count 3"):
        config_lib.check_against_dataset(config, (28, 28, 3), 10)
    with pytest.raises(ValueError, match=r"config\.model\.image_size must be the dataset's image size 32"):
        config_lib.check_against_dataset(config, (32, 32, 1), 10)


def test_learning_rate_warmup_then_cosine():
    config = mnist.get_config().training
    config.learning_rate, config.warmup_steps, config.num_steps, config.lr_schedule = 1e-3, 10, 110, "cosine"
    lr = make_learning_rate_schedule(config)
    for step in (0, 5, 10):
        assert float(lr(step)) == pytest.approx(1e-3 * step / 10, abs=1e-9)
    for step in (10, 35, 60, 110):  # cosine decay to 0 over 100 steps
        want = 0.5 * 1e-3 * (1 + np.cos(np.pi * (step - 10) / 100))
        assert float(lr(step)) == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_ema_closed_form():
    # params fixed at p, ema starting at e0: after n updates ema = p + decay^n (e0 - p)
    p, e, decay = np.float32(2.0), np.float32(-1.0), 0.9
    ema = {"w": np.asarray(e)}
    for _ in range(5):
        ema = ema_update(ema, {"w": np.asarray(p)}, decay)
    assert float(ema["w"]) == pytest.approx(p + decay**5 * (e - p), rel=1e-6)
    assert float(ema_decay_at(0, 0.999, True)) == pytest.approx(0.1)
    assert float(ema_decay_at(10_000, 0.999, True)) == pytest.approx(0.999)
    assert float(ema_decay_at(0, 0.999, False)) == pytest.approx(0.999)


@pytest.mark.parametrize("muon_lr_scale", [1.0, 2.5])
def test_muon_orthogonalises_dense_kernels_and_adamw_takes_the_rest(muon_lr_scale):
    """training.optimizer = "muon": the first update of a Dense kernel W (in, out) is
    -k lr 0.2 sqrt(max(in, out)) O (k = muon_lr_scale), O ~ U V^T of the gradient's SVD (five
    Newton-Schulz steps with Jordan's coefficients leave its singular values in about
    [0.7, 1.2], against a spread of 4x in the gradient's); biases, conv kernels and embedding tables take (Nesterov) AdamW's
    first step at lr, not k lr, one magnitude in every entry."""
    import jax

    from diffusion_jax.train.state import make_optimizer, muon_matrices

    config = mnist.get_config()
    config.training.update(optimizer="muon", learning_rate=1e-2, warmup_steps=0, lr_schedule="constant",
                           muon_lr_scale=muon_lr_scale)
    config_lib.validate(config)
    shapes = {"dense": {"kernel": (32, 96), "bias": (96,)}, "conv": {"kernel": (3, 3, 4, 8)},
              "label_table": {"embedding": (11, 16)}}
    params = jax.tree.map(np.zeros, shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = iter(jax.random.split(jax.random.PRNGKey(0), 4))
    grads = jax.tree.map(lambda p: np.asarray(jax.random.normal(next(keys), p.shape)), params)
    specs = muon_matrices(params)  # Muon for the Dense kernel only
    assert specs["dense"]["kernel"] is not None and specs["dense"]["bias"] is None
    assert specs["conv"]["kernel"] is None and specs["label_table"]["embedding"] is None
    tx, lr = make_optimizer(config.training)
    updates, _ = tx.update(grads, tx.init(params), params)
    scale = muon_lr_scale * 1e-2 * 0.2 * np.sqrt(96)
    s = np.linalg.svd(np.asarray(updates["dense"]["kernel"], np.float64), compute_uv=False) / scale
    g = np.linalg.svd(grads["dense"]["kernel"].astype(np.float64), compute_uv=False)
    assert g.max() / g.min() > 3 and 0.6 < s.min() and s.max() < 1.25, (g, s)
    # Nesterov AdamW's first step: m = (1 - b1) g, m_hat = b1 m / (1 - b1^2) + (1 - b1) g / (1 - b1),
    # v_hat = g^2, so |u| = lr (1 + b1 (1 - b1) / (1 - b1^2)) in every entry
    b1 = config.training.b1
    for u in (updates["dense"]["bias"], updates["conv"]["kernel"], updates["label_table"]["embedding"]):
        np.testing.assert_allclose(np.abs(np.asarray(u)), 1e-2 * (1 + b1 * (1 - b1) / (1 - b1**2)), rtol=1e-3)  # eps / abs(g)


def test_synthetic_processes_split_one_global_batch_and_resume():
    kw = dict(batch_size=8, image_shape=(8, 8, 1), num_classes=3, seed=5)
    whole = SyntheticIterator(**kw)
    parts = [SyntheticIterator(**kw, process_index=i, process_count=2) for i in range(2)]
    for _ in range(2):
        w, a, b = next(whole), next(parts[0]), next(parts[1])
        np.testing.assert_array_equal(np.concatenate([a["image"], b["image"]]), w["image"])
        np.testing.assert_array_equal(np.concatenate([a["label"], b["label"]]), w["label"])
        assert w["image"].min() >= -1 and w["image"].max() <= 1
    again = SyntheticIterator(**kw)
    again.set_state(json.loads(json.dumps(whole.get_state())))
    np.testing.assert_array_equal(next(again)["image"], next(whole)["image"])


def test_grid_layout_and_uint8():
    np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0, 2.0])), [0, 128, 255, 255])
    images = np.stack([np.full((2, 3, 1), i * 10, np.uint8) for i in range(5)])
    grid = make_grid(images, ncol=2, pad=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 10 and grid[4, 1, 0] == 20 and grid[7, 1, 0] == 40
    assert grid[7, 5, 0] == 0  # the missing sixth tile stays black


def test_metric_writer(tmp_path):
    w = MetricWriter(str(tmp_path))
    w.write_scalars(10, {"loss": np.float32(0.5), "grad_norm": 2})
    w.close()
    assert [json.loads(l) for l in open(tmp_path / "metrics.jsonl")] == [
        {"step": 10, "loss": 0.5, "grad_norm": 2.0}]
    assert os.listdir(tmp_path / "tensorboard")


def _save(ckpt, step, value, config):
    state = {"w": np.full((3,), value, np.float32)}
    ckpt.save(step, state, {"next_batch": step}, config)
    ckpt.wait()


def test_checkpoint_roundtrip_ignores_interrupted_save_and_checks_model(tmp_path):
    import jax
    import shutil

    config = smoke.get_config()
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3, async_save=True)
    _save(ckpt, 1, 1.0, config)
    ckpt.close()
    d = tmp_path / "checkpoints"
    # an interrupted save: a complete-looking copy still under Orbax's temporary name,
    # and a half-written final-named step without its commit marker
    shutil.copytree(d / "1", d / "2.orbax-checkpoint-tmp-1234")
    (d / "3.orbax-checkpoint-tmp-99" / "state").mkdir(parents=True)
    ckpt = checkpoints.Checkpointer(str(tmp_path), keep=3)
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    state, data_state = ckpt.restore(abstract)
    np.testing.assert_array_equal(np.asarray(state["w"]), [1, 1, 1])
    assert data_state == {"next_batch": 1}
    assert os.listdir(d / "1" / "data") and "process_0-of-1.json" in os.listdir(d / "1" / "data")
    ckpt.check_model_config(config)
    other = smoke.get_config()
    other.model.num_res_blocks = 2
    other.model.dropout = 0.3  # does not change the parameter tree: not reported
    with pytest.raises(ValueError, match=r"different model config \(model\.num_res_blocks: checkpoint 1 vs config 2\); use another --workdir"):
        ckpt.check_model_config(other)
    ckpt.close()


def test_checkpoint_in_relative_workdir(tmp_path, monkeypatch):
    """The default workdir runs/<experiment> is relative; saving and restoring must work there."""
    import jax

    monkeypatch.chdir(tmp_path)
    config = smoke.get_config()
    ckpt = checkpoints.Checkpointer(os.path.join("runs", "smoke"), keep=1, async_save=True)
    _save(ckpt, 5, 2.0, config)
    ckpt.close()
    ckpt = checkpoints.Checkpointer(os.path.join("runs", "smoke"), keep=1)
    abstract = {"w": jax.ShapeDtypeStruct((3,), np.float32,
                                          sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
    state, _ = ckpt.restore(abstract)
    np.testing.assert_array_equal(np.asarray(state["w"]), [2, 2, 2])
    assert (tmp_path / "runs" / "smoke" / "checkpoints" / "5").is_dir()
    ckpt.close()


def test_restore_without_checkpoint_says_train_first(tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint in .*checkpoints: train first"):
        checkpoints.restore_ema_params(smoke.get_config(), str(tmp_path))
    assert checkpoints.latest_step(str(tmp_path)) is None
    assert not os.path.exists(tmp_path / "checkpoints")  # read-only: nothing created
