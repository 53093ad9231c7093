"""tensorflow-datasets builders that write tfds' own datasets from local arrays.

Imported only while preparing a dataset (never on the training read path):
tfds 4.9 encodes `Image` features with TensorFlow, so this module imports it
and first hides every GPU from it, since TensorFlow otherwise reserves most of
the accelerator memory that JAX needs.

Each builder subclasses tfds' own builder class, so name, version, features
(`image` uint8 [28, 28, 1], `label` ClassLabel(10) with tfds' label names and
order), description and citation are exactly tfds'; only where the examples
come from differs. The result is read back by tfds' registered builder
(`tfds.data_source("mnist")`), and by grain through it, without tf.data.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  (before tfds, so its devices are set here)

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices elsewhere in this process
    from absl import logging

    logging.warning(
        "TensorFlow was initialised before diffusion_jax.data could hide the GPUs from it; it may hold "
        "accelerator memory. Prepare datasets in a separate process (python -m diffusion_jax.data prepare).")

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from tensorflow_datasets.image_classification import mnist as tfds_mnist  # noqa: E402


class _FromArrays:
    """Mixin: examples come from `splits` = {split: (uint8 images, int labels)}."""

    # No download checksums to look up (tfds would locate them through the
    # package's resource path, which needs the `importlib_resources` backport).
    code_path = None

    def __init__(self, *, splits, **kwargs):
        self._arrays = splits
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(images, labels)
                for split, (images, labels) in self._arrays.items()}

    def _generate_examples(self, images, labels):
        for index in range(len(images)):
            yield index, {"image": np.asarray(images[index], np.uint8), "label": int(labels[index])}


class MnistFromArrays(_FromArrays, tfds_mnist.MNIST, skip_registration=True):
    """tfds `mnist` (3.0.1), written from arrays instead of the LeCun files."""

    name = "mnist"


class FashionMnistFromArrays(_FromArrays, tfds_mnist.FashionMNIST, skip_registration=True):
    """tfds `fashion_mnist` (3.0.1), written from arrays instead of Zalando's download."""

    name = "fashion_mnist"


BUILDERS = {"mnist": MnistFromArrays, "fashion_mnist": FashionMnistFromArrays}


def build_from_arrays(name: str, splits, *, data_dir: str) -> "tfds.core.DatasetBuilder":
    """Writes tfds dataset `name` (array_record) under `data_dir` from arrays."""
    builder = BUILDERS[name](splits=splits, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=None))
    return builder


def build_with_tfds(name: str, *, data_dir: str, manual_dir=None) -> "tfds.core.DatasetBuilder":
    """tfds' own builder; `manual_dir` holds files tfds would otherwise download."""
    try:
        import importlib_resources  # noqa: F401
    except ImportError as e:
        raise ImportError("tfds 4.9 needs the `importlib_resources` package to build its own datasets "
                          "(it locates their checksums with it): `pip install importlib_resources`") from e
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(
        download_dir=os.path.join(data_dir, "downloads"),
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
