"""Seeded blockwise randomized Hadamard rotation (the codec's ``transform = 1``).

Why rotate
----------
OCTAV picks the MSE-optimal clipping threshold for the distribution it is
given, but a uniform grid is only near-optimal for light tails. Multiplying a
vector by a random orthogonal matrix spreads every coordinate's energy over
all of them, so the rotated coordinates are close to Gaussian whatever the
layer's distribution (Suresh et al., "Distributed Mean Estimation with Limited
Communication", ICML 2017, who use exactly this rotation before quantizing;
the transform itself is Ailon & Chazelle's randomized Hadamard transform,
"The Fast Johnson-Lindenstrauss Transform", STOC 2006). The receiver undoes
it; since the rotation is orthogonal the squared error is unchanged by it,
and on a Gaussian the clipped uniform quantizer with OCTAV's threshold is
within a few percent of the best uniform quantizer.

The transform
-------------
For one vector ``x`` of length ``n`` (a tensor, or one row of it)::

    y = H_blocks . D . pad(x)

* ``pad`` appends zeros up to ``padded_length(n)`` (below);
* ``D`` is a diagonal of random signs ``+-1``; the sign of padded position
  ``i`` is bit ``i % 64`` of ``splitmix64(key + (i // 64 + 1) * 0x9E3779B97F4A7C15)``
  (the counter-based stream of :mod:`fedquant.quant.kernels`), a pure function
  of the 64-bit ``key`` and the position;
* ``H_blocks`` applies the normalized Walsh-Hadamard matrix
  ``H_N / sqrt(N)`` (``H_1 = [1]``, ``H_2N = [[H_N, H_N], [H_N, -H_N]]``) to
  each block of the padded vector. ``H_N / sqrt(N)`` is symmetric and
  orthogonal, hence its own inverse, and the fast transform costs
  ``N log2 N`` additions.

The inverse is ``pad^-1 . D . H_blocks`` (the first ``n`` coordinates).

The block layout
----------------
Two powers of two set it: ``block`` (the largest block, default
:data:`DEFAULT_BLOCK` = 2**16: 256 KiB of float32, cache-resident) and
``min_block`` (the padding unit, default :data:`DEFAULT_MIN_BLOCK` = 2**4).

* ``padded_length(n) = ceil(n / u) * u`` with ``u = min(min_block, next_pow2(n))``;
* the padded vector is cut into ``padded // block`` blocks of ``block``, then
  the remainder (a multiple of ``u``) into the powers of two of its binary
  expansion, largest first.

Example: the paper's MNIST CNN. ``fc1`` (78,400 weights) needs no padding and
is cut into 65,536 + 8,192 + 4,096 + 512 + 64; ``conv2`` (2,304) into 2,048 +
256; ``conv1`` (144) into 128 + 16; ``fc2`` (1,000) is padded to 1,008 = 512 +
256 + 128 + 64 + 32 + 16. Padding costs fewer than ``min_block`` codes per row.
Padding the last block to a full ``block`` instead would have sent 131,072
codes for ``fc1``, 1.67x its size. Why 16: on Student-t(3) weights of that
CNN's shapes, ``min_block`` 8 and 16 gave the same error and bytes, 64 padded
per-channel rows (784 -> 832) for 7 % more bytes, and small blocks of the
tail mix less (a 16-block spreads an outlier over 16 coordinates only).

Keys
----
The signs are never sent. Sender and receiver derive them from a *shared
key* (in the simulator: from the run seed and the round, see
:func:`fedquant.fl.seeding.rotation_key`) and the tensor's name:
:func:`tensor_key` returns the 64-bit sign key and a 32-bit *check* value
from a keyed BLAKE2b hash of the name. The payload carries the check (not the
key), so a receiver with a different shared key is refused instead of
silently decoding garbage.

Per-channel granularity
-----------------------
With one clipping threshold per output channel, each row of
``x.reshape(rows, -1)`` is rotated on its own (same layout per row, signs
indexed by the position in the padded ``rows x padded`` array), so a
threshold still belongs to one output channel. Short rows pay proportionally
more padding (a row of 100 weights travels as 112 codes).

Numerics
--------
The butterflies run in float32; every stage halves its inputs before adding
them (exact in binary) and a last pass multiplies by ``sqrt(N)``, so no
intermediate exceeds the largest input and the result overflows only if the
exact rotation does (then it is refused). The round trip is exact to a few
float32 ulps (tested). The decoder refuses clipping thresholds ``s`` with
``sqrt(N) s`` near the float32 maximum (:func:`scale_limit`; the encoder caps
its thresholds there), so a decoded tensor is always finite.
"""

