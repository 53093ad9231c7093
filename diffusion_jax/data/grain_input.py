"""Training batches through grain, read record by record from the prepared files.

    it = make_grain_iterator(NpyRecords(images_npy, labels_npy), batch_size=128, seed=0, num_workers=2)
    batch = next(it)        # {"image": f32 [b,H,W,C] in [-1, 1], "label": i32 [b]}
    state = it.get_state()  # JSON; set_state(state) on a new iterator continues exactly

Two sources hold the same uint8 examples in the same order (`config.data.source`):

* "decoded" (`NpyRecords`, the default): the decoded cache (`storage`:
  <split>-images.npy, <split>-labels.npy), one `os.pread` per example. The fast path:
  the pixels are read, not computed.
* "records" (`records.TfdsRecords`): tfds' array_record files, one tf.train.Example
  per example whose PNG is decoded in grain's map, so in the worker processes when
  `num_workers` > 0. The format tfds and other loaders read; it does the work that
  worker processes exist for, and on disk it is smaller than the decoded pixels
  (MNIST train: 19 MB against 47 MB).

The default is "decoded" because every prepared dataset has the cache and on one
core it gives several times the images/s of decoding PNGs (docs/benchmarks.md);
the numpy loader reads only the cache. PNG is lossless, so both sources give the
same batches bit for bit: a run may switch source on resume.

Either source is read a batch at a time, so the process holds a few batches,
never the dataset: its resident memory does not grow with the dataset
(bench/bench_data.py).

The example stream (a `grain.MapDataset` of dataset indices) is 0..N-1 shuffled
per epoch by grain (epoch e's permutation seeded with seed + e) and repeated
without end; the batches are a MapDataset over steps reading from it.
Global batch s is the stream's positions [s*B, (s+1)*B), so a batch may
straddle two epochs; process p of P takes the contiguous rows
[p*B/P, (p+1)*B/P) of it, as `pipeline.BatchIterator` does. The horizontal
flip of global row j of batch s is bit j of a draw from SeedSequence([seed, 1, s]).
Every batch is a pure function of (seed, s, p, P), so the worker processes
(`num_workers`, grain's `mp_prefetch`) change where it is computed, not what it is.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

STATE_FORMAT = "grain-1"
_FLIP_STREAM = 1
_READ_THREADS = 4  # threads reading ahead (per process, and per worker)
_LOOKAHEAD_BATCHES = 8  # batches read ahead: the pipeline holds O(8 batches), not O(500)


class NpyRecords:
    """Random-access records {"image": uint8 [H, W, C], "label": int32} of a pair of
    .npy files, read with one `os.pread` each (grain's RandomAccessDataSource protocol).
    Pickles as the paths: a worker process opens the files itself."""

    def __init__(self, images_path: str, labels_path: str):
        self._paths = (str(images_path), str(labels_path))
        self._open()

    def _open(self) -> None:
        self._layout = []
        for path in self._paths:
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}[version]
                shape, fortran, dtype = read_header(f)
                if fortran:
                    raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
                self._layout.append((f.tell(), shape, dtype))
        self._fds = [os.open(p, os.O_RDONLY) for p in self._paths]
        (_, ishape, idtype), (_, lshape, _) = self._layout
        if ishape[0] != lshape[0]:
            raise ValueError(f"{self._paths}: {ishape[0]} images but {lshape[0]} labels")
        self.image_shape, self._image_dtype = tuple(ishape[1:]), idtype
        self._image_bytes = int(np.prod(ishape[1:])) * idtype.itemsize

    def __getstate__(self) -> dict:
        return {"paths": self._paths}

    def __setstate__(self, state: dict) -> None:
        self._paths = state["paths"]
        self._open()

    def __len__(self) -> int:
        return int(self._layout[0][1][0])

    def read_batch(self, indices) -> dict:
        """{"image": uint8 [n, H, W, C], "label": int32 [n]} of `indices` (one pread per record)."""
        (ioff, _, _), (loff, _, ldtype) = self._layout
        size, fd = self._image_bytes, self._fds[0]
        images = b"".join([os.pread(fd, size, ioff + int(i) * size) for i in indices])
        labels = b"".join([os.pread(self._fds[1], ldtype.itemsize, loff + int(i) * ldtype.itemsize)
                           for i in indices])
        return {"image": np.frombuffer(images, self._image_dtype).reshape(len(indices), *self.image_shape),
                "label": np.frombuffer(labels, ldtype).astype(np.int32)}

    def __getitem__(self, index: int) -> dict:
        (ioff, _, _), (loff, _, ldtype) = self._layout
        index = int(index)
        image = np.frombuffer(os.pread(self._fds[0], self._image_bytes, ioff + index * self._image_bytes),
                              self._image_dtype).reshape(self.image_shape)
        label = np.frombuffer(os.pread(self._fds[1], ldtype.itemsize, loff + index * ldtype.itemsize), ldtype)[0]
        return {"image": image, "label": np.int32(label)}


class _ReadBatch:
    """Step s -> this process's uint8 rows of global batch s: the dataset indices at stream
    positions s*B + offset + [0, local) (grain's per-epoch shuffle), read from the source."""

    def __init__(self, order, source, batch_size: int, local: int, offset: int):
        self._order, self._source = order, source
        self._batch_size, self._local, self._offset = batch_size, local, offset

    def __call__(self, step: int) -> dict:
        start = int(step) * self._batch_size + self._offset
        return self._source.read_batch(self._order._getitems(list(range(start, start + self._local))))  # noqa: SLF001


class _ToFloat:
    """(step, uint8 batch) -> float32 in [-1, 1], flipped where SeedSequence([seed, 1, step]) says."""

    def __init__(self, seed: int, random_flip: bool, batch_size: int, local: int, offset: int):
        self._seed, self._flip = seed, random_flip
        self._batch_size, self._local, self._offset = batch_size, local, offset

    def __call__(self, step: int, batch: dict) -> dict:
        x = batch["image"].astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
        if self._flip:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self._seed, _FLIP_STREAM, step])))
            flip = rng.integers(0, 2, size=self._batch_size, dtype=np.uint8).astype(bool)
            flip = flip[self._offset:self._offset + self._local]
            x[flip] = x[flip, :, ::-1]
        return {"image": x, "label": batch["label"].astype(np.int32)}


