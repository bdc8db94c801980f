"""Entropy coding of quantization codes: a static rANS coder (the codec's ``coding = 1``).

Why
---
Packing spends ``B`` bits on every code, but the codes of a clipped uniform
quantizer are far from equiprobable: the inner levels are much more frequent
than the outer ones. The order-0 entropy of the best 2-bit uniform quantizer
of a Gaussian is about 1.90 bits, at 4 bits about 3.60 (``ANCHORS.md``).
Measured with fedquant's grid and OCTAV on 2**20 Gaussian values
(``fedquant.tools.bench.entropy``), nearest rounding: 1.879 / 2.746 / 3.596 /
7.068 bits at B = 2 / 3 / 4 / 8, i.e. 6 / 8 / 10 / 12 % fewer bytes at the
same error; stochastic rounding spreads the codes (1.961 / 2.850 / 3.695 /
7.125 bits: 2 / 5 / 8 / 11 %). This coder is within 0.01 % of the entropy at
B <= 5 and 0.2 % at B = 8 (12-bit frequencies), table and states included.

Why rANS (and not zstd)
-----------------------
Asymmetric numeral systems (J. Duda, "Asymmetric numeral systems: entropy
coding combining speed of Huffman coding with compression rate of arithmetic
coding", arXiv:1311.2540, 2013) code each symbol in ``-log2 p`` bits with a
fractional-bit precision, from a frequency table. A general-purpose
compressor does worse on this source: zstd's literals are Huffman-coded,
whole bits per byte-symbol, so on unpacked 2-bit codes it cannot go below 2
bits, and on packed bytes it only fits bit widths that divide 8 (measured on
a Gaussian, 2**20 codes: 2.93 bits at B = 3 against an entropy of 2.75,
``fedquant.tools.bench.entropy``; at B = 2 with stochastic rounding zstd saves
nothing). zstd decompresses faster (about memcpy speed against 0.15-0.2x
here), but codecs run once per tensor per round, and rANS needs no
dependency; its decoder is bounded by construction: it produces exactly the
number of codes the shape says, from a table that must sum to
``2**PROB_BITS``.

The coder: four interleaved rANS states of 32 bits with 16-bit
renormalization and 12-bit frequencies (the "4x16" layout of htscodecs'
rANS; interleaving after F. Giesen, "Interleaved entropy coders",
arXiv:1402.3392, 2014). Code ``i`` uses state ``i % 4``; the four
dependency chains run in parallel in the CPU, and every step is
branch-free::

    M = 2**PROB_BITS = 4096,  L = 2**16,  every state x in [L, 2**32)
    encode s (codes in reverse order):
        if x >= 2**20 * f[s]: emit the word x & 0xFFFF; x >>= 16
        x = (x // f[s]) << PROB_BITS  +  x % f[s]  +  c[s]
    decode (forward):
        slot = x & (M - 1);  s = the symbol with c[s] <= slot < c[s] + f[s]
        x = f[s] * (x >> PROB_BITS) + slot - c[s]
        if x < L: x = (x << 16) | next word

The encoder starts every state at ``L``; the decoder must end there having
read every word, which makes every coded stream self-checking.

Data layout (the record's data field, after any transform sub-header)::

    freq    2**B unsigned LEB128 varints (shortest form), each <= 4096, sum 4096
    states  4 x u32 little-endian: the encoder's final states 0..3
    words   u16 little-endian: the renormalization words, in the order the
            decoder reads them

Two rules bound the decoder and keep coding from costing bytes:

* an entropy-coded record holds at least one data byte per 8 codes (the
  density of 1-bit packing), so a payload never expands by more than it
  could already (32 float32 bytes per byte) -- no decompression bombs. The
  decoder checks this *before* allocating;
* the encoder (:func:`encode_codes_if_smaller`) keeps plain packing when the
  coded form would not be smaller, or would be denser than that. So coding
  never costs more than packing, and 1-bit codes are never coded.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import numpy as np
from numba import njit

from fedquant.choices import parse_choice
from fedquant.errors import DecodeError, InvalidInputError
from fedquant.quant.grid import check_bits
from fedquant.quant.packing import packed_size

#: frequency precision: the table sums to 2**PROB_BITS
PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
#: lower bound of the coder's state
RANS_L = 1 << 16
#: codes per coded byte, at most (the density of 1-bit packing)
MAX_CODES_PER_BYTE = 8


class EntropyCoding(str, Enum):
    """How a quantized tensor's codes travel: packed (``none``) or entropy-coded."""

    NONE = "none"
    RANS = "rans"