from __future__ import annotations

import hashlib
import math
from typing import NamedTuple

import numpy as np
from numba import njit, prange

from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant import kernels
from fedquant.quant.kernels import mix64, mix64_array

#: largest block of the transform
DEFAULT_BLOCK = 1 << 16
#: padding unit: a row is padded to a multiple of it (or to a power of two if shorter)
DEFAULT_MIN_BLOCK = 1 << 4
#: largest block size the wire format accepts (log2)
MAX_BLOCK_LOG2 = 24
#: blocks up to this size are transformed in one piece (L1-resident stages)
_SUB = 1 << 12

_F32_MAX = np.float32(np.finfo(np.float32).max)


class TensorKey(NamedTuple):
    """The per-tensor rotation key: the sign stream's key and the check sent in the payload."""

    key: int  # 64-bit key of the sign stream
    check: int  # 32-bit value the payload carries to detect a wrong shared key


def _check_pow2(value: int, what: str, lo: int, hi: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not lo <= int(value) <= hi
        or int(value) & (int(value) - 1)
    ):
        raise InvalidInputError(f"rotation: {what}={value!r} is not a power of two in [{lo}, {hi}]")
    return int(value)


class Blocks(NamedTuple):
    """A validated block layout: the largest block and the padding unit."""

    block: int
    min_block: int


def check_blocks(block: int, min_block: int) -> Blocks:
    """Validate ``(block, min_block)``: powers of two, ``1 <= min_block <= block <= 2**24``."""
    block = _check_pow2(block, "block", 1, 1 << MAX_BLOCK_LOG2)
    return Blocks(block=block, min_block=_check_pow2(min_block, "min_block", 1, block))


def check_shared_key(shared_key: int, where: str = "rotation") -> int:
    """Return ``shared_key`` as an int if it is a 64-bit unsigned integer, else raise."""
    if (
        isinstance(shared_key, bool)
        or not isinstance(shared_key, (int, np.integer))
        or not 0 <= int(shared_key) < 1 << 64
    ):
        raise InvalidInputError(
            f"{where}: shared_key={shared_key!r} is not usable; expected an int in [0, 2**64)"
        )
    return int(shared_key)


