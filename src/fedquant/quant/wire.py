"""The byte layout of a payload: one walker over its header and records, and :func:`reseal`.

The layout itself is documented in :mod:`fedquant.quant.codec`. This module
knows where every field lies and nothing about what a valid value is: the
decoder (:func:`fedquant.quant.codec.decode`) walks a payload with
:func:`read_record` and checks each field as it is read (a
:class:`RecordCheck`); the fuzzer and the hostile-client modes walk it
leniently with :func:`walk` to find the offsets of the fields they rewrite,
then :func:`reseal` the result.

>>> import numpy as np
>>> from fedquant.quant.codec import encode
>>> layout = walk(encode({"w": np.ones((2, 3), np.float32)}, seed=0))
>>> layout.header.n_tensors, [bytes(r.name) for r in layout.records]
(1, [b'w'])
>>> [f.name for f in layout.records[0].fields()][:3]
['name_len', 'dtype', 'kind']
"""

from __future__ import annotations

import functools
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import crc32c

from fedquant.errors import DecodeError

MAGIC = b"FQNT"
#: the version encode writes
VERSION = 2
#: the versions decode reads (1: the same layout with a zlib CRC-32)
READ_VERSIONS = (1, 2)

HEADER = struct.Struct("<4sHHQII")
RECORD_FIXED = struct.Struct("<BBBBBBBB")
U16 = struct.Struct("<H")
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
#: a record's mse and data_len
MSE_LEN = struct.Struct("<dQ")
CRC = struct.Struct("<I")

KIND_QUANT, KIND_FLOAT, KIND_INT = 0, 1, 2
#: the names of a record's eight one-byte fields, in order
FIXED_NAMES = ("dtype", "kind", "bits", "granularity", "transform", "coding", "ndim", "reserved")


class Field(NamedTuple):
    """A fixed-size field of a payload: its name, where it is and its ``struct`` format."""

    name: str  # e.g. "n_tensors", "tensor[0].dims[1]"
    offset: int
    fmt: str  # "<B", "<H", "<I", "<Q", "<f", "<d"

    @property
    def size(self) -> int:
        """Bytes of the field."""
        return struct.calcsize(self.fmt)


#: the header's integer fields after the magic
HEADER_FIELDS = (
    Field("version", 4, "<H"),
    Field("flags", 6, "<H"),
    Field("total_len", 8, "<Q"),
    Field("n_tensors", 16, "<I"),
    Field("meta_len", 20, "<I"),
)


class Header(NamedTuple):
    """The fixed 24-byte header, as found (unchecked)."""

    magic: bytes
    version: int
    flags: int
    total_len: int
    n_tensors: int
    meta_len: int


def read_header(buf: bytes | bytearray | memoryview) -> Header:
    """The header fields of ``buf`` (at least :data:`HEADER` ``.size`` bytes), unchecked."""
    return Header(*HEADER.unpack_from(buf, 0))


def checksum(data: bytes | bytearray | memoryview, version: int = VERSION) -> int:
    """The payload checksum of ``data`` for a format version.

    Version 2 uses CRC-32C (Castagnoli), computed with the CPU's CRC instructions
    by the ``crc32c`` package (about memory speed); version 1 used zlib's CRC-32
    (several times slower). Any other version gets the current one's.
    """
    if version == 1:
        return zlib.crc32(data)
    return int(crc32c.crc32c(data))


def reseal(data: bytes | bytearray | memoryview, *, length: bool = True, crc: bool = True) -> bytes:
    """``data`` with the header's total length and the trailing checksum rewritten to
    match it (for tests, fuzzers and hostile clients that edit fields behind the checksum).

    The checksum follows the version field of the header (after the length is
    fixed). ``length=False`` or ``crc=False`` leaves that field as it is. Inputs
    shorter than a header plus checksum come back unchanged.
    """
    buf = bytearray(data)
    if len(buf) >= HEADER.size + CRC.size:
        if length:
            U64.pack_into(buf, 8, len(buf))
        if crc:
            version = U16.unpack_from(buf, 4)[0]
            CRC.pack_into(buf, len(buf) - CRC.size, checksum(memoryview(buf)[: -CRC.size], version))
    return bytes(buf)