def parse_entropy(entropy: EntropyCoding | str) -> EntropyCoding:
    """Normalize an entropy-coding name; raise :class:`InvalidInputError` for unknown names."""
    return parse_choice(EntropyCoding, entropy, "entropy")


class CodedSize(NamedTuple):
    """Bytes of the coded form (table + state + stream) and of the frequency table alone."""

    nbytes: int
    table: int


# --------------------------------------------------------------------------- frequencies


@njit(cache=True)
def _histogram_kernel(codes):  # pragma: no cover - compiled
    """256-bin histogram of uint8 values, in four interleaved partial histograms
    (consecutive equal codes would otherwise wait on each other's increment)."""
    acc = np.zeros((4, 256), np.int64)
    n = codes.size
    q = n // 4
    for g in range(q):
        i = 4 * g
        acc[0, codes[i]] += 1
        acc[1, codes[i + 1]] += 1
        acc[2, codes[i + 2]] += 1
        acc[3, codes[i + 3]] += 1
    for i in range(4 * q, n):
        acc[0, codes[i]] += 1
    return acc.sum(axis=0)


def histogram(codes: np.ndarray, bits: int) -> np.ndarray:
    """Count of every code ``0 .. 2**bits - 1`` (int64); codes past ``2**bits - 1`` are refused."""
    bits = check_bits(bits)
    c = np.ascontiguousarray(np.asarray(codes).reshape(-1))
    if c.dtype != np.uint8:
        raise InvalidInputError(f"histogram: codes must be uint8, got {c.dtype}")
    counts = _histogram_kernel(c)
    if counts[1 << bits :].any():
        raise InvalidInputError(f"histogram: a code does not fit in {bits} bit(s)")
    return counts[: 1 << bits]


