"""Deterministic, resumable, per-process batches from in-memory uint8 images.

The example stream is the concatenation of per-epoch orderings
pi_0, pi_1, ..., each pi_e a permutation of 0..N-1 drawn from
SeedSequence([seed, 0, e]) (the identity when shuffle=False). Global batch s
is the stream's positions [s*B, (s+1)*B), so a batch may straddle two epochs
and no example is dropped; process p of P takes the contiguous slice
[p*B/P, (p+1)*B/P) of it. Hence every process's shard of a batch is disjoint
from the others', the P shards together are exactly the single-process batch,
and the iterator state is just the step s: the same on every process, and
valid for a restart with a different process count. The optional horizontal
flip of global example j in step s is bit j of a draw from
SeedSequence([seed, 1, s]).
"""

from __future__ import annotations

import numpy as np

STATE_FORMAT = 1
_SHUFFLE_STREAM, _FLIP_STREAM = 0, 1


def _check_int(name, value, *, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class BatchIterator:
    """Iterator over {"image": float32 [b,H,W,C] in [-1, 1], "label": int32 [b]}.

    `batch_size` is global; this process yields b = batch_size // process_count
    examples per step. `num_epochs=None` repeats forever; otherwise iteration
    stops after floor(num_epochs * N / batch_size) steps.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int,
                 shuffle: bool = True, random_flip: bool = False, num_epochs=None,
                 process_index: int = 0, process_count: int = 1, dataset: str = "", split: str = ""):
        if images.ndim != 4 or images.dtype != np.uint8 or labels.shape != (images.shape[0],):
            raise ValueError(f"images must be uint8 [N,H,W,C] and labels [N]; got {images.dtype}{list(images.shape)} "
                             f"and {list(labels.shape)}")
        if images.shape[0] == 0:
            raise ValueError(f"split {split!r} of {dataset!r} is empty")
        batch_size = _check_int("batch_size", batch_size, minimum=1)
        process_count = _check_int("process_count", process_count, minimum=1)
        process_index = _check_int("process_index", process_index, minimum=0)
        if batch_size % process_count:
            raise ValueError(f"batch_size ({batch_size}) is global and must divide by process_count "
                             f"({process_count}); use a multiple of {process_count}, e.g. "
                             f"{(batch_size // process_count + 1) * process_count}")
        if process_index >= process_count:
            raise ValueError(f"process_index ({process_index}) must be in [0, process_count={process_count})")
        self._seed = _check_int("seed", seed, minimum=0)
        if num_epochs is not None and not (isinstance(num_epochs, (int, float, np.integer, np.floating))
                                           and not isinstance(num_epochs, bool) and num_epochs > 0):
            raise ValueError(f"num_epochs must be None (repeat forever) or a number > 0, got {num_epochs!r}")
        self._images, self._labels = images, np.asarray(labels, np.int32)
        self._n = images.shape[0]
        self._batch_size = batch_size
        self._local = batch_size // process_count
        self._offset = process_index * self._local
        self._shuffle, self._flip = bool(shuffle), bool(random_flip)
        self._num_epochs = num_epochs
        self._total_steps = None if num_epochs is None else int(num_epochs * self._n) // batch_size
        self._dataset, self._split = dataset, split
        self._step = 0
        self._perms: dict[int, np.ndarray] = {}
        self._scale = np.float32(2.0 / 255.0)

    # -- the stream --------------------------------------------------------

    @property
    def num_examples(self) -> int:
        return self._n

    @property
    def local_batch_size(self) -> int:
        return self._local

    @property
    def steps_per_epoch(self) -> float:
        return self._n / self._batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if self._shuffle:
                rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed, _SHUFFLE_STREAM, epoch])))
                perm = rng.permutation(self._n)
            else:
                perm = np.arange(self._n)
            if len(self._perms) >= 2:  # a batch touches at most a few epochs; keep memory O(N)
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of this process's examples in global batch `step`."""
        start = step * self._batch_size + self._offset
        pos = np.arange(start, start + self._local, dtype=np.int64)
        epochs, offsets = np.divmod(pos, self._n)
        if epochs[0] == epochs[-1]:
            return self._permutation(int(epochs[0]))[offsets]
        out = np.empty(self._local, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))[offsets[sel]]
        return out

    def batch(self, step: int) -> dict:
        """Batch `step` of this process (pure function of the configuration and step)."""
        idx = self.indices(step)
        x = np.empty((self._local, *self._images.shape[1:]), np.float32)
        np.multiply(self._images[idx], self._scale, out=x, casting="unsafe")  # uint8 -> [0, 2]
        x -= np.float32(1.0)  # 0 -> -1, 255 -> 1
        if self._flip:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed, _FLIP_STREAM, step])))
            flip = rng.integers(0, 2, size=self._batch_size, dtype=np.uint8).astype(bool)
            flip = flip[self._offset:self._offset + self._local]
            x[flip] = x[flip, :, ::-1]
        return {"image": x, "label": self._labels[idx]}

    # -- iteration and state -------------------------------------------------

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._total_steps is not None and self._step >= self._total_steps:
            raise StopIteration
        out = self.batch(self._step)
        self._step += 1
        return out

    def __len__(self) -> int:
        if self._total_steps is None:
            raise TypeError("an iterator with num_epochs=None is infinite")
        return self._total_steps

    def _config(self) -> dict:
        return {"dataset": self._dataset, "split": self._split, "num_examples": self._n,
                "batch_size": self._batch_size, "seed": self._seed, "shuffle": self._shuffle,
                "random_flip": self._flip}

    def get_state(self) -> dict:
        """JSON-serialisable state; identical on every process."""
        return {"format": STATE_FORMAT, "step": self._step, **self._config()}

    def set_state(self, state: dict) -> None:
        """Continue with exactly the batch that followed when `state` was taken."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state must be a dict from get_state() with format {STATE_FORMAT}, got {state!r}")
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(f"state was taken with {key}={state.get(key)!r} but this iterator has "
                                 f"{key}={value!r}; build the iterator with the same {key} to resume")
        self._step = _check_int("state['step']", state.get("step"), minimum=0)


class ArraySource:
    """Random-access view of a decoded split: grain's RandomAccessDataSource protocol.

    `len(source)` and `source[i] -> {"image": uint8 [H,W,C], "label": int32}`,
    so `grain.MapDataset.source(source)` builds grain pipelines on the same
    records (in tfds' stored order) without TensorFlow. BatchIterator is the
    faster path for training; this is for code that wants grain's transforms.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self._images, self._labels = images, labels

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, index) -> dict:
        return {"image": self._images[index], "label": self._labels[index]}

    def __getitems__(self, indices) -> list:
        return [self[i] for i in indices]
