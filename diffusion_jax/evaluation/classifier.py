"""A small convolutional classifier for 28x28 MNIST / Fashion-MNIST: the feature
network of the sample-quality metrics (it stands in for Inception-v3, whose
weights cannot be downloaded here).

Train it once on the train split and report test accuracy:

    python -m diffusion_jax.evaluation.classifier --dataset mnist [--workdir DIR]

It writes DIR/params.msgpack (flax serialisation) and DIR/meta.json
(architecture, dataset, accuracy), each atomically (temp file + os.replace),
meta last, so a directory with meta.json always holds complete parameters.
Default DIR: runs/classifier_<dataset>.

The penultimate layer (`hidden` ReLU units) gives the features for Frechet
distance and KID; the softmax gives the Inception-Score analogue and the
conditional accuracy.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import serialization

from diffusion_jax import images as image_lib

PARAMS_FILE = "params.msgpack"
META_FILE = "meta.json"
# The architecture the training command uses: ~7.6M multiply-adds per 28x28 image.
DEFAULT_ARCH = {"widths": [32, 64, 128], "convs_per_block": 1, "hidden": 128, "dropout": 0.0}


class Classifier(nn.Module):
    """Blocks of `convs_per_block` 3x3 ReLU convs and a 2x2 max-pool, one block per entry of
    `widths` (channels), then a `hidden`-unit ReLU layer and the logits.

    `__call__(x)` takes NHWC float images in [-1, 1] and returns (logits, features), the
    features being the penultimate activations.
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    convs_per_block: int = 1
    hidden: int = 128
    dropout: float = 0.0  # on the flattened conv features and the hidden layer, training only

    @nn.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            for _ in range(self.convs_per_block):
                x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        features = nn.relu(nn.Dense(self.hidden)(x))
        dropped = nn.Dropout(self.dropout, deterministic=not train)(features)
        return nn.Dense(self.num_classes)(dropped), features


def make_model(num_classes: int, arch: dict | None = None) -> Classifier:
    arch = dict(DEFAULT_ARCH, **(arch or {}))
    return Classifier(num_classes=num_classes, widths=tuple(arch["widths"]),
                      convs_per_block=arch["convs_per_block"], hidden=arch["hidden"],
                      dropout=float(arch.get("dropout", 0.0)))


def to_model_input(images) -> np.ndarray:
    """uint8 [N,H,W,C] in [0,255] -> float32 in [-1, 1]; float input is taken as already in [-1, 1]."""
    images = np.asarray(images)
    return image_lib.to_float(images) if images.dtype == np.uint8 else images.astype(np.float32)


quantize = image_lib.to_uint8  # float images in [-1, 1] -> uint8 (diffusion_jax.images)


