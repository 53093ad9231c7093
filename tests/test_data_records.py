"""Tests for diffusion_jax.data.records and the grain loader's source "records".

The dataset is written by tfds itself (the Fashion-MNIST builder fed from IDX
files this test makes; TensorFlow is imported once, to prepare), so the records
are the real format; the oracle is the decoded cache of the same preparation.
The tests on that dataset are `slow` for TensorFlow's import and tfds' writer.
"""

import gzip
import io
import json
import struct

import numpy as np
import pytest

from diffusion_jax import data
from diffusion_jax.data import records, sources, storage

SIZES = {"train": 37, "test": 11}  # batches of 10 straddle epochs


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes()))


def _images(n, seed):
    """Noise, flat areas and gradients, so the PNG encoder uses several row filters."""
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    k[:, 10:20] = 17
    k[:, 20:] = (np.arange(28)[None, None, :] * 9 + np.arange(8)[None, :, None] * 3).astype(np.uint8)
    k[:, 0, 0] = np.arange(n)
    return k


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """fashion_mnist prepared through tfds from IDX files (array_record + decoded cache)."""
    root = tmp_path_factory.mktemp("records")
    idx = root / "idx"
    idx.mkdir()
    for seed, (split, (img_stem, lbl_stem)) in enumerate(sources.IDX_FILES.items()):
        n = SIZES[split]
        _write_idx(idx / f"{img_stem}.gz", _images(n, seed))
        _write_idx(idx / f"{lbl_stem}.gz", np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(storage.OFFLINE_ENV, "1")
        data.prepare("fashion_mnist", from_dir=idx, data_dir=root / "tfds")
    return root / "tfds"


def _it(data_dir, source, **kwargs):
    args = dict(batch_size=10, seed=3, random_flip=True, process_index=0, process_count=1,
                data_dir=data_dir, auto_prepare=False, loader="grain", source=source)
    args.update(kwargs)
    return data.make_iterator("fashion_mnist", "train", **args)


@pytest.mark.slow
def test_records_are_the_decoded_cache(data_dir):
    vdir = data.prepared_dir("fashion_mnist", data_dir)
    files = records.record_files(vdir, "train")
    assert [f.name for f in files] == ["fashion_mnist-train.array_record-00000-of-00001"]
    source = records.TfdsRecords(files, (28, 28, 1))
    images, labels = data.load_arrays("fashion_mnist", "train", data_dir=data_dir)
    got = source.read_batch(range(len(source)))
    np.testing.assert_array_equal(got["image"], images)
    np.testing.assert_array_equal(got["label"], labels)
    assert got["image"].dtype == np.uint8 and got["label"].dtype == np.int32
    assert source[5]["label"] == labels[5]


@pytest.mark.slow
@pytest.mark.parametrize("seed,process_count", [(3, 1), (8, 2)])
def test_same_batches_from_both_sources(data_dir, seed, process_count):
    """Same (seed, step, process) -> bit-identical images and labels from the records and the cache."""
    for p in range(process_count):
        its = [_it(data_dir, s, seed=seed, process_index=p, process_count=process_count) for s in data.SOURCES]
        for _ in range(6):  # 60 examples: past the first epoch of 37
            want, got = (next(it) for it in its)
            assert got["image"].dtype == want["image"].dtype == np.float32
            np.testing.assert_array_equal(got["image"], want["image"])
            np.testing.assert_array_equal(got["label"], want["label"])
        assert its[0].get_state() == its[1].get_state()


@pytest.mark.slow
def test_resume_with_the_other_source_and_in_a_worker(data_dir):
    """A state taken on the decoded cache resumes on the records, here decoded in a worker process."""
    decoded = _it(data_dir, "decoded")
    for _ in range(3):
        next(decoded)
    state = json.loads(json.dumps(decoded.get_state()))
    want = [next(decoded) for _ in range(2)]
    resumed = _it(data_dir, "records", num_workers=1)
    resumed.set_state(state)
    try:
        for w in want:
            got = next(resumed)
            np.testing.assert_array_equal(got["image"], w["image"])
            np.testing.assert_array_equal(got["label"], w["label"])
    finally:
        resumed.close()


def test_records_source_needs_grain_and_the_files(tmp_path):
    with pytest.raises(ValueError, match="loader='grain'"):
        _it(tmp_path, "records", loader="numpy")
    with pytest.raises(ValueError, match="source must be one of"):
        _it(tmp_path, "pngs")
    images = np.zeros((4, 2, 3, 1), np.uint8)
    data.write_arrays("toy", {"train": (images, np.zeros(4))}, num_classes=2, data_dir=tmp_path)
    with pytest.raises(data.DatasetError, match="no array_record files.*'decoded'"):
        data.make_iterator("toy", "train", batch_size=2, seed=0, process_index=0, process_count=1,
                           data_dir=tmp_path, loader="grain", source="records")


def _varint(x):
    out = b""
    while True:
        out += bytes([(x & 0x7F) | (0x80 if x > 0x7F else 0)])
        x >>= 7
        if not x:
            return out


def _field(number, payload):
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_parse_example_reads_bytes_packed_and_unpacked_ints():
    """Example bytes written from the proto's definition: BytesList, packed and unpacked
    Int64List (a negative value: ten bytes of two's complement), a FloatList skipped."""
    def entry(name, feature):
        return _field(1, _field(1, name.encode()) + _field(2, feature))

    image = _field(1, _field(1, b"\x89PNG...") + _field(1, b""))
    packed = _field(3, _field(1, _varint(7) + _varint(300)))
    unpacked = _field(3, _varint(1 << 3) + _varint(5) + _varint(1 << 3) + _varint((1 << 64) - 2))
    floats = _field(2, _field(1, struct.pack("<2f", 1.0, 2.0)))
    record = _field(1, entry("image", image) + entry("label", packed) + entry("ids", unpacked)
                    + entry("score", floats))
    assert records.parse_example(record) == {"image": [b"\x89PNG...", b""], "label": [7, 300],
                                             "ids": [5, -2], "score": []}


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_decode_png_matches_pillow(mode):
    """The direct IDAT path (L, RGB, RGBA) and pillow's reader (a palette, expanded) agree with pillow."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(9, 13, 4), dtype=np.uint8)
    pixels[:, :6] = 40
    image = Image.fromarray(pixels, "RGBA")
    image = image if mode == "RGBA" else image.convert("RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    want = np.asarray(image.convert("RGB") if mode == "P" else image)
    got = records.decode_png(buf.getvalue())
    np.testing.assert_array_equal(got, want.reshape(got.shape))
    assert got.shape == (9, 13, {"L": 1, "RGB": 3, "RGBA": 4, "P": 3}[mode])