def data_size(kind: int, bits: int, numel: int) -> int:
    """Bytes of a plain record's data: packed codes, float32 values or raw integers."""
    if kind == KIND_QUANT:
        return (numel * bits + 7) // 8
    if kind == KIND_FLOAT:
        return 4 * numel
    return (bits // 8) * numel


def pack_head(name_len: int, name: bytes, fixed: Sequence[int], dims: Sequence[int]) -> bytes:
    """A record's bytes up to its scale count: name length, name, the eight bytes, dims.

    The values are written as given (masked to their width), consistent or not.
    """
    return b"".join(
        (
            U16.pack(name_len & 0xFFFF),
            name,
            bytes(v & 0xFF for v in fixed),
            b"".join(U64.pack(d & 0xFFFFFFFFFFFFFFFF) for d in dims),
        )
    )


@functools.lru_cache(maxsize=256)
def _dims(ndim: int) -> struct.Struct:
    """The ``ndim`` u64 dims of a record."""
    return struct.Struct(f"<{ndim}Q")


class Cursor:
    """Bounds-checked reader over ``buf[start:end]``; a read past ``end`` raises
    :class:`~fedquant.errors.DecodeError` naming what was being read.

    What is being read is named by ``where`` and ``part``, joined only when an
    error is raised (formatting a message per field cost more than the reading).
    """

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, start: int, end: int) -> None:
        self.buf, self.pos, self.end = buf, start, end

    @property
    def left(self) -> int:
        """Bytes between the cursor and ``end``."""
        return self.end - self.pos

    def take(self, n: int, where: str, part: str = "") -> memoryview:
        """The next ``n`` bytes."""
        pos = self.pos
        if n < 0 or pos + n > self.end:
            what = f"{where} {part}" if part else where
            raise DecodeError(
                f"decode: payload truncated in {what}: need {n} byte(s) at offset {pos}, "
                f"{self.end - pos} left"
            )
        self.pos = pos + n
        return self.buf[pos : pos + n]

    def unpack(self, st: struct.Struct, where: str, part: str = "") -> tuple[Any, ...]:
        """The next ``st.size`` bytes, unpacked."""
        pos = self.pos
        if pos + st.size > self.end:
            self.take(st.size, where, part)  # raises the truncation error
        self.pos = pos + st.size
        return st.unpack_from(self.buf, pos)


_EMPTY = memoryview(b"")


@dataclass(slots=True, eq=False)
class Record:
    """One record as found: its field values and where each field lies in the payload.

    Filled in the order of the layout by :func:`read_record`; a
    :class:`RecordCheck` sees it half-filled at each step.
    """

    start: int  # offset of name_len
    name_len: int = 0
    name: memoryview = _EMPTY
    fixed: tuple[int, ...] = ()  # dtype, kind, bits, granularity, transform, coding, ndim, reserved
    dims: tuple[int, ...] = ()
    n_scales: int = 0
    scales: memoryview = _EMPTY
    mse: float = 0.0
    data_len: int = 0
    data: memoryview = _EMPTY

    @property
    def kind(self) -> int:
        """0 quantized, 1 raw float32, 2 raw integer (:data:`KIND_QUANT` ...)."""
        return self.fixed[1]

    @property
    def fixed_at(self) -> int:
        """Offset of the eight one-byte fields."""
        return self.start + U16.size + self.name_len

    @property
    def n_scales_at(self) -> int:
        """Offset of the scale count."""
        return self.fixed_at + RECORD_FIXED.size + U64.size * len(self.dims)

    @property
    def scales_at(self) -> int:
        """Offset of the first scale."""
        return self.n_scales_at + U32.size

    @property
    def mse_at(self) -> int:
        """Offset of the MSE (the data length follows it)."""
        return self.scales_at + 4 * self.n_scales

    @property
    def data_at(self) -> int:
        """Offset of the data."""
        return self.mse_at + MSE_LEN.size

    @property
    def end(self) -> int:
        """Offset just past the record."""
        return self.data_at + self.data_len

    def fields(self, prefix: str = "") -> list[Field]:
        """Every integer and float field of the record at its offset in the payload."""
        out = [Field(prefix + "name_len", self.start, "<H")]
        at = self.fixed_at
        out += [Field(prefix + n, at + k, "<B") for k, n in enumerate(FIXED_NAMES)]
        at += RECORD_FIXED.size
        out += [Field(f"{prefix}dims[{j}]", at + 8 * j, "<Q") for j in range(len(self.dims))]
        out.append(Field(prefix + "n_scales", self.n_scales_at, "<I"))
        out += [
            Field(f"{prefix}scales[{j}]", self.scales_at + 4 * j, "<f")
            for j in range(self.n_scales)
        ]
        out += [
            Field(prefix + "mse", self.mse_at, "<d"),
            Field(prefix + "data_len", self.mse_at + 8, "<Q"),
        ]
        return out


