"""TFRecord files and `tf.train.Example` records without TensorFlow.

A TFRecord file is a sequence of records, each framed as
`uint64 length (little-endian) · uint32 masked_crc32c(length) · data · uint32 masked_crc32c(data)`,
masked_crc(x) = ((crc >> 15) | (crc << 17)) + 0xa282ead8 (mod 2³²), crc32c the Castagnoli CRC.
A `tf.train.Example` is the protobuf `Example{Features features = 1}`, `Features{map<string,
Feature> feature = 1}`, `Feature{oneof: BytesList bytes_list = 1; FloatList float_list = 2;
Int64List int64_list = 3}`, each list a `repeated value = 1` (packed or not). Only that much of the
wire format is decoded here (and written, for tests and for making shards), so neither TensorFlow
nor generated protobuf classes are needed.

`read_records` yields every record's bytes and stops at a torn or corrupt frame (a length whose
CRC fails cannot be trusted to find the next record); a record whose data CRC fails is reported
as `CorruptRecord` and reading goes on after it, since its length was valid.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from alignet_core.errors import InputError

_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """The CRC-32C (Castagnoli) of data."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C of data."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class CorruptRecord:
    """A record whose data failed its CRC (yielded in its place by `read_records`)."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason

    def __repr__(self) -> str:
        return f"CorruptRecord({self.index}, {self.reason!r})"


def read_records(f: BinaryIO, what: str = "tfrecord", max_record_bytes: int = 64 << 20) -> Iterator[bytes | CorruptRecord]:
    """Each record's data of an open TFRecord file, in order; `CorruptRecord` for one whose data
    CRC fails. A frame whose header is torn or whose length CRC fails ends the file with an
    InputError naming `what` and the record's index (nothing after it can be located)."""
    index = 0
    while True:
        header = f.read(12)
        if not header:
            return
        if len(header) < 12:
            raise InputError(f"{what}: record {index}: torn header ({len(header)} of 12 bytes)")
        length_bytes, length_crc = header[:8], struct.unpack("<I", header[8:])[0]
        if masked_crc(length_bytes) != length_crc:
            raise InputError(f"{what}: record {index}: the length's CRC fails; the file is corrupt from here on")
        (length,) = struct.unpack("<Q", length_bytes)
        if length > max_record_bytes:
            raise InputError(f"{what}: record {index}: {length} bytes is more than the {max_record_bytes} allowed")
        data = f.read(length)
        footer = f.read(4)
        if len(data) < length or len(footer) < 4:
            raise InputError(f"{what}: record {index}: torn record ({len(data)} of {length} bytes)")
        if masked_crc(data) != struct.unpack("<I", footer)[0]:
            yield CorruptRecord(index, "data CRC mismatch")
        else:
            yield data
        index += 1


def frame_record(data: bytes) -> bytes:
    """One record's bytes as they sit in a TFRecord file."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc(length)) + data + struct.pack("<I", masked_crc(data))


# --- tf.train.Example, the few wire-format pieces it needs ---

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of a message: bytes for length-delimited, int otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise ValueError("truncated field")
            yield field, wire, buf[pos:pos + n]
            pos += n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise ValueError("truncated fixed32")
            yield field, wire, struct.unpack("<I", buf[pos:pos + 4])[0]
            pos += 4
        elif wire == 1:
            if pos + 8 > len(buf):
                raise ValueError("truncated fixed64")
            yield field, wire, struct.unpack("<Q", buf[pos:pos + 8])[0]
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _feature(buf: bytes) -> list[bytes] | list[float] | list[int]:
    for kind, _wire, lst in _fields(buf):
        if not isinstance(lst, bytes):
            raise ValueError("malformed Feature")
        if kind == 1:
            return [v for f, w, v in _fields(lst) if f == 1 and isinstance(v, bytes)]
        if kind == 2:
            out: list[float] = []
            for f, w, v in _fields(lst):
                if f == 1 and w == 2:
                    out.extend(struct.unpack(f"<{len(v) // 4}f", v))  # type: ignore[arg-type]
                elif f == 1 and w == 5:
                    out.append(struct.unpack("<f", struct.pack("<I", v))[0])  # type: ignore[arg-type]
            return out
        if kind == 3:
            ints: list[int] = []
            for f, w, v in _fields(lst):
                if f == 1 and w == 2:
                    pos = 0
                    while pos < len(v):  # type: ignore[arg-type]
                        x, pos = _varint(v, pos)  # type: ignore[arg-type]
                        ints.append(_signed64(x))
                elif f == 1 and w == 0:
                    ints.append(_signed64(v))  # type: ignore[arg-type]
            return ints
    return []


def parse_example(data: bytes) -> dict[str, list[bytes] | list[float] | list[int]]:
    """A serialized tf.train.Example → {feature name: its values}. ValueError if malformed."""
    out: dict[str, list[bytes] | list[float] | list[int]] = {}
    for field, _w, features in _fields(data):
        if field != 1 or not isinstance(features, bytes):
            continue
        for f, _w2, entry in _fields(features):
            if f != 1 or not isinstance(entry, bytes):
                continue
            name, value = None, b""
            for k, _w3, v in _fields(entry):
                if k == 1 and isinstance(v, bytes):
                    name = v.decode("utf-8")
                elif k == 2 and isinstance(v, bytes):
                    value = v
            if name is None:
                raise ValueError("feature without a name")
            out[name] = _feature(value)
    return out


def _key(field: int, wire: int) -> bytes:
    return _encode_varint(field << 3 | wire)


def _encode_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _delimited(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _encode_varint(len(payload)) + payload


def encode_example(features: dict[str, bytes | int | float | list]) -> bytes:
    """A tf.train.Example holding `features`: bytes → bytes_list, int → int64_list (packed),
    float → float_list (packed); a list holds several values of one kind."""
    entries = b""
    for name, value in features.items():
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, bytes) for v in values):
            lst = _delimited(1, b"".join(_delimited(1, v) for v in values))
        elif all(isinstance(v, int) for v in values):
            lst = _delimited(3, _delimited(1, b"".join(_encode_varint(v) for v in values)))
        elif all(isinstance(v, float) for v in values):
            lst = _delimited(2, _delimited(1, struct.pack(f"<{len(values)}f", *values)))
        else:
            raise InputError(f"encode_example: feature {name!r} mixes kinds or has an unsupported kind")
        entry = _delimited(1, name.encode("utf-8")) + _delimited(2, lst)
        entries += _delimited(1, entry)
    return _delimited(1, entries)
