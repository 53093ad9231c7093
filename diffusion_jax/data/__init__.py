"""Image datasets by their tensorflow-datasets name, as fast resumable batches.

    from diffusion_jax import data
    data.prepare("mnist")                 # once; also done on first use
    it = data.make_iterator("mnist", "train", batch_size=128, seed=0)
    batch = next(it)                      # {"image": f32 [b,28,28,1] in [-1,1], "label": i32 [b]}
    state = it.get_state()                # JSON; it.set_state(state) resumes exactly

Preparation (`python -m diffusion_jax.data prepare <name> [--from DIR]`)
writes tfds' own dataset (array_record, readable by `tfds.data_source` and
grain) plus a decoded uint8 cache that training reads with numpy alone;
see `storage` for the layout and `pipeline` for the batch order.

`GENERATED` names the datasets drawn in memory instead (the test-only
"synthetic" patterns); `info`, `load_arrays` and `make_iterator` serve them
like the others, at the image shape and class count of the model
(`geometry=model_geometry(config.model)`), which stored datasets ignore.
"""

from __future__ import annotations

from diffusion_jax.data import storage, synthetic
from diffusion_jax.data.pipeline import ArraySource, BatchIterator
from diffusion_jax.data.sources import ChecksumError, SourceUnavailableError
from diffusion_jax.data.storage import (
    DATASETS,
    CorruptCacheError,
    DatasetError,
    DatasetInfo,
    MissingDatasetError,
    UnknownDatasetError,
    prepare,
    prepared_dir,
    resolve_data_dir,
    write_arrays,
)

__all__ = [
    "DATASETS", "ArraySource", "BatchIterator", "ChecksumError", "CorruptCacheError", "DatasetError", "DatasetInfo",
    "GENERATED", "MissingDatasetError", "SourceUnavailableError", "UnknownDatasetError", "check_labels",
    "check_name", "info", "load_arrays", "data_source", "make_iterator", "model_geometry", "prepare",
    "prepared_dir", "resolve_data_dir", "write_arrays",
]

# name -> module drawing that dataset in memory: info(geometry), load_arrays(split, geometry, seed),
# make_iterator(geometry, batch_size=, seed=, process_index=, process_count=).
GENERATED = {synthetic.NAME: synthetic}
LOADERS = ("numpy", "grain")  # make_iterator(loader=...): the split in memory, or records through grain
# make_iterator(source=...): which prepared files the examples come from. decoded: the uint8 cache
# (storage); records: tfds' array_record files, PNGs decoded as batches are made (records, grain only).
SOURCES = ("decoded", "records")


def model_geometry(model_config) -> tuple[tuple[int, int, int], int]:
    """((H, W, C), num_classes) a model config declares: the shape a generated dataset is drawn at."""
    size = int(model_config.image_size)
    return (size, size, int(model_config.in_channels)), int(model_config.num_classes)


def _geometry(name: str, geometry):
    if geometry is None:
        raise ValueError(f"dataset {name!r} is generated: pass geometry=model_geometry(config.model)")
    return geometry


def check_name(name: str, data_dir=None) -> None:
    """Raises UnknownDatasetError unless `name` is generated, known, prepared or a tfds name."""
    if name in GENERATED:
        return
    storage.check_name(name, data_dir)


def info(name: str, *, data_dir=None, geometry=None) -> DatasetInfo:
    """Image shape (H, W, C), number of classes and split sizes of `name`."""
    if name in GENERATED:
        return GENERATED[name].info(_geometry(name, geometry))
    return storage.info(name, data_dir=data_dir)


def load_arrays(name: str, split: str, *, data_dir=None, auto_prepare: bool = True, verify: bool = True,
                geometry=None, seed: int = 0):
    """(uint8 images [N, H, W, C], int32 labels [N]) of one split; `seed` draws a generated one."""
    if name in GENERATED:
        return GENERATED[name].load_arrays(split, _geometry(name, geometry), seed)
    return storage.load_arrays(name, split, data_dir=data_dir, auto_prepare=auto_prepare, verify=verify)


