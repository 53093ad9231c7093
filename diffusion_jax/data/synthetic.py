"""A deterministic synthetic dataset, for tests and smoke runs only.

Not real data: class k's images are a smooth pattern (a bright horizontal bar
whose row depends on k) plus a little Gaussian noise, values in [-1, 1]. Batch
number i is a pure function of (seed, i), so the iterator's whole state is the
index of the next batch, and every process can cut its own rows out of the
same global batch. It follows the `diffusion_jax.data.make_iterator` contract
(global batch size, per-process rows, `get_state` / `set_state`).

It is registered in `diffusion_jax.data.GENERATED`, so `data.info`,
`data.load_arrays` and `data.make_iterator` serve it like a prepared dataset;
being drawn, not stored, its image shape and class count are the model's
(`geometry`, from `data.model_geometry(config.model)`).
"""

from __future__ import annotations

import numpy as np

from diffusion_jax.images import to_uint8

NAME = "synthetic"
SPLIT_SIZES = {"train": 2000, "test": 1000}  # images in the fixed splits that evaluation reads
_SPLIT_SEED = {"test": 1, "train": 2}  # offsets from the config seed (the training stream uses the seed itself)


class SyntheticIterator:
    """Yields {"image": float32 [b, H, W, C] in [-1, 1], "label": int32 [b]}.

    b = batch_size // process_count; process p gets rows [p*b, (p+1)*b) of
    global batch i.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        image_shape: tuple[int, int, int],
        num_classes: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if batch_size % process_count:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by process_count ({process_count})"
            )
        self.batch_size = batch_size
        self.image_shape = tuple(image_shape)
        self.num_classes = max(int(num_classes), 1)
        self.seed = int(seed)
        self.process_index = process_index
        self.local_batch = batch_size // process_count
        self.next_batch = 0

    def _global_batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, index])
        h, w, c = self.image_shape
        labels = rng.integers(0, self.num_classes, size=self.batch_size).astype(np.int32)
        rows = np.arange(h)[None, :, None, None]
        centre = (labels[:, None, None, None] + 0.5) * h / self.num_classes
        bar = np.exp(-0.5 * ((rows - centre) / max(h / (2 * self.num_classes), 0.5)) ** 2)
        images = np.broadcast_to(2.0 * bar - 1.0, (self.batch_size, h, w, c))
        images = images + 0.05 * rng.standard_normal(images.shape)
        return np.clip(images, -1.0, 1.0).astype(np.float32), labels

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        images, labels = self._global_batch(self.next_batch)
        self.next_batch += 1
        lo = self.process_index * self.local_batch
        hi = lo + self.local_batch
        return {"image": images[lo:hi], "label": labels[lo:hi]}

    def get_state(self) -> dict:
        return {"next_batch": self.next_batch}

    def set_state(self, state: dict) -> None:
        self.next_batch = int(state["next_batch"])


def info(geometry):
    """DatasetInfo of the synthetic dataset drawn at `geometry` = (image_shape, num_classes)."""
    from diffusion_jax.data.storage import DatasetInfo

    image_shape, num_classes = geometry
    return DatasetInfo(tuple(image_shape), int(num_classes), dict(SPLIT_SIZES))


def load_arrays(split: str, geometry, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, C], int32 labels [N]) of a fixed split, quantised as stored data would be."""
    image_shape, num_classes = geometry
    it = SyntheticIterator(batch_size=SPLIT_SIZES[split], image_shape=image_shape, num_classes=num_classes,
                           seed=seed + _SPLIT_SEED[split])
    batch = next(it)
    return to_uint8(batch["image"]), batch["label"].astype(np.int32)


def make_iterator(geometry, *, batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> SyntheticIterator:
    """The endless training stream: batch i a pure function of (seed, i)."""
    image_shape, num_classes = geometry
    return SyntheticIterator(batch_size=batch_size, image_shape=image_shape, num_classes=num_classes, seed=seed,
                             process_index=process_index, process_count=process_count)
