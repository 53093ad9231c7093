"""tfds' array_record files of a prepared split, read back without TensorFlow.

    source = TfdsRecords(vdir, "train", image_shape=(28, 28, 1))
    source.read_batch([3, 1, 4])  # {"image": uint8 [3, 28, 28, 1], "label": int32 [3]}

`prepare` writes each split as <vdir>/<name>-<split>.array_record-<i>-of-<n>
(tfds' layout, `storage`). Record i of the shards taken in order is example i
of tfds' data source, hence row i of the decoded cache: one serialized
`tf.train.Example` whose feature "image" holds the PNG bytes that tfds'
`Image` feature wrote and "label" the class (int64). Reading it needs three
things, none of them TensorFlow: array_record's reader (a tensorflow-datasets
dependency), the protobuf wire format of `tf.train.Example` (parsed here in
a few lines, `parse_example`) and a PNG decoder (pillow, `decode_png`).
PNG is lossless, so the pixels are the decoded cache's, bit for bit.
"""

from __future__ import annotations

import io
import json
import pathlib
import struct

import numpy as np

FILE_FORMAT = "array_record"


# ---------------------------------------------------------------------------
# tf.train.Example, from the protobuf wire format
# ---------------------------------------------------------------------------

def _varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf) -> list[tuple[int, int, object]]:
    """(field number, wire type, value) of each field of a protobuf message:
    an int for a varint (wire type 0), a memoryview for a length-delimited
    field (2); fixed-width fields (1, 5: floats) are skipped as None."""
    out, i, n = [], 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"not a tf.train.Example: protobuf wire type {wire}")
        out.append((key >> 3, wire, value))
    if i != n:
        raise ValueError("not a tf.train.Example: the last field runs past the record")
    return out


def parse_example(record: bytes) -> dict:
    """{feature name: list of bytes (a BytesList) or of ints (an Int64List)} of a
    serialized tf.train.Example; FloatList features come back empty (unused here).

    Example = {1: Features}; Features = {1: repeated map entry {1: name, 2: Feature}};
    Feature = oneof {1: BytesList, 2: FloatList, 3: Int64List}, each {1: repeated value}
    (tensorflow/core/example/{example,feature}.proto). Int64List values come packed
    (one length-delimited field) or one varint each; both are read.
    """
    out = {}
    for number, _, features in _fields(memoryview(record)):
        if number != 1:
            continue
        for number, _, entry in _fields(features):
            if number != 1:
                continue
            entry = {n: v for n, _, v in _fields(entry)}
            name, values = bytes(entry.get(1, b"")).decode(), []
            for kind, _, lst in _fields(entry.get(2, b"")):
                for n, wire, v in _fields(lst):
                    if n != 1:
                        continue
                    if kind == 1:
                        values.append(bytes(v))
                    elif kind == 3 and wire == 0:
                        values.append(v)
                    elif kind == 3:  # packed
                        i = 0
                        while i < len(v):
                            x, i = _varint(v, i)
                            values.append(x)
            out[name] = [x - (1 << 64) if isinstance(x, int) and x >= 1 << 63 else x for x in values]
    return out


# ---------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}  # 8-bit colour types -> pillow modes


def decode_png(data: bytes) -> np.ndarray:
    """uint8 [H, W, C] pixels of a PNG.

    The images tfds writes (8 bits, grey / RGB / with alpha, not interlaced) are
    decoded by handing the joined IDAT chunks to pillow's zlib + PNG-filter decoder
    directly, about 3x faster than `PIL.Image.open` on 28x28 images, which parses
    the chunks in Python; anything else (palettes, expanded to colours; interlacing)
    goes through `PIL.Image.open`; 16-bit images are refused. zlib checks the pixel
    data's Adler-32 either way.
    """
    from PIL import Image

    image = None
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR":
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        mode = _PNG_MODES.get(colour)
        if depth == 8 and mode is not None and not interlace:
            idat, i = [], 8
            while i + 8 <= len(data):
                size, kind = struct.unpack(">I4s", data[i:i + 8])
                if kind == b"IDAT":
                    idat.append(data[i + 8:i + 8 + size])
                elif kind == b"IEND":
                    break
                i += 12 + size  # length, type, data, CRC
            image = Image.frombytes(mode, (width, height), b"".join(idat), "zip", mode)
    if image is None:
        with Image.open(io.BytesIO(data), formats=("PNG",)) as opened:
            if opened.mode == "P":  # palette indices -> colours
                image = opened.convert("RGBA" if "transparency" in opened.info else "RGB")
            else:
                image = opened.copy()
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        raise ValueError(f"PNG of {pixels.dtype} pixels; only 8-bit images are supported")
    return pixels[..., None] if pixels.ndim == 2 else pixels


# ---------------------------------------------------------------------------
# The records of a split
# ---------------------------------------------------------------------------

def record_files(vdir, split: str) -> list[pathlib.Path]:
    """The array_record shards of `split` in a tfds version folder, in order."""
    vdir = pathlib.Path(vdir)
    try:
        name = json.loads((vdir / "dataset_info.json").read_text())["name"]
    except (OSError, ValueError, KeyError):
        name = vdir.parent.name
    return sorted(vdir.glob(f"{name}-{split}.{FILE_FORMAT}-*"))


class TfdsRecords:
    """Random-access records {"image": uint8 [H, W, C], "label": int32} of a split's
    array_record files (grain's RandomAccessDataSource protocol, plus `read_batch`).
    Each read parses the tf.train.Example and decodes the PNG, so in a grain
    pipeline the decoding runs where grain's map runs: in its worker processes
    when there are any. Pickles as the paths; a worker opens the files itself."""

    def __init__(self, paths, image_shape):
        from array_record.python.array_record_data_source import ArrayRecordDataSource

        self._paths = [str(p) for p in paths]
        if not self._paths:
            raise ValueError("no array_record files given")
        self.image_shape = tuple(int(d) for d in image_shape)
        self._records = ArrayRecordDataSource(self._paths)

    def __getstate__(self) -> dict:
        return {"paths": self._paths, "image_shape": self.image_shape}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"], state["image_shape"])

    def __len__(self) -> int:
        return len(self._records)

    def _decode(self, index: int, record: bytes) -> tuple[np.ndarray, int]:
        example = parse_example(record)
        try:
            (png,) = example["image"]
        except (KeyError, ValueError):
            raise ValueError(f"record {index} of {self._paths[0]}...: no single 'image' feature "
                             f"(features: {sorted(example)})") from None
        image = decode_png(png)
        if image.shape != self.image_shape:
            raise ValueError(f"record {index} of {self._paths[0]}...: image {image.shape}, "
                             f"expected {self.image_shape}")
        label = example.get("label", [0])  # no label feature: 0, as in the decoded cache
        return image, int(label[0])

    def read_batch(self, indices) -> dict:
        """{"image": uint8 [n, H, W, C], "label": int32 [n]} of the records `indices`."""
        indices = [int(i) for i in indices]
        images = np.empty((len(indices), *self.image_shape), np.uint8)
        labels = np.empty((len(indices),), np.int32)
        for row, (index, record) in enumerate(zip(indices, self._records.__getitems__(indices))):
            images[row], labels[row] = self._decode(index, record)
        return {"image": images, "label": labels}

    def __getitem__(self, index: int) -> dict:
        image, label = self._decode(int(index), self._records[int(index)])
        return {"image": image, "label": np.int32(label)}