class GrainIterator:
    """This process's batches of a grain pipeline over steps (a MapDataset whose
    element s is batch s), with a JSON state: the next step and the settings (a
    resume with other settings fails in one line). Batch s does not depend on
    the worker count, so a resume may change `num_workers`."""

    def __init__(self, batches, num_workers: int, config: dict):
        self._batches, self._num_workers, self._config = batches, num_workers, config
        self._step, self._it = 0, None

    def _start(self) -> None:
        import grain

        self.close()
        # A bounded look-ahead: grain's default reads 500 elements (here batches) ahead on 16
        # threads, in every worker, so memory would grow with batch size x 500 (tens of GB for
        # 256 px batches); 8 batches on 4 threads kept MNIST's rate (docs/benchmarks.md).
        options = grain.ReadOptions(num_threads=_READ_THREADS, prefetch_buffer_size=_LOOKAHEAD_BATCHES)
        ds = self._batches.slice(slice(self._step, None)).to_iter_dataset(options)
        if self._num_workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults when unparsed)
                flags.FLAGS.mark_as_parsed()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers))
        self._it = iter(ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._start()
        out = next(self._it)
        self._step += 1
        return out

    def get_state(self) -> dict:
        return {"format": STATE_FORMAT, "step": self._step, **self._config}

    def set_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"data state must come from a grain iterator (format {STATE_FORMAT!r}), got "
                             f"{state.get('format') if isinstance(state, dict) else state!r}; "
                             "resume with the config.data.loader that wrote the checkpoint")
        for key, value in self._config.items():
            if state.get(key) != value:
                raise ValueError(f"data state was taken with {key}={state.get(key)!r} but this iterator has "
                                 f"{key}={value!r}; build the iterator with the same {key} to resume")
        self._step = int(state["step"])
        self.close()

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def make_grain_iterator(source: Any, *, batch_size: int, seed: int, shuffle: bool = True,
                        random_flip: bool = False, process_index: int = 0, process_count: int = 1,
                        num_workers: int = 0, dataset: str = "", split: str = "") -> GrainIterator:
    """Endless batches of `source` (`NpyRecords` or `records.TfdsRecords`) for process `process_index`
    of `process_count`; `batch_size` is global. `num_workers` > 0 computes the
    batches in that many worker processes (grain's mp_prefetch)."""
    import grain

    if batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) is global and must divide by process_count ({process_count})")
    local, offset = batch_size // process_count, process_index * (batch_size // process_count)
    order = grain.MapDataset.range(len(source))  # the stream of dataset indices
    if shuffle:
        order = order.shuffle(seed=seed % 2**32)
    order = order.repeat(None)
    batches = grain.MapDataset.range(0, 2**62).map(_ReadBatch(order, source, batch_size, local, offset)) \
        .map_with_index(_ToFloat(seed, random_flip, batch_size, local, offset))
    config = {"dataset": dataset, "split": split, "num_examples": len(source), "batch_size": batch_size,
              "seed": seed, "shuffle": shuffle, "random_flip": random_flip}
    return GrainIterator(batches, num_workers, config)