def random_shift(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translates each image [N,H,W,C] by (dy, dx) ~ U{-max_shift..max_shift}^2 pixels.

    Vacated pixels take the background value -1 (black in [-1, 1]); content moved past
    the border is dropped. max_shift = 0 returns x unchanged.
    """
    if max_shift <= 0:
        return x
    n, h, w, _ = x.shape
    s = max_shift
    padded = np.pad(x, ((0, 0), (s, s), (s, s), (0, 0)), constant_values=-1.0)
    dy, dx = rng.integers(-s, s + 1, size=(2, n))
    rows = (np.arange(h)[None, :] + s - dy[:, None])[:, :, None]  # [N, H, 1]
    cols = (np.arange(w)[None, :] + s - dx[:, None])[:, None, :]  # [N, 1, W]
    return padded[np.arange(n)[:, None, None], rows, cols]


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(directory: str, params, meta: dict) -> None:
    """Write params then meta.json, each atomically; meta.json marks a complete save."""
    os.makedirs(directory, exist_ok=True)
    _atomic_write(os.path.join(directory, PARAMS_FILE), serialization.to_bytes(params))
    _atomic_write(os.path.join(directory, META_FILE), json.dumps(meta, indent=2).encode())


def load(directory: str) -> tuple[Classifier, Any, dict]:
    """Return (module, params, meta) saved by `save` / the training command."""
    meta_path = os.path.join(directory, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(
            f"no trained classifier in {directory!r} ({META_FILE} missing); train one with "
            f"`python -m diffusion_jax.evaluation.classifier --dataset <name> --workdir {directory}`")
    with open(meta_path) as f:
        meta = json.load(f)
    model = make_model(meta["num_classes"], meta["arch"])
    template = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *meta["image_shape"]), jnp.float32))["params"]
    with open(os.path.join(directory, PARAMS_FILE), "rb") as f:
        params = serialization.from_bytes(template, f.read())
    return model, params, meta


def make_apply_fn(model: Classifier, params, *, batch_size: int = 500) -> Callable:
    """Return `fn(images) -> (features [N, hidden], probs [N, classes])` as float64 numpy.

    Accepts uint8 images or float images in [-1, 1]; runs in fixed-size batches (the last
    one padded) so it compiles once.
    """

    @jax.jit
    def forward(x):
        logits, features = model.apply({"params": params}, x)
        return features, jax.nn.softmax(logits)

    def fn(images):
        x = to_model_input(images)
        n = x.shape[0]
        feats, probs = [], []
        for start in range(0, n, batch_size):
            chunk = x[start:start + batch_size]
            pad = batch_size - chunk.shape[0]
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            f, p = forward(chunk)
            feats.append(np.asarray(f)[:batch_size - pad])
            probs.append(np.asarray(p)[:batch_size - pad])
        return np.concatenate(feats).astype(np.float64), np.concatenate(probs).astype(np.float64)

    return fn


def _print(msg: str) -> None:
    logging.info("%s", msg)


def train(train_images, train_labels, *, num_classes: int, epochs: int = 3, batch_size: int = 128,
          learning_rate: float = 2e-3, arch: dict | None = None, seed: int = 0, max_shift: int = 0,
          log: Callable[[str], None] | None = _print):
    """Adam with cosine-decayed learning rate on softmax cross-entropy; optional random
    translations by up to `max_shift` pixels (`random_shift`) as the only augmentation.

    Images uint8 [N,H,W,C] (or float in [-1, 1]); labels int [N]. Returns (module, params).
    """
    x_all = to_model_input(train_images)
    y_all = np.asarray(train_labels, np.int32)
    if x_all.ndim != 4 or y_all.shape != (x_all.shape[0],):
        raise ValueError(f"need images [N,H,W,C] and labels [N], got {x_all.shape} and {y_all.shape}")
    model = make_model(num_classes, arch)
    params = model.init(jax.random.PRNGKey(seed), x_all[:1])["params"]
    steps_per_epoch = x_all.shape[0] // batch_size
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, epochs * steps_per_epoch))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y, key):
        def loss_fn(p):
            logits, _ = model.apply({"params": p}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        start = time.time()
        order = rng.permutation(x_all.shape[0])
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            step_key = jax.random.fold_in(jax.random.PRNGKey(seed + 1), epoch * steps_per_epoch + i)
            x = random_shift(x_all[idx], max_shift, rng)
            params, opt_state, loss = train_step(params, opt_state, x, y_all[idx], step_key)
            losses.append(loss)
            if log and (i + 1) % 100 == 0:
                log(f"epoch {epoch + 1}, step {i + 1}/{steps_per_epoch}: loss {float(loss):.4f} "
                    f"({time.time() - start:.1f}s)")
        if log:
            log(f"epoch {epoch + 1}/{epochs}: loss {float(np.mean(jax.device_get(losses))):.4f} "
                f"({time.time() - start:.1f}s)")
    return model, params


def accuracy(model: Classifier, params, images, labels, *, batch_size: int = 500) -> float:
    _, probs = make_apply_fn(model, params, batch_size=batch_size)(images)
    return float(np.mean(np.argmax(probs, axis=1) == np.asarray(labels)))


def train_and_save(dataset: str, workdir: str, *, data_dir: str | None = None, arrays: dict | None = None,
                   arch: dict | None = None, epochs: int = 3, batch_size: int = 128,
                   learning_rate: float = 2e-3, seed: int = 0, max_shift: int = 0,
                   log: Callable[[str], None] | None = _print) -> dict:
    """Train on `dataset`'s train split, measure test accuracy, save to `workdir`; return meta.

    `arrays` = {"train": (images, labels), "test": (images, labels)} replaces
    `data.load_arrays` (synthetic data in tests); `arch` overrides DEFAULT_ARCH entries.
    """
    start = time.time()
    if arrays is None:
        from diffusion_jax import data  # imported here: the metrics need no data pipeline

        arrays = {split: data.load_arrays(dataset, split, data_dir=data_dir) for split in ("train", "test")}
    (train_images, train_labels), (test_images, test_labels) = arrays["train"], arrays["test"]
    num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    arch = dict(DEFAULT_ARCH, **(arch or {}))
    model, params = train(train_images, train_labels, num_classes=num_classes, epochs=epochs,
                          batch_size=batch_size, learning_rate=learning_rate, arch=arch,
                          seed=seed, max_shift=max_shift, log=log)
    test_accuracy = accuracy(model, params, test_images, test_labels)
    meta = {
        "dataset": dataset, "num_classes": num_classes, "image_shape": list(np.shape(train_images)[1:]),
        "arch": arch, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
        "seed": seed, "max_shift": max_shift, "test_accuracy": test_accuracy,
        "train_seconds": round(time.time() - start, 1),
    }
    save(workdir, params, meta)
    if log:
        log(f"{dataset} classifier: test accuracy {100 * test_accuracy:.2f}% "
            f"({meta['train_seconds']:.0f}s); saved to {workdir}")
    return meta


def _define_flags() -> None:
    """The command line's flags (absl, as launch.py); defined only when this module runs as a program."""
    flags.DEFINE_string("dataset", "mnist", "dataset name known to diffusion_jax.data")
    flags.DEFINE_string("workdir", None, "output directory (default runs/classifier_<dataset>)")
    flags.DEFINE_string("data_dir", None, "prepared-data directory (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    flags.DEFINE_integer("epochs", 4, "training epochs", lower_bound=1)
    flags.DEFINE_integer("batch_size", 128, "images per step", lower_bound=1)
    flags.DEFINE_float("learning_rate", 2e-3, "Adam's peak learning rate (cosine decay)")
    flags.DEFINE_integer("seed", 0, "seed of the init, the batch order and the shifts")
    flags.DEFINE_integer("max_shift", 2, "random translations by up to this many pixels while training (0 = none)",
                         lower_bound=0)
    flags.DEFINE_float("dropout", DEFAULT_ARCH["dropout"], "dropout rate in [0, 1) on the dense layers while training",
                       lower_bound=0.0, upper_bound=0.999999)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    train_and_save(f.dataset, f.workdir or f"runs/classifier_{f.dataset}", data_dir=f.data_dir,
                   epochs=f.epochs, batch_size=f.batch_size, learning_rate=f.learning_rate,
                   seed=f.seed, max_shift=f.max_shift, arch={"dropout": f.dropout})


if __name__ == "__main__":
    _define_flags()
    app.run(main)
