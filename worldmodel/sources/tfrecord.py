"""TFRecord files and ``tf.train.Example`` messages, read without TensorFlow.

TFRecord framing (TensorFlow ``core/lib/io/record_writer.cc``), repeated to the end of the file::

    uint64 length          little-endian
    uint32 masked_crc32c(length bytes)
    byte   data[length]
    uint32 masked_crc32c(data)

with ``masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2**32)`` over CRC-32C
(Castagnoli). Both checksums are verified. The framing is hand-written (20 lines) because the PyPI
readers we looked at (``tfrecord``, ``tfrecord-lite``) skip CRC verification, which is exactly what
catches a corrupt download; the CRC itself comes from ``google-crc32c`` (Google's C library, with a
pure-Python fallback).

``tf.train.Example`` is decoded with the ``protobuf`` package from a descriptor built at import time
that reproduces TensorFlow's ``example.proto``/``feature.proto`` (field numbers, types, packing). We
use protobuf rather than a hand-written wire-format reader so that every valid encoding (packed and
unpacked repeated floats, unknown fields, any field order) is accepted exactly as TensorFlow would.
``protobuf`` is installed with ``tensorboard``, a dependency of this package.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from worldmodel.atomic import atomic_file

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (uint32)."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class TFRecordError(Exception):
    """A TFRecord file is truncated or fails a checksum.

    Attributes:
        path: the file.
        index: 0-based index of the record that is broken.
        framing_ok: True if only the record's data is broken (its length was verified), so reading
            can resume with the next record; False if the framing itself is lost (nothing after
            this point in the file can be trusted).
    """

    def __init__(self, path: str | os.PathLike, index: int, why: str, framing_ok: bool) -> None:
        super().__init__(f"{path}: record {index}: {why}")
        self.path, self.index, self.why, self.framing_ok = Path(path), index, why, framing_ok


@dataclass(frozen=True)
class Record:
    """One verified record: its index in the file and its payload, or the error that broke it."""

    index: int
    data: bytes | None
    error: TFRecordError | None = None


def iter_records(
    path: str | os.PathLike, *, verify: bool = True, skip_corrupt: bool = False
) -> Iterator[Record]:
    """Iterate over the records of a TFRecord file (uncompressed).

    Args:
        path: the ``.tfrecords`` file.
        verify: check both CRCs of every record (cost: ~1 GB/s).
        skip_corrupt: instead of raising :class:`TFRecordError`, yield a :class:`Record` whose
            ``data`` is None and ``error`` is set; a record whose data CRC fails is skipped and
            reading goes on with the next one; a broken length field or a truncated file ends
            the iteration (the rest of the file cannot be framed).

    Raises:
        TFRecordError: naming the file and the record index (unless ``skip_corrupt``).
        FileNotFoundError: if ``path`` does not exist.
    """
    path = Path(path)
    with open(path, "rb") as f:
        index = 0
        while True:
            header = f.read(12)
            if not header:
                return
            err = None
            if len(header) < 12:
                err = TFRecordError(
                    path, index, f"truncated header ({len(header)} of 12 bytes)", framing_ok=False
                )
            else:
                (length,) = struct.unpack("<Q", header[:8])
                (len_crc,) = struct.unpack("<I", header[8:])
                if verify and masked_crc32c(header[:8]) != len_crc:
                    err = TFRecordError(
                        path, index, "length CRC mismatch (corrupt or not a TFRecord file)", framing_ok=False
                    )
            if err is None:
                data = f.read(length)
                footer = f.read(4)
                if len(data) < length or len(footer) < 4:
                    err = TFRecordError(
                        path, index, f"truncated data ({len(data)} of {length} bytes)", framing_ok=False
                    )
                elif verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                    err = TFRecordError(path, index, "data CRC mismatch (corrupt record)", framing_ok=True)
            if err is not None:
                if not skip_corrupt:
                    raise err
                yield Record(index, None, err)
                if not err.framing_ok:
                    return
            else:
                yield Record(index, data)
            index += 1


def write_records(path: str | os.PathLike, records: list[bytes]) -> Path:
    """Write ``records`` as a TFRecord file (atomically: temporary name, then rename)."""
    path = Path(path)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        for data in records:
            n = struct.pack("<Q", len(data))
            f.write(n + struct.pack("<I", masked_crc32c(n)) + data + struct.pack("<I", masked_crc32c(data)))
    return path


# ----------------------------------------------------------------------------------------------
# tf.train.Example, from a descriptor equal to TensorFlow's feature.proto / example.proto
# ----------------------------------------------------------------------------------------------


def _build_example_class() -> type:
    F = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(
        name="tensorflow/core/example/example.proto", package="tensorflow", syntax="proto3"
    )

    def message(
        name: str,
        fields: list[tuple[str, int, int, int, str | None]],
        oneof: str | None = None,
        packed: bool = False,
    ) -> descriptor_pb2.DescriptorProto:
        m = fd.message_type.add(name=name)
        if oneof:
            m.oneof_decl.add(name=oneof)
        for fname, number, ftype, label, type_name in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if oneof:
                f.oneof_index = 0
            if packed:
                f.options.packed = True
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", [("value", 1, F.TYPE_BYTES, rep, None)])
    message("FloatList", [("value", 1, F.TYPE_FLOAT, rep, None)], packed=True)
    message("Int64List", [("value", 1, F.TYPE_INT64, rep, None)], packed=True)
    message(
        "Feature",
        [
            ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
            ("float_list", 2, F.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
            ("int64_list", 3, F.TYPE_MESSAGE, opt, ".tensorflow.Int64List"),
        ],
        oneof="kind",
    )
    features = message("Features", [("feature", 1, F.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".tensorflow.Feature")
    message("Example", [("features", 1, F.TYPE_MESSAGE, opt, ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()  # private pool: never clashes with a real TensorFlow install
    pool.Add(fd)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


Example = _build_example_class()
"""The ``tensorflow.Example`` protobuf message class (``Example().ParseFromString(data)``)."""

FeatureValue = list[bytes] | np.ndarray


def parse_example(data: bytes) -> dict[str, FeatureValue]:
    """Decode a serialized ``tf.train.Example`` into ``{key: value}``.

    ``bytes_list`` features become ``list[bytes]``, ``float_list`` float32 arrays, ``int64_list``
    int64 arrays; a feature with no kind set becomes an empty list.

    Raises:
        ValueError: if ``data`` is not a valid serialized Example.
    """
    from google.protobuf.message import DecodeError

    ex = Example()
    try:
        ex.ParseFromString(data)
    except DecodeError as e:
        raise ValueError(f"not a serialized tf.train.Example ({e})") from None
    out: dict[str, FeatureValue] = {}
    for key, feat in ex.features.feature.items():
        kind = feat.WhichOneof("kind")
        if kind == "bytes_list":
            out[key] = list(feat.bytes_list.value)
        elif kind == "float_list":
            out[key] = np.asarray(feat.float_list.value, np.float32)
        elif kind == "int64_list":
            out[key] = np.asarray(feat.int64_list.value, np.int64)
        else:
            out[key] = []
    return out


def make_example(features: dict[str, Any]) -> bytes:
    """Serialize ``{key: list[bytes] | float array | int array}`` as a ``tf.train.Example``."""
    ex = Example()
    for key, v in features.items():
        feat = ex.features.feature[key]
        if isinstance(v, (bytes, list)) and (isinstance(v, bytes) or all(isinstance(x, bytes) for x in v)):
            feat.bytes_list.value.extend([v] if isinstance(v, bytes) else v)
        else:
            a = np.asarray(v)
            if np.issubdtype(a.dtype, np.floating):
                feat.float_list.value.extend(a.ravel().astype(np.float32).tolist())
            elif np.issubdtype(a.dtype, np.integer):
                feat.int64_list.value.extend(a.ravel().astype(np.int64).tolist())
            else:
                raise TypeError(
                    f"feature {key!r}: expected bytes, a list of bytes, or a numeric array; got {a.dtype}"
                )
    return ex.SerializeToString(deterministic=True)
