"""Structure-aware fuzzing of the wire format and of the server's ingest path.

The targets are :func:`fedquant.quant.codec.decode`, :func:`~fedquant.quant.codec.describe_payload`
and :func:`fedquant.fl.aggregation.aggregate_payloads`. Their contract, which every
generated input is checked against:

* rotated tensors are decoded with :data:`SHARED_KEY`, the key the seeds were
  encoded with (all three targets get it);
* only the documented exceptions escape: :class:`~fedquant.errors.DecodeError`
  (all three) and, for ``aggregate``, :class:`~fedquant.errors.InvalidInputError`
  for payloads that disagree with each other;
* ``inspect`` and ``decode`` agree: both accept, or both refuse with the same
  message; what ``decode`` accepts is self-consistent (shapes and dtypes as the
  info says, finite values, quantized values within ``[-s, s]`` -- within
  ``sqrt(block) * s`` for rotated ones), and averaging a
  payload with itself gives its own values back;
* no numpy floating-point error (overflow, invalid cast) in ``decode``/``inspect``;
* no hang: an input slower than ``hang_factor`` times the running median of its
  target (and than a floor and a per-byte allowance) in three re-runs is a
  failure; the command also runs a watchdog that saves the input and aborts
  on a real hang;
* bounded memory: on a sample of inputs the peak allocation traced by
  :mod:`tracemalloc` (numpy reports its buffers to it) must stay below
  ``factor * len(payload) + MEM_SLACK`` (see :data:`DECODE_MEM_FACTOR`).

How inputs are made (:class:`Mutator`): valid payloads from :func:`seed_payloads`
(every bit width, per-tensor and per-channel, raw float, integer and bool
tensors, empty and 0-d tensors, metadata) are parsed into their fields (see
:func:`field_offsets`); a mutation then (a) flips, overwrites, inserts or
deletes bytes, (b) rewrites a header or record field with a boundary value (0,
1, 2**k +- 1, the maximum, NaN/Inf for floats), (c) changes a record coherently
(shape, type, scales, data) so that it gets past the length checks, (d)
splices, drops, duplicates or reorders records between payloads, and finally,
for most inputs, (e) fixes the total length and the CRC32 so that the input
reaches the field parser. One input in 16 is passed as a ``bytearray``, a
``memoryview`` or a non-contiguous ``memoryview``. Inputs whose outcome is new
(a new normalized error message, a new kind of valid payload, or a failure)
join the mutation pool and, if a directory is given, the corpus (one small
input per coarse outcome class).

Findings in the aggregation code (it once returned numpy scalars for 0-d
tensors, wrapped int64 averages near the limits, and produced NaN weights when
MSE claims near the float64 maximum overflowed the median -- all fixed) are
failures; ``strict=False`` (``--lenient``) reports them as warnings instead.

Command::

    python -m fedquant.tools.fuzz --runs 1000000 --seed 1 [--corpus tests/fuzz_corpus]

prints the throughput and a summary and exits with status 1 on any failure.
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import math
import os
import random
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
import traceback
import tracemalloc
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.argparsing import Parser
from fedquant.errors import ConfigError, DecodeError, FedquantError, InvalidInputError
from fedquant.fl.aggregation import aggregate_payloads
from fedquant.quant import codec, wire
from fedquant.quant.wire import Field, reseal

__all__ = [
    "SHARED_KEY",
    "TARGETS",
    "Field",
    "FuzzFailure",
    "FuzzReport",
    "Mutator",
    "check_input",
    "field_offsets",
    "load_corpus",
    "main",
    "run_fuzz",
    "save_input",
    "seed_payloads",
]

#: what :func:`run_fuzz` exercises by default
TARGETS: tuple[str, ...] = ("decode", "inspect", "aggregate")
#: the shared rotation key of the seeds, passed to every target
SHARED_KEY = 0x5EED

#: Peak bytes ``decode``/``inspect`` may allocate per payload byte. Derivation:
#: a 1-bit quantized tensor expands to float32, 32 bytes per payload byte (32/bits
#: in general); everything else expands less (raw float32 and integers are
#: copied once, scales once), and the Python objects of a record (name, shape,
#: ``TensorInfo``, two array headers: about 700 bytes) stay below ~25 bytes per
#: byte of its at least 31-byte record. 40 leaves room for both in one payload.
DECODE_MEM_FACTOR = 40
#: Peak bytes ``aggregate_payloads`` may allocate per byte of its input payloads:
#: per element of a 1-bit tensor (1/8 payload byte) it holds the decoded float32
#: value (4 B), a float64 accumulator (8 B), the float64 product ``w * x`` (8 B)
#: and the float32 result (4 B) -- 24 B, i.e. 192 per payload byte of *one*
#: client, 96 per byte of the two payloads it is given here; 128 adds headroom.
AGGREGATE_MEM_FACTOR = 128
#: constant allowance on top: interpreter objects, and the level table of one
#: per-tensor quantized tensor (2**bits levels built in float64: ~5 KB at 8 bits)
MEM_SLACK = 16 * 1024
#: corpus files must be smaller than this
MAX_CORPUS_BYTES = 4096

_M64 = (1 << 64) - 1
_RAW_ITEMSIZE = {5: 8, 6: 4, 7: 2, 8: 1, 9: 1, 10: 1}  # integer dtype codes -> bytes


# --------------------------------------------------------------------------- seeds


@lru_cache(maxsize=1)
def _seed_tuple() -> tuple[bytes, ...]:
    import torch  # a dependency of fedquant; needed for bfloat16 tensors

    from fedquant.quant.entropy import EntropyCoding
    from fedquant.quant.grid import Rounding
    from fedquant.quant.quantizer import Granularity
    from fedquant.quant.spec import QuantSpec

    rng = np.random.default_rng(7)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    out: list[bytes] = []
    for bits in range(1, 9):
        for gran in Granularity:
            spec = QuantSpec(default_bits=bits, granularity=gran)
            out.append(codec.encode({"w": f32(4, 3)}, spec, seed=bits))
    q = QuantSpec(default_bits=4)
    out += [
        codec.encode({"b": f32(5)}, q, seed=0),  # raw float32
        codec.encode({"c": np.array(17, np.int64)}, q, seed=0),  # 0-d integer
        codec.encode(
            {
                "i32": np.array([-1, 2**31 - 1], np.int32),
                "i16": np.array([[3, -3]], np.int16),
                "i8": np.array([-128, 127], np.int8),
                "u8": np.array([0, 255], np.uint8),
                "mask": np.array([True, False, True]),
            },
            q,
            seed=0,
        ),
        codec.encode({"e": np.zeros((0, 5), np.float32), "z": np.zeros(0, np.float32)}, q, seed=0),
        codec.encode({"s": np.array(2.5, np.float32)}, QuantSpec(rules=(("s", 3),)), seed=1),
        codec.encode(
            {
                "h": torch.randn(3, 2, dtype=torch.float16),
                "bf": torch.randn(2, 2, dtype=torch.bfloat16),
                "d": f32(2, 3).astype(np.float64),
            },
            QuantSpec(default_bits=2),
            seed=2,
        ),
        codec.encode(
            {"w": f32(4, 3), "b": f32(4), "n": np.array(3, np.int64)},
            QuantSpec(default_bits=5),
            seed=3,
            meta={"round": 3, "client": "c-7", "loss": 0.25, "ok": True, "none": None},
        ),
        # per channel with one element per row: a level table per row outweighs the data
        codec.encode(
            {"r": f32(24, 1)}, QuantSpec(default_bits=8, granularity=Granularity.CHANNEL), seed=4
        ),
        codec.encode({"big": f32(32, 40)}, QuantSpec(default_bits=1), seed=5),  # 160 data bytes
        codec.encode({}, q, seed=0, meta={"k": "v"}),  # no tensors
        codec.encode(
            {"n": np.array([-(2**62), 2**62], np.int64), "w": f32(2, 2, 2)},
            QuantSpec(default_bits=6, rounding=Rounding.NEAREST),
        ),
        # rotation (transform 1) per tensor and per channel, rANS coding (coding 1), both
        codec.encode(
            {"w": f32(6, 20), "v": f32(1, 1)},
            QuantSpec(default_bits=3, rotation=True),
            seed=9,
            shared_key=SHARED_KEY,
        ),
        codec.encode(
            {"w": f32(5, 9)},
            QuantSpec(default_bits=5, rotation=True, granularity=Granularity.CHANNEL),
            seed=10,
            shared_key=SHARED_KEY,
        ),
        codec.encode(
            {"t": rng.standard_t(2, (40, 40)).astype(np.float32)},
            QuantSpec(default_bits=4, entropy=EntropyCoding.RANS, rounding=Rounding.NEAREST),
        ),
        codec.encode(
            {"t": rng.standard_t(2, (8, 250)).astype(np.float32)},
            QuantSpec(default_bits=3, entropy=EntropyCoding.RANS, granularity=Granularity.CHANNEL),
            seed=11,
        ),
        codec.encode(
            {"w": f32(40, 64)},
            QuantSpec(
                default_bits=3, rotation=True, entropy=EntropyCoding.RANS, rounding=Rounding.NEAREST
            ),
            shared_key=SHARED_KEY,
        ),
    ]
    return tuple(out)


def seed_payloads() -> list[bytes]:
    """Valid payloads from :func:`~fedquant.quant.codec.encode` over varied tensors.

    Bit widths 1..8 per tensor and per channel, raw float32, every integer dtype
    and bool, float16/bfloat16/float64 sources, empty and 0-d tensors, metadata,
    a payload without tensors, rotated (with :data:`SHARED_KEY`) and rANS-coded
    tensors. Deterministic; each is well under 4 KB.
    """
    return list(_seed_tuple())


# --------------------------------------------------------------------------- payload model


@dataclass
class _Record:
    """One tensor record, field by field, exactly as found (possibly inconsistent)."""

    name_len: int
    name: bytes
    fixed: list[int]  # dtype, kind, bits, granularity, transform, coding, ndim, reserved
    dims: list[int]
    n_scales: int
    scales: bytes
    mse: bytes
    data_len: int
    data: bytes

    def copy(self) -> _Record:
        return _Record(
            self.name_len,
            self.name,
            list(self.fixed),
            list(self.dims),
            self.n_scales,
            self.scales,
            self.mse,
            self.data_len,
            self.data,
        )

    def to_bytes(self) -> bytes:
        return b"".join(
            (
                wire.pack_head(self.name_len, self.name, self.fixed, self.dims),
                struct.pack("<I", self.n_scales & 0xFFFFFFFF),
                self.scales,
                self.mse,
                struct.pack("<Q", self.data_len & _M64),
                self.data,
            )
        )


@dataclass
class _Payload:
    """A payload's fields; ``tail`` keeps whatever follows the parsed records verbatim."""

    head: list[Any]  # magic, version, flags, total_len, n_tensors, meta_len
    meta: bytes
    records: list[_Record]
    tail: bytes
    crc: bytes

    def copy(self) -> _Payload:
        return _Payload(list(self.head), self.meta, list(self.records), self.tail, self.crc)

    def to_bytes(self) -> bytes:
        magic, version, flags, total, count, meta_len = self.head
        head = wire.HEADER.pack(
            bytes(magic)[:4].ljust(4, b"\0"),
            version & 0xFFFF,
            flags & 0xFFFF,
            total & _M64,
            count & 0xFFFFFFFF,
            meta_len & 0xFFFFFFFF,
        )
        recs = b"".join(r.to_bytes() for r in self.records)
        return b"".join((head, self.meta, recs, self.tail, self.crc))