def tensor_key(shared_key: int, name: str) -> TensorKey:
    """The rotation key of tensor ``name`` under ``shared_key`` (keyed BLAKE2b of the name).

    >>> tensor_key(0, "fc1.weight") == tensor_key(0, "fc1.weight")
    True
    >>> tensor_key(0, "fc1.weight").key != tensor_key(1, "fc1.weight").key
    True
    """
    k = check_shared_key(shared_key, "tensor_key")
    digest = hashlib.blake2b(
        name.encode("utf-8"), digest_size=16, key=k.to_bytes(8, "little"), person=b"fedquant-rot-v1"
    ).digest()
    return TensorKey(int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:12], "little"))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def padded_length(n: int, block: int = DEFAULT_BLOCK, min_block: int = DEFAULT_MIN_BLOCK) -> int:
    """Length of a rotated row of ``n`` values (see the module docstring).

    >>> [padded_length(n) for n in (0, 1, 3, 16, 17, 144, 1000, 78400)]
    [0, 1, 4, 16, 32, 144, 1008, 78400]
    """
    blocks = check_blocks(block, min_block)
    block, min_block = blocks.block, blocks.min_block
    n = int(n)
    if n <= 0:
        return 0
    unit = min(min_block, _next_pow2(n))
    return -(-n // unit) * unit


def block_sizes(padded: int, block: int = DEFAULT_BLOCK) -> list[int]:
    """Block sizes of a padded row, in order: full blocks, then the binary expansion of the rest.

    >>> block_sizes(78400)
    [65536, 8192, 4096, 512, 64]
    """
    full, rest = divmod(int(padded), int(block))
    out = [int(block)] * full
    bit = int(block) >> 1
    while rest:
        if rest & bit:
            out.append(bit)
            rest -= bit
        bit >>= 1
    return out


def largest_block(padded: int, block: int = DEFAULT_BLOCK) -> int:
    """Size of the largest block of a padded row (its first): O(1), for any length."""
    padded = int(padded)
    if padded <= 0:
        return 0
    return int(block) if padded >= block else 1 << (padded.bit_length() - 1)


def scale_limit(padded: int, block: int = DEFAULT_BLOCK) -> float:
    """The largest clipping threshold whose levels stay finite once rotated back.

    A block of ``N`` levels, each at most ``s``, rotates back to values of at
    most ``sqrt(N) s`` (plus float32 rounding: the margin ``2**-10``). The
    encoder caps its thresholds here (clipping harder: only inputs near
    ``3.4e38 / sqrt(N)`` are affected) and the decoder refuses larger ones, so
    decoding never overflows.
    """
    n = largest_block(padded, block)
    limit = float(np.finfo(np.float32).max) / (math.sqrt(max(n, 1)) * (1.0 + 2.0**-10))
    f = np.float32(limit)
    return float(f if float(f) <= limit else np.nextafter(f, np.float32(0)))


def _layout_arrays(padded: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    sizes = np.array(block_sizes(padded, block), dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return offsets, sizes


# --------------------------------------------------------------------------- kernels


@njit(cache=True)
def _first8(y, base, size):  # pragma: no cover - compiled
    """Stages h = 1, 2, 4 on groups of 8 values held in registers, scaled by 1/8 first."""
    e = np.float32(0.125)
    for i in range(base, base + size, 8):
        a0 = y[i] * e
        a1 = y[i + 1] * e
        a2 = y[i + 2] * e
        a3 = y[i + 3] * e
        a4 = y[i + 4] * e
        a5 = y[i + 5] * e
        a6 = y[i + 6] * e
        a7 = y[i + 7] * e
        b0 = a0 + a1
        b1 = a0 - a1
        b2 = a2 + a3
        b3 = a2 - a3
        b4 = a4 + a5
        b5 = a4 - a5
        b6 = a6 + a7
        b7 = a6 - a7
        c0 = b0 + b2
        c1 = b1 + b3
        c2 = b0 - b2
        c3 = b1 - b3
        c4 = b4 + b6
        c5 = b5 + b7
        c6 = b4 - b6
        c7 = b5 - b7
        y[i] = c0 + c4
        y[i + 1] = c1 + c5
        y[i + 2] = c2 + c6
        y[i + 3] = c3 + c7
        y[i + 4] = c0 - c4
        y[i + 5] = c1 - c5
        y[i + 6] = c2 - c6
        y[i + 7] = c3 - c7


@njit(cache=True)
def _radix4(y, base, size, h):  # pragma: no cover - compiled
    """Stages h and 2h in one pass, the inputs quartered first (exact in binary, and no sum
    exceeds the largest input). Four disjoint views let LLVM vectorize."""
    q = np.float32(0.25)
    for i in range(base, base + size, 4 * h):
        va = y[i : i + h]
        vb = y[i + h : i + 2 * h]
        vc = y[i + 2 * h : i + 3 * h]
        vd = y[i + 3 * h : i + 4 * h]
        for j in range(h):
            a = va[j] * q
            b = vb[j] * q
            c = vc[j] * q
            d = vd[j] * q
            s0 = a + b
            s1 = a - b
            s2 = c + d
            s3 = c - d
            va[j] = s0 + s2
            vb[j] = s1 + s3
            vc[j] = s0 - s2
            vd[j] = s1 - s3


@njit(cache=True)
def _radix2(y, base, size, h):  # pragma: no cover - compiled
    """Stage h, the inputs halved first."""
    half = np.float32(0.5)
    for i in range(base, base + size, 2 * h):
        va = y[i : i + h]
        vb = y[i + h : i + 2 * h]
        for j in range(h):
            a = va[j] * half
            b = vb[j] * half
            va[j] = a + b
            vb[j] = a - b


@njit(cache=True)
def _stages(y, base, size, h, stop):  # pragma: no cover - compiled
    """Stages ``h, 2h, ... < stop`` on every piece of ``stop`` values of ``y[base:base+size]``."""
    while 4 * h <= stop:
        _radix4(y, base, size, h)
        h *= 4
    if h < stop:
        _radix2(y, base, size, h)


@njit(cache=True)
def _fwht(y, base, size):  # pragma: no cover - compiled
    """Normalized Walsh-Hadamard transform of ``y[base:base+size]`` in place.

    Every stage halves its inputs before adding them (exact in binary), so no
    intermediate exceeds the largest input; a last pass multiplies by
    ``sqrt(size)``, making the result ``H y / sqrt(size)``. Stages act on
    distinct index bits and commute: those below ``_SUB`` run on one
    L1-resident piece at a time, the others across the block.
    """
    sub = min(size, _SUB)
    if sub >= 8:
        for s0 in range(base, base + size, sub):
            _first8(y, s0, sub)
            _stages(y, s0, sub, 8, sub)
    else:
        _stages(y, base, size, 1, size)
    _stages(y, base, size, sub, size)
    if size > 1:
        c = np.float32(math.sqrt(size))
        for j in range(base, base + size):
            y[j] *= c


@njit(cache=True)
def _apply_signs(src, s0, dst, d0, count, key, g):  # pragma: no cover - compiled
    """``dst[d0 + j] = sign(g + j) * src[s0 + j]`` for ``j < count`` (``src`` may be ``dst``).

    The sign is applied by flipping the float32 sign bit; whole 64-value words
    of the sign stream take a fixed-length loop that LLVM vectorizes.
    """
    si = src.view(np.uint32)
    di = dst.view(np.uint32)
    one = np.uint64(1)
    top = np.uint32(31)
    j = 0
    lead = min(count, (64 - (g & 63)) & 63)
    if lead:
        h = mix64(key, g >> 6)
        for k in range(lead):
            bit = np.uint32((h >> np.uint64((g + k) & 63)) & one)
            di[d0 + k] = si[s0 + k] ^ (bit << top)
        j = lead
    while j + 64 <= count:
        h = mix64(key, (g + j) >> 6)
        vs = si[s0 + j : s0 + j + 64]
        vd = di[d0 + j : d0 + j + 64]
        for k in range(64):
            vd[k] = vs[k] ^ (np.uint32((h >> np.uint64(k)) & one) << top)
        j += 64
    if j < count:
        h = mix64(key, (g + j) >> 6)
        for k in range(count - j):
            bit = np.uint32((h >> np.uint64(k)) & one)
            di[d0 + j + k] = si[s0 + j + k] ^ (bit << top)


@njit(cache=True)
def _count_overflow(y, base, size):  # pragma: no cover - compiled
    """How many of ``y[base:base+size]`` are not finite (comparisons with NaN are false)."""
    bad = 0
    for j in range(base, base + size):
        bad += not (abs(y[j]) <= _F32_MAX)
    return bad


@njit(inline="always")
def _block_of(item, nb, padded, offsets, sizes):  # pragma: no cover - compiled
    """Work item ``item`` of the ``rows * nb`` blocks: its row, block offset, size and start."""
    r = item // nb
    b = item - r * nb
    off = offsets[b]
    return r, off, sizes[b], r * padded + off


def _rotate_impl(x, out, rows, n, padded, offsets, sizes, key):  # pragma: no cover - compiled
    """``out[r*padded:(r+1)*padded] = H_blocks D pad(x[r*n:(r+1)*n])`` for every row.

    Returns the number of results that overflowed float32 (or are NaN).
    """
    nb = sizes.size
    bad = np.zeros(rows * nb, np.int64)
    for item in prange(rows * nb):
        r, off, size, base = _block_of(item, nb, padded, offsets, sizes)
        real = min(max(n - off, 0), size)
        _apply_signs(x, r * n + off, out, base, real, key, base)
        for j in range(base + real, base + size):
            out[j] = 0.0
        _fwht(out, base, size)
        bad[item] = _count_overflow(out, base, size)
    return bad.sum()


def _unrotate_impl(y, rows, n, padded, offsets, sizes, key):  # pragma: no cover - compiled
    """Inverse of :func:`_rotate_impl` in place; row ``r``'s values end at ``y[r*n:(r+1)*n]``.

    Returns the number of results that overflowed float32 (or are NaN).
    """
    nb = sizes.size
    bad = np.zeros(rows * nb, np.int64)
    for item in prange(rows * nb):
        _, off, size, base = _block_of(item, nb, padded, offsets, sizes)
        _fwht(y, base, size)
        _apply_signs(y, base, y, base, min(max(n - off, 0), size), key, base)
        bad[item] = _count_overflow(y, base, size)
    if padded != n:  # rows -> one contiguous prefix (forward moves never overtake their source)
        for r in range(1, rows):
            for j in range(n):
                y[r * n + j] = y[r * padded + j]
    return bad.sum()


def _tail_error_impl(y, packed, bits, steps, rows, n, padded, tail_off):  # pragma: no cover
    """Squared error, in the original domain, at the padded positions of every row.

    The padding of a row lies in its last block ``[tail_off, padded)``. The
    error there in the original domain is ``D H (y - y_hat)`` restricted to the
    block (signs do not change squares), where ``y_hat`` are the dequantized
    codes read from ``packed`` at any bit offset.
    """
    size = padded - tail_off
    mask = (1 << bits) - 1
    half = ((1 << bits) - 1) / 2.0
    nbytes = packed.size
    total = 0.0
    e = np.empty(size, np.float32)
    for r in range(rows):
        base = r * padded + tail_off
        for j in range(size):
            bp = (base + j) * bits
            byte = bp >> 3
            word = np.int64(packed[byte])
            if byte + 1 < nbytes:
                word |= np.int64(packed[byte + 1]) << 8
            code = (word >> (bp & 7)) & mask
            level = np.float32((code - half) * steps[r])
            e[j] = y[base + j] - level
        _fwht(e, 0, size)
        for j in range(n - tail_off, size):
            total += np.float64(e[j]) * np.float64(e[j])
    return total


_rotate = kernels._dispatcher(_rotate_impl, 0)
_unrotate = kernels._dispatcher(_unrotate_impl, 0)
_tail_error = njit(cache=True)(_tail_error_impl)


# --------------------------------------------------------------------------- public API


def _rows_of(x: np.ndarray, where: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.float32:
        raise InvalidInputError(f"{where}: expected float32 values, got {arr.dtype}")
    if arr.ndim not in (1, 2):
        raise InvalidInputError(
            f"{where}: expected a 1-D vector or 2-D rows, got shape {arr.shape}"
        )
    return np.ascontiguousarray(arr.reshape(1, -1) if arr.ndim == 1 else arr)


def rotate(
    x: np.ndarray,
    key: int,
    *,
    block: int = DEFAULT_BLOCK,
    min_block: int = DEFAULT_MIN_BLOCK,
    where: str = "rotate",
) -> np.ndarray:
    """Randomized Hadamard rotation of a float32 vector, or of each row of a 2-D array.

    Parameters
    ----------
    x : np.ndarray
        float32, shape ``(n,)`` or ``(rows, n)``; finite.
    key : int
        64-bit sign key (e.g. ``tensor_key(shared_key, name).key``).
    block, min_block : int
        The block layout (see the module docstring).
    where : str, default "rotate"
        What errors name as the caller (e.g. ``"encode: tensor 'w'"``).

    Returns
    -------
    np.ndarray
        float32 of shape ``(padded,)`` or ``(rows, padded)``,
        ``padded = padded_length(n, block, min_block)``.

    Raises
    ------
    InvalidInputError
        Not float32, not 1-D/2-D, bad block sizes or key, or values whose
        rotation overflows float32.
    """
    rows_arr = _rows_of(x, where)
    k = check_shared_key(key, where)
    blocks = check_blocks(block, min_block)
    block, min_block = blocks.block, blocks.min_block
    rows, n = rows_arr.shape
    padded = padded_length(n, block, min_block)
    out = np.empty(rows * padded, dtype=np.float32)
    if out.size:
        offsets, sizes = _layout_arrays(padded, block)
        if _rotate(rows_arr.reshape(-1), out, rows, n, padded, offsets, sizes, np.uint64(k)):
            bad = int(np.count_nonzero(~np.isfinite(rows_arr)))
            if bad:
                raise NonFiniteError(
                    f"{where}: input holds {bad} NaN/Inf value(s); expected finite values"
                )
            raise InvalidInputError(
                f"{where}: values up to {float(np.abs(rows_arr).max()):.3g} overflow float32 "
                f"once rotated (blocks of up to {sizes.max()} values sum into one)"
            )
    return out.reshape(padded) if np.asarray(x).ndim == 1 else out.reshape(rows, padded)


def unrotate(
    y: np.ndarray,
    key: int,
    n: int,
    *,
    block: int = DEFAULT_BLOCK,
    min_block: int = DEFAULT_MIN_BLOCK,
) -> np.ndarray:
    """Inverse of :func:`rotate`: the first ``n`` values of each row, float32 (a new array)."""
    rows_arr = _rows_of(y, "unrotate")
    k = check_shared_key(key, "unrotate")
    blocks = check_blocks(block, min_block)
    block, min_block = blocks.block, blocks.min_block
    rows, padded = rows_arr.shape
    if padded != padded_length(n, block, min_block):
        raise InvalidInputError(
            f"unrotate: rows of {padded} values do not match n={n} "
            f"(expected {padded_length(n, block, min_block)})"
        )
    buf = rows_arr.reshape(-1).copy()
    out = unrotate_into(buf, k, rows, n, block=block, min_block=min_block)
    return out.reshape(n) if np.asarray(y).ndim == 1 else out.reshape(rows, n)


def unrotate_into(
    buf: np.ndarray,
    key: int,
    rows: int,
    n: int,
    *,
    block: int = DEFAULT_BLOCK,
    min_block: int = DEFAULT_MIN_BLOCK,
    where: str = "unrotate",
) -> np.ndarray:
    """In-place inverse on a flat float32 buffer of ``rows * padded`` values.

    Returns the view ``buf[:rows * n]`` holding the rows of ``n`` values. Used by
    the decoder, which validated the sizes already; errors name ``where``.

    Raises
    ------
    InvalidInputError
        A result overflows float32 (only possible for values near the float32
        maximum, i.e. not from an honest encoder).
    """
    padded = padded_length(n, block, min_block)
    if buf.size != rows * padded:
        raise InvalidInputError(
            f"{where}: buffer of {buf.size} values; expected {rows} rows of {padded}"
        )
    if buf.size:
        offsets, sizes = _layout_arrays(padded, block)
        bad = _unrotate(buf, rows, n, padded, offsets, sizes, np.uint64(key))
        if bad:
            raise InvalidInputError(
                f"{where}: {bad} value(s) overflow float32 after the inverse rotation"
            )
    return buf[: rows * n]


def padding_error(
    y: np.ndarray,
    packed: np.ndarray,
    bits: int,
    scales: np.ndarray,
    n: int,
    *,
    block: int = DEFAULT_BLOCK,
    min_block: int = DEFAULT_MIN_BLOCK,
) -> float:
    """Squared quantization error that falls on the padding, in the original domain.

    ``y`` is the rotated ``(rows, padded)`` array, ``packed`` its packed codes
    and ``scales`` the thresholds per row. The error of the ``n`` real values of
    each row is the rotated-domain squared error minus this (the rotation is
    orthogonal), which is how the encoder reports an exact MSE without
    decoding.
    """
    rows, padded = y.shape
    if padded == n or y.size == 0:
        return 0.0
    sizes = block_sizes(padded, block)
    tail_off = padded - sizes[-1]
    steps = 2.0 * scales.astype(np.float64) / ((1 << bits) - 1)
    return float(
        _tail_error(
            np.ascontiguousarray(y).reshape(-1), packed, bits, steps, rows, n, padded, tail_off
        )
    )


def signs_reference(key: int, count: int) -> np.ndarray:
    """NumPy twin of the kernels' sign stream: ``D``'s diagonal for positions ``0..count-1``."""
    idx = np.arange(count, dtype=np.uint64)
    z = mix64_array(key, idx >> np.uint64(6))
    bit = (z >> (idx & np.uint64(63))) & np.uint64(1)
    return np.where(bit == 1, -1.0, 1.0).astype(np.float32)
