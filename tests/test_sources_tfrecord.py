"""TFRecord framing with CRC checks and tf.train.Example decoding, against an independent hand encoder."""

from __future__ import annotations

import struct

import google_crc32c
import numpy as np
import pytest

from tests.fixtures_formats import _len_delimited, _varint, pb_example, tfrecord_bytes
from worldmodel.sources.tfrecord import (
    TFRecordError,
    iter_records,
    make_example,
    masked_crc32c,
    parse_example,
    write_records,
)


def test_crc32c_is_castagnoli_and_framing_matches_independent_writer(tmp_path):
    assert google_crc32c.value(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    recs = [b"", b"hello", bytes(range(256)) * 5]
    ours = write_records(tmp_path / "a.tfrecords", recs).read_bytes()
    assert ours == tfrecord_bytes(recs)
    assert [r.data for r in iter_records(tmp_path / "a.tfrecords")] == recs
    # masked CRC of the 8-byte length field, stored right after it
    assert struct.unpack("<I", ours[8:12])[0] == masked_crc32c(struct.pack("<Q", 0))


def test_example_decoding_matches_hand_encoded_wire_format():
    feats = {
        "0/image/encoded": b"\x00\x01\xff" * 4,
        "0/action": np.array([0.5, -1.25, 3e-8, 7.0], np.float32),
        "ids": np.array([0, 1, -3, 2**40]),
        "multi": [b"a", b"bc"],
    }
    got = parse_example(pb_example(feats))
    assert got["0/image/encoded"] == [feats["0/image/encoded"]] and got["multi"] == [b"a", b"bc"]
    np.testing.assert_array_equal(got["0/action"], feats["0/action"])
    np.testing.assert_array_equal(got["ids"], feats["ids"])
    assert got["ids"].dtype == np.int64 and got["0/action"].dtype == np.float32
    # our own encoder yields the same message
    again = parse_example(make_example(feats))
    assert again.keys() == got.keys() and np.array_equal(again["ids"], got["ids"])


def test_unpacked_float_list_is_accepted():
    # FloatList.value written element by element (wire type 5), as old proto2 writers may do
    floats = b"".join(_varint(1 << 3 | 5) + struct.pack("<f", v) for v in (1.0, 2.5))
    feature = _len_delimited(2, floats)
    entry = _len_delimited(1, b"x") + _len_delimited(2, feature)
    data = _len_delimited(1, _len_delimited(1, entry))
    np.testing.assert_array_equal(parse_example(data)["x"], [1.0, 2.5])


def test_not_an_example_raises_value_error():
    with pytest.raises(ValueError, match="not a serialized tf.train.Example"):
        parse_example(b"\xff\xff\xff\xff")


def _three(tmp_path):
    path = tmp_path / "f.tfrecords"
    path.write_bytes(tfrecord_bytes([b"r0" * 10, b"r1" * 10, b"r2" * 10]))
    return path


def test_data_crc_failure_names_file_and_record_and_can_be_skipped(tmp_path):
    path = _three(tmp_path)
    raw = bytearray(path.read_bytes())
    rec_len = 12 + 20 + 4
    raw[rec_len + 12 + 3] ^= 0xFF  # a byte inside record 1's data
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=r"f\.tfrecords: record 1: data CRC mismatch") as e:
        list(iter_records(path))
    assert e.value.framing_ok and e.value.index == 1
    recs = list(iter_records(path, skip_corrupt=True))
    assert [(r.index, r.data) for r in recs] == [(0, b"r0" * 10), (1, None), (2, b"r2" * 10)]
    assert recs[1].error is not None
    # without verification the corrupt bytes come through
    assert list(iter_records(path, verify=False))[1].data != b"r1" * 10


def test_length_crc_failure_and_truncation_end_the_file(tmp_path):
    path = _three(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[36] ^= 0x01  # record 1's length field
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match="record 1: length CRC mismatch"):
        list(iter_records(path))
    recs = list(iter_records(path, skip_corrupt=True))
    assert [r.index for r in recs] == [0, 1] and recs[1].data is None and not recs[1].error.framing_ok

    good = _three(tmp_path).read_bytes()
    path.write_bytes(good[:-7])
    with pytest.raises(TFRecordError, match="record 2: truncated data"):
        list(iter_records(path))
    path.write_bytes(good + b"\x01\x02")
    with pytest.raises(TFRecordError, match="record 3: truncated header"):
        list(iter_records(path))