def _record(data: bytes, rec: wire.Record) -> _Record:
    """The mutable model of a record the walker found in ``data``."""
    return _Record(
        rec.name_len,
        bytes(rec.name),
        list(rec.fixed),
        list(rec.dims),
        rec.n_scales,
        bytes(rec.scales),
        data[rec.mse_at : rec.mse_at + 8],
        rec.data_len,
        bytes(rec.data),
    )


def _parse(data: bytes, max_records: int = 256) -> _Payload | None:
    """Parse leniently: as many records as can be read; ``None`` if not even the header."""
    layout = wire.walk(data, max_records)
    if layout is None:
        return None
    return _Payload(
        list(layout.header),
        bytes(layout.meta),
        [_record(data, r) for r in layout.records],
        data[layout.tail_at : layout.crc_at],
        data[layout.crc_at :],
    )


def field_offsets(payload: bytes) -> list[Field]:
    """Every integer and float field of ``payload`` at its real offset.

    Header fields, then per record: ``name_len``, the eight one-byte fields,
    each dim, ``n_scales``, each scale, ``mse``, ``data_len``. Records are read as
    far as they parse (:func:`fedquant.quant.wire.walk`).
    """
    layout = wire.walk(payload, 256)
    return [] if layout is None else layout.fields()


# --------------------------------------------------------------------------- mutator


def _int_boundaries(width_bits: int) -> tuple[int, ...]:
    top = (1 << width_bits) - 1
    vals = {0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 255, 256, 1024, 1025, top}
    for k in (7, 8, 15, 16, 24, 31, 32, 47, 48, 49, 53, 62, 63):
        vals.update(((1 << k) - 1, 1 << k, (1 << k) + 1))
    return tuple(sorted(v for v in vals if v <= top))