def empirical_entropy(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per code of a histogram (0 for an empty one)."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        return 0.0
    p = c[c > 0] / n
    return float(-(p * np.log2(p)).sum())


def normalize_counts(counts: np.ndarray) -> np.ndarray:
    """Frequencies summing to ``PROB_SCALE``, >= 1 for every code that occurs, 0 otherwise.

    Proportional rounding, then the surplus or deficit is taken from or given
    to the codes whose share it distorts least (the most frequent first).
    Raises :class:`InvalidInputError` for an empty histogram or more than
    ``PROB_SCALE`` distinct codes.
    """
    c = np.asarray(counts, dtype=np.int64)
    total = int(c.sum())
    present = c > 0
    if total <= 0 or int(present.sum()) > PROB_SCALE:
        raise InvalidInputError(
            f"normalize_counts: need 1..{PROB_SCALE} distinct codes, got {int(present.sum())}"
        )
    f = np.where(present, np.maximum(1, (c * PROB_SCALE) // total), 0).astype(np.int64)
    diff = PROB_SCALE - int(f.sum())
    order = np.argsort(-c, kind="stable")  # most frequent first
    i = 0
    while diff != 0:
        s = order[i % order.size]
        if diff > 0:
            f[s] += 1
            diff -= 1
        elif f[s] > 1:
            f[s] -= 1
            diff += 1
        i += 1
    return f


def table_bytes(freq: np.ndarray) -> bytes:
    """The frequency table as unsigned LEB128 varints (shortest form)."""
    out = bytearray()
    for v in np.asarray(freq, dtype=np.int64).tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def coded_size_estimate(counts: np.ndarray) -> CodedSize:
    """Bytes the coded form of these code counts takes, to within a couple of bytes.

    ``table + 16 + 2 * ceil(sum_s counts_s * log2(PROB_SCALE / f_s) / 16)``:
    the rANS stream exceeds the ideal code length by the four final states and
    a word.
    """
    freq = normalize_counts(counts)
    c = np.asarray(counts, dtype=np.float64)
    used = c > 0
    bits = float((c[used] * (PROB_BITS - np.log2(freq[used].astype(np.float64)))).sum())
    table = len(table_bytes(freq))
    return CodedSize(table + 16 + 2 * int(np.ceil(bits / 16.0)), table)


# --------------------------------------------------------------------------- kernels


_MASK = np.uint64(PROB_SCALE - 1)
_LOW = np.uint64(RANS_L)
_SHIFT = np.uint64(PROB_BITS)
_W16 = np.uint64(16)
_EPS = 2.0**-14  # see _estep


@njit(inline="always")
def _estep(x, s, freq, rcp, cum, buf, pos):  # pragma: no cover - compiled
    """Encode symbol ``s`` into state ``x`` (int64, < 2**32); returns ``(x, pos)``.

    Branch-free: the renormalization word is always written below ``pos`` and
    kept only if it is needed. ``x // f`` is ``floor(x * (1/f) + 2**-14)`` in
    float64, exact here: ``x < 2**32`` puts the product within ``2**-20`` of
    ``x / f``, whose fractional part is a multiple of ``1/f >= 2**-12``.
    """
    f = freq[s]
    emit = x >= (f << 20)
    buf[pos - 1] = np.uint16(x & 0xFFFF)
    pos -= np.int64(emit)
    x = x >> (16 * np.int64(emit))
    q = np.int64(np.float64(x) * rcp[s] + _EPS)
    return (q << PROB_BITS) + (x - q * f) + cum[s], pos


@njit(cache=True)
def _encode_kernel(codes, freq, rcp, cum, buf):  # pragma: no cover - compiled
    """rANS-encode ``codes`` (4 interleaved states; code ``i`` uses state ``i % 4``)
    backwards into ``buf`` (uint16); returns ``(start, x0, x1, x2, x3)``."""
    n = codes.size
    x0 = np.int64(RANS_L)
    x1 = np.int64(RANS_L)
    x2 = np.int64(RANS_L)
    x3 = np.int64(RANS_L)
    pos = buf.size
    q = n // 4
    for i in range(n - 1, 4 * q - 1, -1):
        r = i & 3
        if r == 0:
            x0, pos = _estep(x0, codes[i], freq, rcp, cum, buf, pos)
        elif r == 1:
            x1, pos = _estep(x1, codes[i], freq, rcp, cum, buf, pos)
        else:
            x2, pos = _estep(x2, codes[i], freq, rcp, cum, buf, pos)
    for g in range(q - 1, -1, -1):
        i = 4 * g
        x3, pos = _estep(x3, codes[i + 3], freq, rcp, cum, buf, pos)
        x2, pos = _estep(x2, codes[i + 2], freq, rcp, cum, buf, pos)
        x1, pos = _estep(x1, codes[i + 1], freq, rcp, cum, buf, pos)
        x0, pos = _estep(x0, codes[i], freq, rcp, cum, buf, pos)
    return pos, x0, x1, x2, x3


@njit(inline="always")
def _dstep(x, words, pos, last, freq, cum, sym):  # pragma: no cover - compiled
    """Decode one symbol from state ``x``; returns ``(x, s, pos)``.

    Branch-free: the next word is read at ``min(pos, last)`` and used only if
    needed, so a truncated stream reads no memory out of bounds; the caller
    detects it from ``pos`` at the end.
    """
    slot = x & _MASK
    s = sym[slot]
    x = freq[s] * (x >> _SHIFT) + slot - cum[s]
    need = x < _LOW
    w = np.uint64(words[min(pos, last)])
    x = ((x << _W16) | w) if need else x
    return x, s, pos + np.int64(need)


@njit(cache=True)
def _decode_kernel(
    words, nwords, states, freq, cum, sym, n, mode, out_c, out_f, steps, row_len, half
):  # pragma: no cover - compiled
    """Decode ``n`` codes; ``mode`` 0 validates only, 1 stores the codes in ``out_c``, 2
    stores the levels ``float32((code - half) * steps[i // row_len])`` in ``out_f`` -- computed
    in float64 as :func:`fedquant.quant.quantizer.level_table` does, off the rANS
    dependency chain.

    Returns 0 on success, 1 if the stream is too short, 2 if words are left
    over, 3 if a final state is not the encoder's initial one.
    """
    x0 = np.uint64(states[0])
    x1 = np.uint64(states[1])
    x2 = np.uint64(states[2])
    x3 = np.uint64(states[3])
    last = max(words.size - 1, 0)
    pos = 0
    row = 0
    st = steps[0]
    edge = row_len  # index of the next row's first code
    q = n // 4
    for g in range(q):
        i = 4 * g
        x0, s0, pos = _dstep(x0, words, pos, last, freq, cum, sym)
        x1, s1, pos = _dstep(x1, words, pos, last, freq, cum, sym)
        x2, s2, pos = _dstep(x2, words, pos, last, freq, cum, sym)
        x3, s3, pos = _dstep(x3, words, pos, last, freq, cum, sym)
        if mode == 1:
            out_c[i] = s0
            out_c[i + 1] = s1
            out_c[i + 2] = s2
            out_c[i + 3] = s3
        elif mode == 2:
            if i + 4 <= edge:
                out_f[i] = np.float32((np.float64(s0) - half) * st)
                out_f[i + 1] = np.float32((np.float64(s1) - half) * st)
                out_f[i + 2] = np.float32((np.float64(s2) - half) * st)
                out_f[i + 3] = np.float32((np.float64(s3) - half) * st)
            else:  # a row starts inside this group
                for k in range(4):
                    if i + k == edge:
                        row += 1
                        st = steps[row]
                        edge += row_len
                    s = s0 if k == 0 else (s1 if k == 1 else (s2 if k == 2 else s3))
                    out_f[i + k] = np.float32((np.float64(s) - half) * st)
    for i in range(4 * q, n):
        r = i & 3
        if r == 0:
            x0, s, pos = _dstep(x0, words, pos, last, freq, cum, sym)
        elif r == 1:
            x1, s, pos = _dstep(x1, words, pos, last, freq, cum, sym)
        else:
            x2, s, pos = _dstep(x2, words, pos, last, freq, cum, sym)
        if mode == 1:
            out_c[i] = s
        elif mode == 2:
            if i == edge:
                row += 1
                st = steps[row]
                edge += row_len
            out_f[i] = np.float32((np.float64(s) - half) * st)
    if pos > nwords:
        return 1
    if pos < nwords:
        return 2
    if x0 != _LOW or x1 != _LOW or x2 != _LOW or x3 != _LOW:
        return 3
    return 0


# --------------------------------------------------------------------------- encode


def encode_codes(codes: np.ndarray, bits: int, *, freq: np.ndarray | None = None) -> bytes:
    """rANS-code uint8 ``codes`` (each ``< 2**bits``): the table, then the stream.

    Parameters
    ----------
    codes : np.ndarray
        uint8 codes, any shape (flattened); at least one.
    bits : int
        1..8: the table has ``2**bits`` entries.
    freq : np.ndarray, optional
        The normalized frequencies to use (default: :func:`normalize_counts` of
        the codes' histogram). Every code present must have a nonzero frequency.
    """
    bits = check_bits(bits)
    c = np.ascontiguousarray(np.asarray(codes).reshape(-1))
    if c.dtype != np.uint8:
        raise InvalidInputError(f"encode_codes: codes must be uint8, got {c.dtype}")
    if c.size == 0:
        raise InvalidInputError("encode_codes: no codes to code")
    counts = histogram(c, bits)
    f = normalize_counts(counts) if freq is None else np.asarray(freq, dtype=np.int64)
    if f.size != 1 << bits or int(f.sum()) != PROB_SCALE or ((counts > 0) & (f <= 0)).any():
        raise InvalidInputError(
            f"encode_codes: freq must have {1 << bits} entries summing to {PROB_SCALE}, "
            "nonzero for every code present"
        )
    cum = np.concatenate(([0], np.cumsum(f)[:-1])).astype(np.int64)
    rcp = 1.0 / np.maximum(f, 1)
    # each code costs at most PROB_BITS bits (under one 16-bit word), plus one slack word
    buf = np.empty(c.size + 1, dtype=np.uint16)
    start, *states = _encode_kernel(c, f, rcp, cum, buf)
    return b"".join(
        (
            table_bytes(f),
            np.array(states, dtype="<u4").tobytes(),
            buf[start:].astype("<u2").tobytes(),
        )
    )


def encode_codes_if_smaller(codes: np.ndarray, bits: int) -> bytes | None:
    """The coded form if it is smaller than packing and obeys the density rule, else ``None``.

    An estimate from the histogram (:func:`coded_size_estimate`) skips the
    coding pass when it cannot win.
    """
    bits = check_bits(bits)
    n = int(np.asarray(codes).size)
    packed = packed_size(n, bits)
    floor = -(-n // MAX_CODES_PER_BYTE)
    if n == 0 or bits == 1:
        return None
    counts = histogram(codes, bits)
    if coded_size_estimate(counts).nbytes >= packed:
        return None
    out = encode_codes(codes, bits, freq=normalize_counts(counts))
    if len(out) >= packed or len(out) < floor:
        return None
    return out


# --------------------------------------------------------------------------- decode


def _read_table(data: np.ndarray, bits: int, where: str) -> tuple[np.ndarray, int]:
    """Parse the varint frequency table; returns ``(freq, bytes used)``."""
    count = 1 << bits
    freq = np.zeros(count, dtype=np.int64)
    pos = 0
    end = data.size
    for s in range(count):
        value = 0
        shift = 0
        while True:
            if pos >= end:
                raise DecodeError(f"decode: {where}: entropy table truncated at entry {s}")
            byte = int(data[pos])
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                if byte == 0 and shift:
                    raise DecodeError(
                        f"decode: {where}: entropy table entry {s} is not in shortest form"
                    )
                break
            shift += 7
            if shift > 14:
                raise DecodeError(f"decode: {where}: entropy table entry {s} exceeds {PROB_SCALE}")
        if value > PROB_SCALE:
            raise DecodeError(
                f"decode: {where}: entropy table entry {s} is {value}; at most {PROB_SCALE}"
            )
        freq[s] = value
    if int(freq.sum()) != PROB_SCALE:
        raise DecodeError(
            f"decode: {where}: entropy table sums to {int(freq.sum())}; expected {PROB_SCALE}"
        )
    return freq, pos


_ERRORS = {
    1: "the coded stream ends before all codes are decoded",
    2: "words are left over after the last code",
    3: "the coded stream does not end in the encoder's initial states (corrupted)",
}


def check_density(data_len: int, n: int, where: str) -> None:
    """Refuse coded data too short for ``n`` codes, before anything is allocated."""
    if n > MAX_CODES_PER_BYTE * data_len:
        raise DecodeError(
            f"decode: {where}: {n} entropy-coded codes in {data_len} bytes; at most "
            f"{MAX_CODES_PER_BYTE} codes per byte are allowed (a decompression bomb?)"
        )


def decode_codes(
    data: bytes | memoryview | np.ndarray,
    bits: int,
    n: int,
    *,
    steps: np.ndarray | None = None,
    row_len: int | None = None,
    values: bool = True,
    where: str = "tensor",
) -> np.ndarray | None:
    """Decode ``n`` codes coded by :func:`encode_codes`.

    Parameters
    ----------
    data : bytes-like
        The table and the stream (nothing else).
    bits : int
        1..8.
    n : int
        Number of codes.
    steps : np.ndarray, optional
        If given, return float32 levels ``(code - (2**bits - 1)/2) * steps[row]``
        (rows of ``row_len`` codes; ``steps`` float64) instead of the codes: the
        dequantized values, without an intermediate array of codes.
    values : bool, default True
        ``False`` validates the stream without storing anything; returns ``None``.
    where : str
        Names the tensor in error messages.

    Raises
    ------
    DecodeError
        Bad table, fewer than one byte per 8 codes, truncated or corrupted stream.
    """
    bits = check_bits(bits)
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    check_density(raw.size, n, where)
    if steps is not None and (row_len is None or (n and (row_len <= 0 or n % row_len))):
        raise InvalidInputError(f"decode_codes: {n} codes are not rows of {row_len}")
    freq, used = _read_table(raw, bits, where)
    stream = raw[used:]
    if stream.size < 16 or stream.size % 2:
        raise DecodeError(
            f"decode: {where}: the coded stream has {stream.size} bytes; expected 16 bytes of "
            "states and 2-byte words"
        )
    states = stream[:16].view("<u4").astype(np.uint64)
    if (states < RANS_L).any():
        raise DecodeError(f"decode: {where}: the coded stream's initial state is out of range")
    words = stream[16:].view("<u2")
    if words.dtype != np.uint16:  # a big-endian host
        words = words.astype(np.uint16)
    cum = np.concatenate(([0], np.cumsum(freq)[:-1])).astype(np.uint64)
    sym = np.repeat(np.arange(1 << bits, dtype=np.uint8), freq)
    mode = 0 if not values else (2 if steps is not None else 1)
    out_c = np.empty(n if mode == 1 else 0, dtype=np.uint8)
    out_f = np.empty(n if mode == 2 else 0, dtype=np.float32)
    st = (
        np.ascontiguousarray(steps, dtype=np.float64)
        if steps is not None and steps.size
        else np.zeros(1, np.float64)
    )
    rl = int(row_len) if steps is not None and row_len else max(n, 1)
    half = ((1 << bits) - 1) / 2.0
    status = _decode_kernel(
        words,
        words.size,
        states,
        freq.astype(np.uint64),
        cum,
        sym,
        n,
        mode,
        out_c,
        out_f,
        st,
        rl,
        half,
    )
    if status:
        raise DecodeError(f"decode: {where}: {_ERRORS[int(status)]}")
    if mode == 0:
        return None
    return out_f if mode == 2 else out_c