class RecordCheck(Protocol):
    """What the decoder checks at each step of :func:`read_record` (raising
    :class:`~fedquant.errors.DecodeError`), before the next field is read."""

    def name_len(self, rec: Record, where: str) -> None:
        """After the name length."""

    def name(self, rec: Record, where: str) -> str:
        """After the name; returns how errors name the record from now on."""
        ...

    def fixed(self, rec: Record, where: str) -> None:
        """After the eight one-byte fields (before ``ndim`` dims are read)."""

    def dims(self, rec: Record, where: str) -> None:
        """After the dims."""

    def n_scales(self, rec: Record, where: str) -> None:
        """After the scale count (before the scales are read)."""

    def scales(self, rec: Record, where: str) -> None:
        """After the scales."""

    def data_len(self, rec: Record, where: str, left: int) -> None:
        """After the MSE and the data length (before ``data_len`` bytes are read);
        ``left`` bytes remain."""


def read_record(cur: Cursor, where: str, check: RecordCheck | None = None) -> Record:
    """Read one record at the cursor, field by field in the layout's order.

    ``where`` names the record in truncation errors until ``check.name`` renames
    it. Raises :class:`~fedquant.errors.DecodeError` on a read past the
    cursor's end, and whatever ``check`` raises.
    """
    rec = Record(cur.pos)
    rec.name_len = cur.unpack(U16, where, "name length")[0]
    if check is not None:
        check.name_len(rec, where)
    rec.name = cur.take(rec.name_len, where, "name")
    if check is not None:
        where = check.name(rec, where)
    rec.fixed = cur.unpack(RECORD_FIXED, where)
    if check is not None:
        check.fixed(rec, where)
    rec.dims = cur.unpack(_dims(rec.fixed[6]), where, "shape")
    if check is not None:
        check.dims(rec, where)
    rec.n_scales = cur.unpack(U32, where, "scale count")[0]
    if check is not None:
        check.n_scales(rec, where)
    if rec.n_scales:
        rec.scales = cur.take(4 * rec.n_scales, where, "scales")
    if check is not None:
        check.scales(rec, where)
    rec.mse, rec.data_len = cur.unpack(MSE_LEN, where, "mse and data length")
    if check is not None:
        check.data_len(rec, where, cur.left)
    rec.data = cur.take(rec.data_len, where, "data")
    return rec


@dataclass(frozen=True)
class Layout:
    """A payload walked leniently (:func:`walk`): the header, and the records as far as
    they could be read; the bytes from ``tail_at`` to ``crc_at`` follow the last one."""

    header: Header
    meta: memoryview
    records: tuple[Record, ...]
    tail_at: int
    crc_at: int

    def fields(self) -> list[Field]:
        """Every integer and float field: the header's, then each record's."""
        out = list(HEADER_FIELDS)
        for i, rec in enumerate(self.records):
            out += rec.fields(f"tensor[{i}].")
        return out


def walk(payload: bytes | bytearray | memoryview, max_records: int | None = None) -> Layout | None:
    """The layout of ``payload`` read without checking any value.

    Records are read as far as they fit before the checksum (at most
    ``max_records`` of them, at most as many as the header claims); ``None`` if
    not even the header and metadata fit.
    """
    buf = memoryview(payload).cast("B")
    if len(buf) < HEADER.size + CRC.size:
        return None
    header = read_header(buf)
    crc_at = len(buf) - CRC.size
    if HEADER.size + header.meta_len > crc_at:
        return None
    cur = Cursor(buf, HEADER.size + header.meta_len, crc_at)
    count = header.n_tensors if max_records is None else min(header.n_tensors, max_records)
    records: list[Record] = []
    for i in range(count):
        try:
            rec = read_record(cur, f"tensor #{i}")
        except DecodeError:
            break
        records.append(rec)
    tail_at = records[-1].end if records else HEADER.size + header.meta_len
    return Layout(
        header, buf[HEADER.size : HEADER.size + header.meta_len], tuple(records), tail_at, crc_at
    )