_BOUNDS = {w: _int_boundaries(w) for w in (8, 16, 32, 64)}
_F32_MAX = float(np.finfo(np.float32).max)
_FLOATS = (
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-3,
    float("nan"),
    float("inf"),
    -float("inf"),
    1e-45,
    1.2e-38,
    1e30,
    _F32_MAX,
    3.5e38,
    1e300,
    sys.float_info.max,
    -sys.float_info.max,
    sys.float_info.min,
    5e-324,
)
_SMALL_DIMS = (0, 0, 1, 1, 1, 2, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 33, 64, 255)
_HUGE_DIMS = (2**24, 2**32, 2**47, 2**48, 2**48 + 1, 2**63, _M64)
#: valid (dtype code, kind, bits) combinations of format version 1
_VALID_TYPES = (
    *[(d, 0, b) for d in (1, 2, 3, 4) for b in range(1, 9)],
    *[(d, 1, 32) for d in (1, 2, 3, 4)],
    *[(d, 2, 8 * s) for d, s in _RAW_ITEMSIZE.items()],
)
_META = (
    b"",
    b"{}",
    b'{"round":3}',
    b'{"x":1e999}',
    b'{"x":-1e999}',
    b'{"x":NaN}',
    b'{"x":Infinity}',
    b'{"x":[1,2]}',
    b'{"x":{"y":1}}',
    b"[1,2]",
    b"null",
    b'"s"',
    b"1",
    b'{"a":1,"a":2}',
    b'{"x":' + b"9" * 5000 + b"}",
    b"[" * 5000 + b"]" * 5000,
    b'{"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
    b'{"\xff":1}',
    b'{"x":"\xed\xa0\x80"}',
    b'{"x":"\\ud800"}',
    b"\xef\xbb\xbf{}",
    b'{"x":1',
    b" " * 64,
    b'{"x":0.1e-400}',
)
_NAMES = (
    b"",
    b"w",
    b"\xff",
    b"\xc3",
    b"a\x00b",
    b"w" * 1024,
    b"w" * 1025,
    "é".encode(),
    b"\xed\xa0\x80",
)


def _set_int_field(rng: random.Random, current: int, width: int) -> int:
    r = rng.random()
    if r < 0.6:
        return rng.choice(_BOUNDS[width])
    if r < 0.85:
        return (current + rng.choice((-2, -1, 1, 2))) & ((1 << width) - 1)
    return rng.getrandbits(width)


def _float_bytes(rng: random.Random, fmt: str) -> bytes:
    value = rng.choice(_FLOATS)
    if fmt == "<f" and math.isfinite(value) and abs(value) > _F32_MAX:
        value = math.copysign(math.inf, value)
    return struct.pack(fmt, value)


