"""A deterministic synthetic dataset, for tests and smoke runs only.

Not real data: class k's images are a smooth pattern (a bright horizontal bar
whose row depends on k) plus a little Gaussian noise, values in [-1, 1]. Batch
number i is a pure function of (seed, i), so the iterator's whole state is the
index of the next batch, and every process can cut its own rows out of the
same global batch. It follows the `diffusion_jax.data.make_iterator` contract
(global batch size, per-process rows, `get_state` / `set_state`).
"""

from __future__ import annotations

import numpy as np

NAME = "synthetic"


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