def make_iterator(name: str, split: str, *, batch_size: int, seed: int, shuffle: bool = True,
                  random_flip: bool = False, num_epochs=None, process_index: int | None = None,
                  process_count: int | None = None, data_dir=None, auto_prepare: bool = True,
                  geometry=None, loader: str = "numpy", num_workers: int = 0,
                  source: str = "decoded") -> BatchIterator:
    """Batches of split `split` of dataset `name` for this process.

    `batch_size` is global: each of the `process_count` processes (default
    `jax.process_count()`) yields `batch_size // process_count` examples, its
    own disjoint slice of the same global batch. The dataset is prepared on
    first use unless `auto_prepare=False`. See `pipeline` for the exact order.
    A generated dataset (`GENERATED`) is drawn at `geometry` instead; its
    stream ignores shuffle, flips and epochs.

    `loader="grain"` reads the prepared files record by record through grain
    instead of holding the split in memory (`grain_input`; endless, so
    `num_epochs` must be None), in `num_workers` worker processes when > 0.
    With `source="records"` it reads tfds' array_record files and decodes their
    PNGs in grain's map (so in the workers) instead of reading the decoded
    cache: the same batches, bit for bit (`grain_input`).
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if source == "records" and loader != "grain":
        raise ValueError("source 'records' is read through grain only: use loader='grain' (or source='decoded')")
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    # Validate cheap arguments before touching (or preparing) any data.
    if isinstance(batch_size, int) and isinstance(process_count, int) and process_count > 0 \
            and batch_size % process_count:
        raise ValueError(f"batch_size ({batch_size}) is global and must divide by process_count "
                         f"({process_count}); use a multiple of {process_count}")
    if name in GENERATED:
        return GENERATED[name].make_iterator(_geometry(name, geometry), batch_size=batch_size, seed=seed,
                                             process_index=process_index, process_count=process_count)
    if loader == "grain":
        if num_epochs is not None:
            raise ValueError("loader 'grain' repeats without end: num_epochs must be None")
        from diffusion_jax.data import grain_input

        vdir = storage.ensure_prepared(name, data_dir=data_dir, auto_prepare=auto_prepare)
        cache = vdir / storage.CACHE_DIR  # storage's decoded cache, read record by record
        if not (cache / f"{split}-images.npy").exists():
            raise ValueError(f"split {split!r} not in dataset {name!r} ({cache})")
        if source == "records":
            records = _records(name, split, vdir, data_dir)
        else:
            records = grain_input.NpyRecords(cache / f"{split}-images.npy", cache / f"{split}-labels.npy")
        return grain_input.make_grain_iterator(
            records, batch_size=batch_size, seed=seed, shuffle=shuffle, random_flip=random_flip,
            process_index=process_index, process_count=process_count, num_workers=num_workers,
            dataset=name, split=split)
    images, labels = load_arrays(name, split, data_dir=data_dir, auto_prepare=auto_prepare)
    check_labels(name, split, labels, data_dir=data_dir)
    return BatchIterator(images, labels, batch_size=batch_size, seed=seed, shuffle=shuffle,
                         random_flip=random_flip, num_epochs=num_epochs, process_index=process_index,
                         process_count=process_count, dataset=name, split=split)


def _records(name: str, split: str, vdir, data_dir):
    """The split's array_record files as a `records.TfdsRecords` source, checked against the cache's size."""
    from diffusion_jax.data import records

    meta = storage.info(name, data_dir=data_dir)
    files = records.record_files(vdir, split)
    if not files:
        raise DatasetError(f"dataset {name!r} has no array_record files of split {split!r} in {vdir} (a dataset "
                           "written by data.write_arrays has only the decoded cache); read it with source "
                           "'decoded' (config.data.source), or prepare it again with tfds")
    source = records.TfdsRecords(files, meta.image_shape)
    if len(source) != meta.splits[split]:
        raise DatasetError(f"dataset {name!r} split {split!r}: {len(source)} array_record records in {vdir} but "
                           f"{meta.splits[split]} in its decoded cache; delete {vdir} and run "
                           f"`python -m diffusion_jax.data prepare {name}`")
    return source


def data_source(name: str, split: str, *, data_dir=None, auto_prepare: bool = True) -> ArraySource:
    """A grain-compatible random-access source of uint8 records (see `ArraySource`)."""
    images, labels = load_arrays(name, split, data_dir=data_dir, auto_prepare=auto_prepare)
    check_labels(name, split, labels, data_dir=data_dir)
    return ArraySource(images, labels)


def check_labels(name: str, split: str, labels, *, data_dir=None) -> None:
    """DatasetError unless every label is in [0, num_classes) (any value if the
    dataset has no classes): a label num_classes would train the null label of
    classifier-free guidance, a larger one look up no embedding at all."""
    import numpy as np

    k = info(name, data_dir=data_dir).num_classes
    labels = np.asarray(labels)
    if k > 0 and labels.size and (labels.min() < 0 or labels.max() >= k):
        bad = int(np.count_nonzero((labels < 0) | (labels >= k)))
        raise DatasetError(
            f"dataset {name!r} split {split!r} has {bad} label(s) outside [0, {k}) (min {int(labels.min())}, "
            f"max {int(labels.max())}); prepare it again: python -m diffusion_jax.data prepare {name}")