def _fill(rng: random.Random, n: int, kind: int = -1, dtype: int = 0) -> bytes:
    """``n`` bytes of data: random, constant, boundary patterns, bool-ish or finite floats."""
    if n <= 0:
        return b""
    r = rng.random()
    if dtype == 10 and r < 0.7:
        return bytes(rng.getrandbits(1) for _ in range(n))
    if kind == 1 and r < 0.6:
        return np.asarray(
            [rng.choice((0.0, 1.0, -2.5, _F32_MAX))] * ((n + 3) // 4), "<f4"
        ).tobytes()[:n]
    if r < 0.3:
        return rng.randbytes(n)
    pattern = rng.choice(
        (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x55", b"\xff" * 7 + b"\x7f", b"\x00" * 7 + b"\x80")
    )
    return (pattern * (n // len(pattern) + 1))[:n]


def _expected_sizes(rec: _Record) -> tuple[int, int]:
    """(scale count, data bytes) the decoder will demand of this record's fields."""
    _, kind, bits, gran = rec.fixed[:4]
    size = wire.data_size(kind, bits, math.prod(rec.dims))
    if kind == wire.KIND_QUANT:
        return (rec.dims[0] if rec.dims else 0) if gran == 1 else 1, size
    return 0, size


class Mutator:
    """Make fuzz inputs from a pool of payloads (see the module docstring).

    Parameters
    ----------
    seeds : sequence of bytes
        Valid payloads: parents of most inputs, and donors of records to splice.
    rng : random.Random
        The only source of randomness; a given seed gives the same inputs.
    max_len : int, default 16384
        Inputs are cut to this length (then re-checksummed).
    data_budget : int, default 4096
        A coherent record change resizes data and scales only up to this many bytes.
    extra : sequence of bytes, optional
        More parents (e.g. a corpus), valid or not.
    """

    def __init__(
        self,
        seeds: Sequence[bytes],
        rng: random.Random,
        *,
        max_len: int = 16384,
        data_budget: int = 4096,
        extra: Sequence[bytes] = (),
    ) -> None:
        self.rng = rng
        self.max_len = max_len
        self.data_budget = data_budget
        self.pool: list[bytes] = list(seeds)
        self._parsed: dict[int, _Payload | None] = {}
        self.donors = [r for i in range(len(self.pool)) for r in self._records(i)]
        if not self.donors:
            raise InvalidInputError("Mutator: seeds= must hold valid payloads with tensors")
        self.n_seeds = len(self.pool)
        self.pool += [x for x in extra if len(x) <= max_len]

    def add(self, data: bytes, limit: int = 2048) -> None:
        """Add an interesting input to the pool (past ``limit`` additions, replace one)."""
        if len(data) > self.max_len:
            return
        if len(self.pool) - self.n_seeds >= limit:
            idx = self.n_seeds + self.rng.randrange(limit)
            self.pool[idx] = data
            self._parsed.pop(idx, None)
        else:
            self.pool.append(data)

    def _records(self, idx: int) -> list[_Record]:
        model = self._model(idx)
        return model.records if model is not None else []

    def _model(self, idx: int) -> _Payload | None:
        if idx not in self._parsed:
            self._parsed[idx] = _parse(self.pool[idx])
        return self._parsed[idx]

    def mutate(self) -> tuple[bytes, int]:
        """One input and the index of its parent in the pool."""
        rng = self.rng
        idx = rng.randrange(self.n_seeds) if rng.random() < 0.6 else rng.randrange(len(self.pool))
        n_ops = 1
        while n_ops < 5 and rng.random() < 0.45:
            n_ops += 1
        model = self._model(idx)
        if model is not None and rng.random() < 0.75:
            m = model.copy()
            for _ in range(n_ops):
                self._structured(m)
            data = m.to_bytes()
            if rng.random() < 0.15:
                data = self._bytes_op(data)
        else:
            data = self.pool[idx]
            for _ in range(n_ops):
                data = self._bytes_op(data)
        if len(data) > self.max_len:
            data = data[: self.max_len]
        r = rng.random()
        if r < 0.88:
            data = reseal(data)
        elif r < 0.92:
            data = reseal(data, crc=False)
        elif r < 0.96:
            data = reseal(data, length=False)
        return data, idx

    # ------------------------------------------------------------------ byte level

    def _bytes_op(self, data: bytes) -> bytes:
        rng = self.rng
        n = len(data)
        op = rng.randrange(9)
        pos = rng.randrange(n + 1)
        if op == 0 and n:  # flip one bit
            pos = min(pos, n - 1)
            return data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]
        if op == 1 and n:  # overwrite one byte
            pos = min(pos, n - 1)
            val = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
            return data[:pos] + bytes([val]) + data[pos + 1 :]
        if op == 2:  # insert bytes
            return data[:pos] + _fill(rng, rng.randrange(1, 17)) + data[pos:]
        if op == 3:  # delete a range
            return data[:pos] + data[pos + rng.randrange(1, 17) :]
        if op == 4:  # truncate
            return data[:pos]
        if op == 5 and n:  # duplicate a range
            k = rng.randrange(1, 65)
            return data[: pos + k] + data[pos : pos + k] + data[pos + k :]
        if op == 6:  # overwrite an unaligned integer with a boundary value
            width = rng.choice((16, 32, 64))
            raw = rng.choice(_BOUNDS[width]).to_bytes(width // 8, "little")
            return data[:pos] + raw + data[pos + len(raw) :]
        if op == 7:  # splice in a chunk of another payload
            other = self.pool[rng.randrange(len(self.pool))]
            a = rng.randrange(len(other) + 1)
            return data[:pos] + other[a : a + rng.randrange(1, 129)] + data[pos:]
        # op 8: a whole record of a seed at a random offset
        return data[:pos] + rng.choice(self.donors).to_bytes() + data[pos:]

    # ------------------------------------------------------------------ structured

    def _pick(self, m: _Payload) -> int | None:
        if not m.records:
            return None
        i = self.rng.randrange(len(m.records))
        m.records[i] = m.records[i].copy()
        return i

    def _structured(self, m: _Payload) -> None:
        rng = self.rng
        op = rng.randrange(13)
        if op == 0:  # header field
            k = rng.randrange(6)
            if k == 0:
                m.head[0] = rng.choice(
                    (b"FQNT", b"FQNt", b"\0\0\0\0", b"PK\x03\x04", rng.randbytes(4))
                )
            else:
                width = (16, 16, 64, 32, 32)[k - 1]
                m.head[k] = _set_int_field(rng, m.head[k], width)
            return
        if op == 9:  # metadata, usually with a matching length
            m.meta = rng.choice(_META)
            if rng.random() < 0.9:
                m.head[5] = len(m.meta)
            return
        if op == 10:  # splice a donor record in
            rec = rng.choice(self.donors).copy()
            m.records.insert(rng.randrange(len(m.records) + 1), rec)
            if rng.random() < 0.85:
                m.head[4] += 1
            return
        if op == 11 and m.records:  # drop, duplicate or reorder records
            i = rng.randrange(len(m.records))
            choice = rng.randrange(3)
            if choice == 0:
                del m.records[i]
                if rng.random() < 0.85:
                    m.head[4] -= 1
            elif choice == 1:
                m.records.insert(i, m.records[i])
                if rng.random() < 0.85:
                    m.head[4] += 1
            else:
                j = rng.randrange(len(m.records))
                m.records[i], m.records[j] = m.records[j], m.records[i]
            return
        if op == 12:  # trailing bytes after the records
            m.tail = b"" if m.tail and rng.random() < 0.5 else _fill(rng, rng.randrange(1, 9))
            return
        picked = self._pick(m)
        if picked is None:
            return
        rec = m.records[picked]
        if op == 1:  # one integer field of the record
            k = rng.randrange(12)
            if k == 0:
                rec.name_len = _set_int_field(rng, rec.name_len, 16)
            elif k <= 8:
                rec.fixed[k - 1] = _set_int_field(rng, rec.fixed[k - 1], 8)
            elif k == 9 and rec.dims:
                j = rng.randrange(len(rec.dims))
                rec.dims[j] = _set_int_field(rng, rec.dims[j], 64)
            elif k == 10:
                rec.n_scales = _set_int_field(rng, rec.n_scales, 32)
            else:
                rec.data_len = _set_int_field(rng, rec.data_len, 64)
        elif op == 2:  # a float field: the MSE or one scale
            if rec.scales and rng.random() < 0.6:
                j = 4 * rng.randrange(len(rec.scales) // 4)
                rec.scales = rec.scales[:j] + _float_bytes(rng, "<f") + rec.scales[j + 4 :]
            else:
                rec.mse = _float_bytes(rng, "<d")
        elif op == 3:  # new shape, then consistent scales and data
            ndim = rng.choice((0, 1, 1, 2, 2, 2, 3, 4, 16, 17))
            dims = [rng.choice(_SMALL_DIMS) for _ in range(ndim)]
            if dims and rng.random() < 0.2:
                dims[rng.randrange(ndim)] = rng.choice(_HUGE_DIMS)
            rec.dims = dims
            self._make_consistent(rec)
        elif op == 4:  # add or remove one dimension
            if rec.dims and rng.random() < 0.5:
                del rec.dims[rng.randrange(len(rec.dims))]
            else:
                rec.dims.insert(
                    rng.randrange(len(rec.dims) + 1), rng.choice(_SMALL_DIMS + _HUGE_DIMS)
                )
            if rng.random() < 0.8:
                self._make_consistent(rec)
            else:
                rec.fixed[6] = len(rec.dims)
        elif op == 5:  # new type (mostly a valid combination), then consistent
            if rng.random() < 0.8:
                rec.fixed[0], rec.fixed[1], rec.fixed[2] = rng.choice(_VALID_TYPES)
            else:
                rec.fixed[rng.randrange(3)] = rng.randrange(256)
            rec.fixed[3] = 1 if rec.fixed[1] == 0 and rng.random() < 0.4 else 0
            self._make_consistent(rec)
        elif op == 6:  # scale count with matching scale bytes
            rec.n_scales = rng.choice((0, 1, 2, rec.n_scales + 1, max(0, rec.n_scales - 1)))
            rec.scales = _fill(rng, min(4 * rec.n_scales, self.data_budget), kind=1)
        elif op == 7:  # data contents
            rec.data = _fill(rng, len(rec.data), rec.fixed[1], rec.fixed[0])
            if rng.random() < 0.5:
                self._clear_padding(rec)
        else:  # op 8: the name, with a matching length most of the time
            rec.name = rng.choice(_NAMES + tuple(r.name for r in m.records))
            if rng.random() < 0.9:
                rec.name_len = len(rec.name)

    def _make_consistent(self, rec: _Record) -> None:
        """Fix ndim, scale count, scales and data of ``rec`` to what its fields demand."""
        rng = self.rng
        rec.fixed[6] = len(rec.dims)
        want, nbytes = _expected_sizes(rec)
        rec.data_len = nbytes
        if 4 * want + nbytes > self.data_budget:
            return  # claims more than it has: the decoder must notice before allocating
        rec.n_scales = want
        keep = rec.scales[: 4 * want]
        rec.scales = (
            keep
            + np.abs(np.frombuffer(_fill(rng, 4 * want - len(keep), kind=1), "<f4"))
            .astype("<f4")
            .tobytes()
        )
        rec.data = rec.data[:nbytes] + _fill(
            rng, nbytes - len(rec.data), rec.fixed[1], rec.fixed[0]
        )
        if rng.random() < 0.8:
            self._clear_padding(rec)

    @staticmethod
    def _clear_padding(rec: _Record) -> None:
        bits = rec.fixed[2]
        if rec.fixed[1] != 0 or not rec.data or not 1 <= bits <= 8:
            return
        used = (math.prod(rec.dims) * bits) % 8
        if used:
            rec.data = rec.data[:-1] + bytes([rec.data[-1] & ((1 << used) - 1)])


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class FuzzFailure:
    """One contract violation: which target, what kind, details, and the input."""

    target: str
    kind: str  # exception, mismatch, oracle, hang, memory, fp-error, known-issue
    detail: str
    payload: bytes = field(repr=False)

    def __str__(self) -> str:
        digest = hashlib.sha256(self.payload).hexdigest()[:16]
        return f"[{self.target}/{self.kind}] {self.detail} (input {digest}, {len(self.payload)} B)"


_NORMALIZERS = (
    (re.compile(r"b'(?:[^'\\]|\\.)*'|b\"(?:[^\"\\]|\\.)*\""), "B"),
    (re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\""), "S"),
    (re.compile(r"\[[^\[\]]*\]"), "[L]"),
    (re.compile(r"\([0-9, ]*\)"), "(T)"),
    (re.compile(r"\d+-\d+"), "N-N"),
    (re.compile(r"0x[0-9a-f]+|(?<![\w-])-?\d+(?:\.\d+)?(?:e[-+]?\d+)?"), "N"),
)


def _normalize(text: str) -> str:
    """``text`` with names, numbers, shapes and lists blanked out."""
    for pattern, repl in _NORMALIZERS:
        text = pattern.sub(repl, text)
    return text


_COARSE = (
    (re.compile(r"(JSON|UTF-8): .*"), r"\1"),
    (re.compile(r"\b(?:b?float|u?int)[0-9N]+\b|\bbool\b"), "T"),
    (re.compile(r"mse=[^;]*"), "mse=X"),
)


def _corpus_key(signature: str) -> str:
    """A coarser class than :func:`_signature`, for what the corpus keeps one input of."""
    if signature.startswith("ok"):
        return signature
    for pattern, repl in _COARSE:
        signature = pattern.sub(repl, signature)
    return signature


def _signature(exc: BaseException) -> str:
    """The class of an error message: its exception type and normalized text."""
    return f"{type(exc).__name__}: {_normalize(str(exc))[:90]}"


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args, **kwargs), None
    except Exception as e:
        return None, e


def _crash(target: str, exc: BaseException, payload: bytes) -> FuzzFailure:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=-3))
    return FuzzFailure(target, "exception", f"{type(exc).__name__}: {exc}\n{tb}", payload)


def _decoded_problem(data: bytes, dec: codec.DecodedUpdate) -> str | None:
    """What is inconsistent about a successful decode, or ``None``."""
    if dec.nbytes != len(data):
        return f"nbytes={dec.nbytes} but the payload has {len(data)} bytes"
    if list(dec.tensors) != list(dec.info):
        return f"tensors {list(dec.tensors)} but info {list(dec.info)}"
    meta_len = wire.read_header(data).meta_len
    if sum(i.nbytes for i in dec.info.values()) + wire.HEADER.size + meta_len + 4 != len(data):
        return "record sizes do not add up to the payload length"
    for name, arr in dec.tensors.items():
        info = dec.info[name]
        if arr.shape != info.shape:
            return f"{name!r}: array shape {arr.shape} but info says {info.shape}"
        raw = {n: d for n, d in codec.DTYPES.values()}[info.dtype]
        want = (
            np.dtype(np.float32) if raw is None else np.dtype(bool) if info.dtype == "bool" else raw
        )
        if arr.dtype != want:
            return f"{name!r}: dtype {arr.dtype}, expected {want}"
        if raw is None and arr.size:
            if not np.isfinite(arr).all():
                return f"{name!r}: decoded values hold NaN/Inf"
            if info.quantized:
                rows = arr.reshape(info.scales.size, -1)
                bound = info.scales.astype(np.float64)
                if info.transform:  # a rotated block of N levels sums into one value
                    bound = bound * math.sqrt(info.block) * (1 + 1e-5)
                if (np.abs(rows).max(axis=1) > bound).any():
                    return f"{name!r}: decoded values exceed their clipping threshold"
    return None


def _self_average_problem(dec: codec.DecodedUpdate, agg: Any) -> str | None:
    """Averaging a payload with itself must give its own values back."""
    for name, arr in dec.tensors.items():
        got = np.asarray(agg.tensors[name])
        if got.dtype != arr.dtype or got.shape != arr.shape:
            return (
                f"{name!r}: aggregate gives {got.dtype}{got.shape}, decode {arr.dtype}{arr.shape}"
            )
        if arr.dtype.kind in "iu" and arr.size and np.abs(arr.astype(np.float64)).max() > 2.0**53:
            continue  # float64 accumulation is exact only up to 2**53
        if not np.array_equal(got, arr):
            return f"{name!r}: the average of a payload with itself differs from its values"
    return None


def _peak(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Peak bytes traced while ``fn(*args)`` runs (exceptions swallowed)."""
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    _call(fn, *args, **kwargs)
    peak = tracemalloc.get_traced_memory()[1] - base
    if not was_tracing:
        tracemalloc.stop()
    return peak


class _FpLog:
    """Collects numpy floating-point errors (``np.errstate(all="call")``) per target."""

    def __init__(self) -> None:
        self.target = ""
        self.events: list[str] = []

    def __call__(self, kind: str, flag: int) -> None:
        self.events.append(f"{self.target}: numpy {kind}")


class _Checker:
    """Runs the targets on one input and checks the contract (see the module docstring)."""

    def __init__(self, targets: Iterable[str], fp_log: _FpLog | None) -> None:
        self.targets = tuple(targets)
        unknown = set(self.targets) - set(TARGETS)
        if unknown:
            raise InvalidInputError(
                f"run_fuzz: unknown targets {sorted(unknown)}; expected a subset of {list(TARGETS)}"
            )
        self.fp = fp_log
        self.times: dict[str, float] = {}
        self.calls: dict[str, Callable[[], Any]] = {}
        self.sizes: dict[str, int] = {}  # payload bytes each target was given
        self.warns: list[str] = []  # known issues of the aggregation code (strict: failures)

    def _timed(
        self, target: str, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[Any, BaseException | None]:
        if self.fp is not None:
            self.fp.target = target
        t0 = time.perf_counter()
        out = _call(fn, *args, **kwargs)
        self.times[target] = time.perf_counter() - t0
        self.calls[target] = lambda: _call(fn, *args, **kwargs)
        return out

    def check(
        self,
        data: Any,
        *,
        partner: bytes | None = None,
        self_average: bool = True,
        cross_check: bool = True,
        aggregate: bool = True,
    ) -> tuple[list[FuzzFailure], list[str]]:
        """Failures and outcome signatures of ``data`` (bytes or a buffer over them).

        ``decode`` runs first; ``inspect`` runs on what it accepts and, if
        ``cross_check``, on what it refuses; ``aggregate`` (if asked) runs on
        accepted inputs, with the input itself if ``self_average``, else after
        ``partner``.
        """
        raw = bytes(data)
        fails: list[FuzzFailure] = []
        sigs: list[str] = []
        self.times.clear()
        self.calls.clear()
        self.warns.clear()
        self.sizes = {"decode": len(raw), "inspect": len(raw), "aggregate": 2 * len(raw)}
        order = [t for t in ("decode", "inspect") if t in self.targets]
        res: dict[str, tuple[Any, BaseException | None]] = {}
        for target in order:
            if res and not cross_check and next(iter(res.values()))[1] is not None:
                break
            fn = codec.decode if target == "decode" else codec.describe_payload
            res[target] = out = self._timed(target, fn, data, shared_key=SHARED_KEY)
            if out[1] is not None and not isinstance(out[1], DecodeError):
                fails.append(_crash(target, out[1], raw))
        if len(res) == 2:
            (dec_v, dec_e), (ins_v, ins_e) = res["decode"], res["inspect"]
            if (ins_e is None) != (dec_e is None) or str(ins_e) != str(dec_e):
                detail = f"inspect: {ins_e!r}; decode: {dec_e!r}"
                fails.append(FuzzFailure("inspect", "mismatch", detail, raw))
            elif ins_v is not None and ins_v.info.keys() != dec_v.info.keys():
                fails.append(FuzzFailure("inspect", "mismatch", "infos differ", raw))
        if not res:
            accepted = False
        else:
            value, exc = res[order[0]]
            accepted = exc is None
            if exc is not None:
                sigs.append(_signature(exc))
            else:
                sigs.append("ok")
                sigs += sorted(
                    {
                        f"ok {'quantized' if i.quantized else 'raw'} {i.granularity.value} {i.dtype}"
                        for i in value.info.values()
                    }
                )
        dec = res.get("decode", (None, None))[0]
        if dec is not None:
            problem = _decoded_problem(raw, dec)
            if problem:
                fails.append(FuzzFailure("decode", "oracle", problem, raw))
        if aggregate and "aggregate" in self.targets and accepted and not fails:
            if self_average or partner is None:
                out = self._timed(
                    "aggregate",
                    aggregate_payloads,
                    [raw, raw],
                    "inverse-mse",
                    shared_key=SHARED_KEY,
                )
            else:
                self.sizes["aggregate"] = len(partner) + len(raw)
                rule = "fedavg" if len(raw) % 2 else "mean"
                examples = [3, 1] if rule == "fedavg" else None
                out = self._timed(
                    "aggregate",
                    aggregate_payloads,
                    [partner, raw],
                    rule,
                    num_examples=examples,
                    shared_key=SHARED_KEY,
                )
            if out[1] is not None:
                if isinstance(out[1], (DecodeError, InvalidInputError)):
                    sigs.append(_signature(out[1]))
                else:
                    fails.append(_crash("aggregate", out[1], raw))
            else:
                self.warns += [
                    f"aggregate: a 0-d {type(v).__name__} tensor comes back as a numpy scalar, "
                    "not an ndarray"
                    for v in out[0].tensors.values()
                    if not isinstance(v, np.ndarray)
                ]
                if not all(np.isfinite(w).all() for w in out[0].weights.values()):
                    self.warns.append(
                        "aggregate: NaN weights, so NaN tensors (inverse-mse: the median of "
                        "MSE claims near the float64 maximum overflows)"
                    )
                elif self_average or partner is None:
                    whole = dec if dec is not None else codec.decode(raw, shared_key=SHARED_KEY)
                    problem = _self_average_problem(whole, out[0])
                    if problem:
                        fails.append(FuzzFailure("aggregate", "oracle", problem, raw))
        return fails, sigs

    def memory(self, raw: bytes) -> tuple[list[FuzzFailure], dict[str, float]]:
        """Re-run each target of the last :meth:`check` under tracemalloc; check the bound.

        Returns the violations and, per target, ``peak / bound``.
        """
        fails = []
        use: dict[str, float] = {}
        for target, call in list(self.calls.items()):
            peak = _peak(call)
            size = self.sizes[target]
            factor = AGGREGATE_MEM_FACTOR if target == "aggregate" else DECODE_MEM_FACTOR
            use[target] = peak / (factor * size + MEM_SLACK)
            if peak > factor * size + MEM_SLACK:
                fails.append(
                    FuzzFailure(
                        target,
                        "memory",
                        f"peak allocation {peak} B for {size} payload bytes "
                        f"(bound {factor} x {size} + {MEM_SLACK})",
                        raw,
                    )
                )
        return fails, use


def check_input(
    data: bytes, *, targets: Iterable[str] = TARGETS, memory: bool = True, strict: bool = True
) -> list[FuzzFailure]:
    """Check one input against the contract (used to replay a corpus).

    Parameters
    ----------
    data : bytes
        The input.
    targets : iterable of {"decode", "inspect", "aggregate"}, default all
        ``aggregate`` averages the input with itself (``inverse-mse``).
    memory : bool, default True
        Also check the peak allocation of every target.
    strict : bool, default True
        As in :func:`run_fuzz`.

    Returns
    -------
    list of FuzzFailure
        The violations; empty if none.
    """
    fp = _FpLog()
    checker = _Checker(targets, fp)
    with np.errstate(all="call", under="ignore"):
        old = np.seterrcall(fp)
        try:
            fails, _ = checker.check(data)
            if memory and not fails:
                fails += checker.memory(bytes(data))[0]
        finally:
            np.seterrcall(old)
    found, _ = _side_findings(fp.events, checker.warns, bytes(data), strict)
    return fails + found


def _side_findings(
    fp_events: list[str], known: list[str], data: bytes, strict: bool
) -> tuple[list[FuzzFailure], list[str]]:
    """Failures and warnings from numpy FP errors and known issues of ``aggregate``."""
    fails, warns = [], []
    for kind, events in (("fp-error", fp_events), ("known-issue", known)):
        for event in events:
            target = event.split(":")[0]
            if strict or target != "aggregate":
                fails.append(FuzzFailure(target, kind, event, data))
            else:
                warns.append(event)
    return fails, warns


# --------------------------------------------------------------------------- corpus


def save_input(directory: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``directory`` under its content hash; the path."""
    path = Path(directory) / f"{hashlib.sha256(data).hexdigest()[:20]}.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return path


def load_corpus(directory: str | os.PathLike[str]) -> list[bytes]:
    """Every ``*.bin`` file of ``directory``, in name order (empty if it does not exist)."""
    d = Path(directory)
    return [p.read_bytes() for p in sorted(d.glob("*.bin"))] if d.is_dir() else []


# --------------------------------------------------------------------------- the run


@dataclass
class FuzzReport:
    """What :func:`run_fuzz` did and found."""

    runs: int = 0
    seconds: float = 0.0
    targets: tuple[str, ...] = TARGETS
    failures: list[FuzzFailure] = field(default_factory=list)  # up to 3 of each kind
    n_failures: int = 0  # all of them
    signatures: Counter[str] = field(default_factory=Counter)
    warnings: Counter[str] = field(default_factory=Counter)
    accepted: int = 0  # inputs that decode (or inspect) accepted
    past_checksum: int = 0  # inputs refused for something other than length/CRC/header
    mem_checks: int = 0
    mem_use: dict[str, float] = field(default_factory=dict)  # max sampled peak / bound
    slow_rechecks: int = 0
    median_us: dict[str, float] = field(default_factory=dict)
    saved: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.n_failures == 0

    @property
    def throughput(self) -> float:
        """Inputs per second."""
        return self.runs / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        lines = [
            f"fuzz: {self.runs} inputs in {self.seconds:.1f} s ({self.throughput:,.0f}/s), "
            f"targets {', '.join(self.targets)}",
            f"  accepted {self.accepted}, refused past the checksum {self.past_checksum}, "
            f"{len(self.signatures)} distinct outcomes",
            "  median per input: "
            + ", ".join(f"{t} {us:.1f} us" for t, us in sorted(self.median_us.items())),
            f"  memory: {self.mem_checks} inputs sampled, worst peak / bound: "
            + ", ".join(f"{t} {u:.2f}" for t, u in sorted(self.mem_use.items())),
            f"  slow inputs re-timed: {self.slow_rechecks}",
        ]
        for w, c in self.warnings.most_common():
            lines.append(f"  warning ({c}x): {w}")
        if self.saved:
            lines.append(f"  saved {len(self.saved)} new input(s) to {self.saved[0].parent}")
        if self.failures:
            lines.append(f"  FAILED: {self.n_failures} failure(s); the first of each kind:")
            lines += [f"    {f}" for f in self.failures[:30]]
        else:
            lines.append("  no failures")
        return "\n".join(lines)


_SHALLOW = (
    "checksum mismatch",
    "inconsistent length: header",
    "wrong magic",
    "payload truncated: ",
)


class _Watchdog:
    """Saves the input in flight and aborts the process if it runs past ``limit_s``."""

    def __init__(self, limit_s: float, save_dir: Path) -> None:
        self.limit_s = limit_s
        self.save_dir = save_dir
        self.current: tuple[bytes, float] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fuzz-watchdog", daemon=True)
        self.rearm()
        self._thread.start()

    def rearm(self) -> None:
        """(Re)start the last resort: a hang in compiled code holds the GIL, faulthandler fires."""
        try:
            stream = sys.__stderr__ if sys.__stderr__ is not None else sys.stderr
            faulthandler.dump_traceback_later(4 * self.limit_s, exit=True, file=stream)
        except (AttributeError, OSError, ValueError):  # no file descriptor to write to
            pass

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.limit_s / 4)):
            cur = self.current
            if cur is not None and time.perf_counter() - cur[1] > self.limit_s:
                path = save_input(self.save_dir, cur[0])
                print(f"fuzz: HANG: input ran > {self.limit_s} s; saved to {path}", file=sys.stderr)
                sys.stderr.flush()
                os._exit(3)

    def stop(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        self._stop.set()
        self._thread.join()


def _containers(data: bytes, k: int) -> Any:
    """The same bytes as bytes, bytearray, memoryview or a non-contiguous memoryview."""
    if k == 1:
        return bytearray(data)
    if k == 2:
        return memoryview(data)
    if k == 3:
        wide = np.zeros(2 * len(data), np.uint8)
        wide[::2] = np.frombuffer(data, np.uint8)
        return wide.data[::2]
    return data


def run_fuzz(
    n: int,
    seed: int,
    *,
    targets: Sequence[str] = TARGETS,
    max_seconds: float | None = None,
    corpus: str | os.PathLike[str] | None = None,
    save_dir: str | os.PathLike[str] | None = None,
    mem_every: int = 64,
    cross_every: int = 8,
    aggregate_every: int = 4,
    hang_factor: float = 50.0,
    hang_floor_s: float = 5e-3,
    hang_per_byte_s: float = 2e-6,
    watchdog_s: float | None = None,
    strict: bool = True,
    progress: Callable[[FuzzReport], None] | None = None,
) -> FuzzReport:
    """Fuzz ``targets`` with ``n`` generated inputs.

    Parameters
    ----------
    n : int
        Number of inputs.
    seed : int
        Seeds the mutator; the same seed gives the same inputs.
    targets : sequence of {"decode", "inspect", "aggregate"}
    max_seconds : float, optional
        Stop early after this much time.
    corpus : path, optional
        Extra parents: every ``*.bin`` file there is replayed first and mutated.
    save_dir : path, optional
        Where inputs with a new outcome and failing inputs are written (< 4 KB only
        for the former); nothing is written if ``None``.
    mem_every : int, default 64
        Check peak memory on every ``mem_every``-th accepted input and every
        ``16 * mem_every``-th input overall (tracemalloc costs ~300 us per check).
    cross_every : int, default 8
        ``inspect`` runs on every input ``decode`` accepts, and on every
        ``cross_every``-th one it refuses (both must give the same message).
    aggregate_every : int, default 4
        ``aggregate`` runs on the accepted inputs among every ``aggregate_every``-th
        input (alternately the input with itself and after its parent).
    hang_factor, hang_floor_s, hang_per_byte_s : float, default 50, 5e-3, 2e-6
        An input slower than ``max(hang_factor * median, hang_floor_s,
        hang_per_byte_s * len(input))`` for its target is re-timed three times;
        if the fastest run is still slower, it is a hang. The floor and the
        per-byte allowance keep noise and legitimately long inputs (hundreds of
        records: decoding is linear, ~0.5 us per byte) from being flagged.
    watchdog_s : float, optional
        Abort the process (saving the input) if one input runs longer than this.
    strict : bool, default True
        Count known issues of ``aggregate`` as failures (otherwise they are
        warnings): numpy floating-point errors (int64 averages near the limits
        overflow the cast back; the median of MSE claims near the float64
        maximum overflows, giving NaN weights) and 0-d results that are numpy
        scalars, not arrays. In ``decode``/``inspect`` floating-point errors
        always fail.
    progress : callable, optional
        Called with the report so far about every 4096 inputs.
    """
    if n < 0:
        raise InvalidInputError(f"run_fuzz: n={n} must be >= 0")
    report = FuzzReport(targets=tuple(targets))
    fp = _FpLog()
    checker = _Checker(targets, fp)
    extra = load_corpus(corpus) if corpus is not None else []
    seeds = seed_payloads()
    rng = random.Random(seed)
    mutator = Mutator(seeds, rng, extra=extra)
    seen: set[str] = set()
    seen_coarse: set[str] = set()
    kept: Counter[tuple[str, str, str]] = Counter()
    out_dir = Path(save_dir) if save_dir is not None else None
    ring: dict[str, deque[float]] = {t: deque(maxlen=2048) for t in checker.targets}
    medians: dict[str, float] = {}
    watchdog = _Watchdog(watchdog_s, out_dir or Path(tempfile.gettempdir())) if watchdog_s else None

    def record(data: bytes, fails: list[FuzzFailure], sigs: list[str], save: bool = True) -> bool:
        new = [s for s in sigs if s not in seen]
        seen.update(new)
        coarse = {_corpus_key(s) for s in new} - seen_coarse
        seen_coarse.update(coarse)
        report.signatures.update(sigs)
        report.n_failures += len(fails)
        for f in fails:
            key = (f.target, f.kind, _normalize(f.detail.split("\n")[0]))
            kept[key] += 1
            if kept[key] <= 3:
                report.failures.append(f)
                if save and out_dir is not None:
                    report.saved.append(save_input(out_dir, data))
        if coarse and save and not fails and out_dir is not None and len(data) < MAX_CORPUS_BYTES:
            report.saved.append(save_input(out_dir, data))
        return bool(new or fails)

    # warm up: compile/load the kernels for every buffer type, then replay the corpus
    for s in seeds:
        for k in range(4):
            _call(codec.decode, _containers(s, k), shared_key=SHARED_KEY)
    old_err = np.seterrcall(fp)
    start = time.perf_counter()
    try:
        with np.errstate(all="call", under="ignore"):
            for data in extra:
                fails, sigs = checker.check(data)
                record(data, fails, sigs, save=False)  # already in the corpus
            for i in range(n):
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    break
                data, parent = mutator.mutate()
                k = i % 64
                arg = _containers(data, k) if k < 4 else data
                fp.events.clear()
                if watchdog is not None:
                    watchdog.current = (data, time.perf_counter())
                    if i % 1024 == 0:
                        watchdog.rearm()
                fails, sigs = checker.check(
                    arg,
                    partner=mutator.pool[parent],
                    self_average=bool(i & 4),
                    cross_check=i % cross_every == 0,
                    aggregate=i % aggregate_every == 0,
                )
                found, warns = _side_findings(fp.events, checker.warns, data, strict)
                fails += found
                report.warnings.update(warns)
                sigs += warns
                report.runs += 1
                if sigs and sigs[0].startswith("ok"):
                    report.accepted += 1
                    sample = report.accepted % mem_every == 0
                else:
                    sample = i % (16 * mem_every) == 0
                    if sigs and not any(s in sigs[0] for s in _SHALLOW):
                        report.past_checksum += 1
                # hangs: compare with the running median of each target
                for t, dt in checker.times.items():
                    ring[t].append(dt)
                    med = medians.get(t)
                    limit = max(
                        hang_factor * (med or 0.0),
                        hang_floor_s,
                        hang_per_byte_s * checker.sizes[t],
                    )
                    if med is not None and dt > limit:
                        report.slow_rechecks += 1
                        call = checker.calls[t]
                        best = math.inf
                        for _ in range(3):
                            t0 = time.perf_counter()
                            call()
                            best = min(best, time.perf_counter() - t0)
                        if best > limit:
                            fails.append(
                                FuzzFailure(
                                    t,
                                    "hang",
                                    f"{best * 1e3:.2f} ms, median {med * 1e6:.1f} us",
                                    data,
                                )
                            )
                if i % 1024 == 1023 or (i < 1024 and i % 128 == 127):
                    medians = {t: statistics.median(r) for t, r in ring.items() if len(r) >= 128}
                if sample and not fails:
                    report.mem_checks += 1
                    peak_fails, ratio = checker.memory(data)
                    fails += peak_fails
                    for t, u in ratio.items():
                        report.mem_use[t] = max(report.mem_use.get(t, 0.0), u)
                if record(data, fails, sigs):
                    mutator.add(data)
                if progress is not None and i % 4096 == 4095:
                    report.seconds = time.perf_counter() - start
                    progress(report)
    finally:
        np.seterrcall(old_err)
        if watchdog is not None:
            watchdog.stop()
    report.seconds = time.perf_counter() - start
    report.median_us = {t: statistics.median(r) * 1e6 for t, r in ring.items() if r}
    return report


def _check_args(args: argparse.Namespace) -> None:
    """Refuse option values that would make a run meaningless (one-line ConfigError)."""
    if args.runs < 0:
        raise ConfigError("--runs", f"{args.runs} is negative; expected a number of inputs >= 0")
    for flag, value in (("--max-seconds", args.max_seconds), ("--watchdog", args.watchdog)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(flag, f"{value} is not valid; expected a number of seconds > 0")
    if (
        args.corpus is not None
        and (not args.corpus or os.path.exists(args.corpus))
        and not (os.path.isdir(args.corpus))
    ):
        raise ConfigError(
            "--corpus", f"{args.corpus!r} is not a directory; expected a directory of *.bin inputs"
        )


def main(argv: Sequence[str] | None = None, prog: str = "python -m fedquant.tools.fuzz") -> int:
    """``fedquant fuzz``: run the fuzzer, print a summary, 1 on any failure."""
    p = Parser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=100_000, help="number of inputs (default 100000)")
    p.add_argument("--seed", type=int, default=0, help="mutator seed (default 0)")
    p.add_argument(
        "--corpus",
        default=None,
        help="directory of *.bin inputs: replayed, mutated, and where new ones are saved",
    )
    p.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated subset of {','.join(TARGETS)}",
    )
    p.add_argument("--max-seconds", type=float, default=None, help="stop after this long")
    p.add_argument(
        "--watchdog", type=float, default=30.0, help="abort on one input slower than this (s)"
    )
    p.add_argument(
        "--lenient",
        action="store_true",
        help="report numpy FP errors and known issues in aggregate as warnings, not failures",
    )
    args = p.parse_args(argv)
    try:
        _check_args(args)
    except FedquantError as e:
        print(f"fuzz: error: {e}", file=sys.stderr)
        return 2
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    last = [time.perf_counter()]

    def progress(r: FuzzReport) -> None:
        if time.perf_counter() - last[0] > 10:
            last[0] = time.perf_counter()
            print(
                f"  ... {r.runs} inputs, {r.throughput:,.0f}/s, {len(r.failures)} failure(s)",
                flush=True,
            )

    try:
        report = run_fuzz(
            args.runs,
            args.seed,
            targets=targets,
            max_seconds=args.max_seconds,
            corpus=args.corpus,
            save_dir=args.corpus,
            watchdog_s=args.watchdog,
            strict=not args.lenient,
            progress=progress,
        )
    except InvalidInputError as e:
        print(f"fuzz: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
