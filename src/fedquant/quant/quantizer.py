"""Clipped uniform quantization of one tensor (arXiv 2405.13365, Sec. III).

``quantize`` clips a tensor at a threshold ``s`` (chosen by a
:mod:`~fedquant.quant.clipping` rule or given), maps it to the ``2**B`` levels
of :mod:`fedquant.quant.grid` with nearest or stochastic rounding, packs the
integer codes (:mod:`~fedquant.quant.packing`) and measures the squared error,
all in one fused pass. ``dequantize`` maps codes back to values.

Example
-------
>>> import numpy as np
>>> from fedquant.quant.quantizer import quantize, dequantize
>>> q = quantize(np.array([-1.5, -0.4, 0.6, 1.5], np.float32), bits=2, scale=1.5)
>>> q.codes.tolist(), dequantize(q).tolist()
([0, 1, 2, 3], [-1.5, -0.5, 0.5, 1.5])
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

import numpy as np

from fedquant.choices import parse_choice
from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant import kernels
from fedquant.quant.clipping import ThresholdMethod, _threshold_flat, parse_method
from fedquant.quant.grid import Rounding, check_bits, num_steps, parse_rounding
from fedquant.quant.packing import packed_size, unpack

#: packed bytes from which per-tensor codes are decoded a whole byte at a time
_BYTE_TABLE_MIN = 1 << 14
#: scales inside this range use float32 arithmetic; outside it, float64 (no overflow).
_F32_SAFE = (1e-30, 1e30)

SeedLike = int | np.integer | np.random.Generator | np.random.SeedSequence | None


class Granularity(str, Enum):
    """One threshold for the whole tensor, or one per output channel (dim 0)."""

    TENSOR = "tensor"
    CHANNEL = "channel"


def parse_granularity(granularity: Granularity | str) -> Granularity:
    """Normalize a granularity name; raise :class:`InvalidInputError` for unknown names."""
    return parse_choice(Granularity, granularity, "granularity")


def rng_key(seed: SeedLike, *, where: str = "quantize") -> np.uint64:
    """A 64-bit key for the counter-based generator, from an explicit seed or generator."""
    if seed is None:
        raise InvalidInputError(
            f"{where}: stochastic rounding needs seed= (an int, np.random.Generator or "
            "SeedSequence); fedquant never uses global random state"
        )
    if isinstance(seed, np.random.Generator):
        return np.uint64(seed.integers(0, 2**64, dtype=np.uint64))
    if isinstance(seed, np.random.SeedSequence):
        return np.uint64(seed.generate_state(1, np.uint64)[0])
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
        return np.uint64(np.random.SeedSequence(int(seed)).generate_state(1, np.uint64)[0])
    raise InvalidInputError(
        f"{where}: seed={seed!r} is not usable; expected a non-negative int, "
        "np.random.Generator or np.random.SeedSequence"
    )


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized tensor: packed codes plus everything needed to dequantize it.

    Attributes
    ----------
    packed : np.ndarray
        uint8, ``ceil(numel * bits / 8)`` bytes (layout: :mod:`fedquant.quant.packing`).
    shape : tuple of int
        Shape of the original tensor.
    bits : int
        1..8.
    granularity : Granularity
        ``TENSOR`` (one scale) or ``CHANNEL`` (one per row of dim 0).
    scales : np.ndarray
        float32 clipping thresholds ``s``, one per row (length 1 for per-tensor).
    mse : float
        Measured mean squared error ``mean((x - dequantize(q))**2)``.
    rounding : Rounding
        The rounding that produced the codes (informational).
    """

    packed: np.ndarray
    shape: tuple[int, ...]
    bits: int
    granularity: Granularity
    scales: np.ndarray
    mse: float
    rounding: Rounding

    @property
    def numel(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of packed codes plus float32 scales (the payload's data for this tensor)."""
        return int(self.packed.size) + 4 * int(self.scales.size)

    @property
    def codes(self) -> np.ndarray:
        """The unpacked integer codes, uint8 in ``0 .. 2**bits - 1``, flat."""
        return unpack(self.packed, self.bits, self.numel)

    @property
    def steps(self) -> np.ndarray:
        """Level spacing per row: ``2 s / (2**bits - 1)`` (float64)."""
        return 2.0 * self.scales.astype(np.float64) / num_steps(self.bits)


def as_float32_array(x: Any, *, where: str = "quantize") -> np.ndarray:
    """A C-contiguous float32 NumPy view/copy of an ndarray or torch tensor."""
    if hasattr(x, "detach") and hasattr(x, "numpy"):  # torch.Tensor, without importing torch
        if x.is_complex() or not (x.is_floating_point()):
            raise InvalidInputError(
                f"{where}: expected a floating-point tensor, got dtype {x.dtype}"
            )
        x = x.detach().to("cpu").float().numpy()
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        raise InvalidInputError(f"{where}: expected a floating-point array, got dtype {arr.dtype}")
    return np.asarray(arr, dtype=np.float32, order="C")


class RowView(NamedTuple):
    """A tensor as ``(rows, row_len)`` and the granularity that view stands for."""

    rows: np.ndarray
    granularity: Granularity


def row_view(arr: np.ndarray, granularity: Granularity) -> RowView:
    """2-D ``(rows, row_len)`` view; per-channel on a tensor with ndim < 2 is per-tensor."""
    if granularity is Granularity.CHANNEL and arr.ndim >= 2 and arr.shape[0] > 0:
        return RowView(arr.reshape(arr.shape[0], -1), Granularity.CHANNEL)
    return RowView(arr.reshape(1, -1), Granularity.TENSOR)


def row_thresholds(
    rows: np.ndarray, bits: int, rounding: Rounding, method: ThresholdMethod, percentile: float
) -> np.ndarray:
    """One clipping threshold per row of the 2-D float32 ``rows``.

    ``method`` and ``rounding`` are resolved enums: nothing is parsed here.
    """
    return np.array(
        [
            _threshold_flat(rows[r], bits, rounding, method, percentile)
            for r in range(rows.shape[0])
        ],
        dtype=np.float32,
    )


def _coefficients(scales: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``inv = L/(2s)`` and ``step = 2s/L`` per row, float32 when safe else float64."""
    steps = num_steps(bits)
    if scales.size == 1:  # per tensor: the same float64 arithmetic on Python floats (faster)
        s1 = float(scales.reshape(-1)[0])
        inv1, step1 = (steps / (2.0 * s1) if s1 > 0 else 0.0), 2.0 * s1 / steps
        dt = np.float32 if s1 <= 0 or _F32_SAFE[0] < s1 < _F32_SAFE[1] else np.float64
        return np.array([inv1], dtype=dt), np.array([step1], dtype=dt)
    s = scales.astype(np.float64)
    with np.errstate(divide="ignore"):
        inv = np.where(s > 0, steps / (2.0 * np.where(s > 0, s, 1.0)), 0.0)
    step = 2.0 * s / steps
    nz = s[s > 0]
    if nz.size == 0 or (nz.min() > _F32_SAFE[0] and nz.max() < _F32_SAFE[1]):
        return inv.astype(np.float32), step.astype(np.float32)
    return inv, step


def quantize(
    x: Any,
    bits: int,
    *,
    scale: float | np.ndarray | None = None,
    method: ThresholdMethod | str = ThresholdMethod.OCTAV,
    rounding: Rounding | str = Rounding.NEAREST,
    granularity: Granularity | str = Granularity.TENSOR,
    seed: SeedLike = None,
    percentile: float = 99.99,
) -> QuantizedTensor:
    """Quantize a float tensor to ``bits`` bits.

    Parameters
    ----------
    x : array_like or torch.Tensor
        Floating-point values of any shape (0-d and empty included). NaN/Inf are refused.
    bits : int
        1..8.
    scale : float or array, optional
        Clipping threshold(s) to use (one, or one per channel). If omitted, the
        threshold is chosen by ``method``. Rounded to float32.
    method : str, default "octav"
        Threshold rule (:class:`~fedquant.quant.clipping.ThresholdMethod`).
    rounding : {"nearest", "stochastic"}, default "nearest"
    granularity : {"tensor", "channel"}, default "tensor"
        ``"channel"`` uses one threshold per index of dim 0; tensors with fewer
        than 2 dimensions are always quantized per tensor.
    seed : int, np.random.Generator or np.random.SeedSequence, optional
        Required for stochastic rounding. The random stream is a pure function
        of the derived 64-bit key and the element index (any thread count gives
        the same codes).
    percentile : float, default 99.99
        For ``method="percentile"``.

    Returns
    -------
    QuantizedTensor

    Raises
    ------
    InvalidInputError
        Bad bits/method/rounding/granularity/seed/scale, non-float input.
    NonFiniteError
        ``x`` holds NaN or Inf.
    """
    bits = check_bits(bits)
    rnd = parse_rounding(rounding)
    gran = parse_granularity(granularity)
    meth = parse_method(method)
    arr = as_float32_array(x)
    shape = tuple(int(d) for d in arr.shape)
    rows, gran = row_view(arr, gran)
    key = rng_key(seed) if rnd is Rounding.STOCHASTIC else np.uint64(0)

    scales: np.ndarray
    if scale is None:
        scales = row_thresholds(rows, bits, rnd, meth, percentile)
    else:
        scales = np.asarray(scale, dtype=np.float64).reshape(-1)
        if scales.size != rows.shape[0]:
            raise InvalidInputError(
                f"quantize: got {scales.size} scale(s) for {rows.shape[0]} row(s) "
                f"(granularity={gran.value!r}, shape={shape})"
            )
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise InvalidInputError(f"quantize: scale must be finite and >= 0, got {scale!r}")
        scales = scales.astype(np.float32)
        if not np.isfinite(scales).all():
            raise InvalidInputError(f"quantize: scale {scale!r} overflows float32")

    q = quantize_rows(rows, scales, bits, rnd, key, values=arr, where="quantize")
    n = rows.size
    return QuantizedTensor(
        packed=q.packed,
        shape=shape,
        bits=bits,
        granularity=gran,
        scales=scales,
        mse=float(q.sq_err / n) if n else 0.0,
        rounding=rnd,
    )


class QuantizedRows(NamedTuple):
    """Packed codes of some rows, and the sum of their squared quantization errors."""

    packed: np.ndarray
    sq_err: float


def _pack_rows(
    rows: np.ndarray,
    scales: np.ndarray,
    bits: int,
    rnd: Rounding,
    key: np.uint64,
    wide: bool,
    out: np.ndarray | None,
) -> QuantizedRows:
    """One fused quantize-and-pack pass, in float32 arithmetic or (``wide``) float64."""
    inv, step = _coefficients(scales, bits)
    if wide:
        inv, step = inv.astype(np.float64), step.astype(np.float64)
    step64 = 2.0 * scales.astype(np.float64).reshape(-1) / num_steps(bits)
    packed = np.empty(packed_size(rows.size, bits), dtype=np.uint8) if out is None else out
    if rows.size == 0:
        return QuantizedRows(packed, 0.0)
    err = kernels.quantize_pack(
        rows.reshape(-1),
        rows.shape[1],
        inv,
        step,
        step64,
        bits,
        rnd is Rounding.STOCHASTIC,
        key,
        packed,
    )
    return QuantizedRows(packed, float(err))


def quantize_rows(
    rows: np.ndarray,
    scales: np.ndarray,
    bits: int,
    rounding: Rounding,
    key: np.uint64,
    *,
    values: np.ndarray | None = None,
    where: str = "quantize",
    out: np.ndarray | None = None,
) -> QuantizedRows:
    """Quantize the C-contiguous 2-D ``rows`` (one threshold per row) and pack the codes.

    The primitive under :func:`quantize` and the encoder: ``rounding`` is a
    resolved :class:`~fedquant.quant.grid.Rounding`, ``key`` the stream key of
    stochastic rounding (:func:`rng_key`). The codes are written into ``out``
    (uint8, exactly the packed size) when given. If the squared error is not
    finite, ``values`` (the tensor the rows came from; default ``rows``) is
    checked for NaN/Inf -- :class:`NonFiniteError` naming ``where`` -- and
    finite but huge errors, which overflowed float32 accumulation, are
    computed again in float64.
    """
    res = _pack_rows(rows, scales, bits, rounding, key, False, out)
    if not np.isfinite(res.sq_err):
        check_finite(rows if values is None else values, where)
        res = _pack_rows(rows, scales, bits, rounding, key, True, out)
    return res


def level_table(scales: np.ndarray, bits: int) -> np.ndarray:
    """All levels per row, float32 ``(rows, 2**bits)``: ``(k - L/2) * 2s/L``."""
    steps = num_steps(bits)
    k = np.arange(steps + 1, dtype=np.float64) - steps / 2.0
    step = 2.0 * np.asarray(scales, dtype=np.float64).reshape(-1, 1) / steps
    return np.ascontiguousarray((k[None, :] * step).astype(np.float32))


def dequantize_packed(
    packed: np.ndarray, shape: tuple[int, ...], bits: int, scales: np.ndarray
) -> np.ndarray:
    """Values of packed codes (validated sizes assumed), float32 of ``shape``."""
    n = int(np.prod(shape, dtype=np.int64))
    out = np.empty(n, dtype=np.float32)
    if n and bits == 8 and np.size(scales) == 1:  # arithmetic beats a table lookup here
        steps = num_steps(bits)
        step = 2.0 * float(np.asarray(scales, dtype=np.float64).reshape(-1)[0]) / steps
        kernels.dequantize_linear(packed, steps / 2.0, step, out)
    elif n:
        lut = level_table(scales, bits)
        # the byte table (256 rows, up to 8 KiB, ~20 KiB while built) pays off on large
        # tensors; on small ones it would outweigh the output (decode's memory bound)
        if lut.shape[0] == 1 and 8 % bits == 0 and packed.size >= _BYTE_TABLE_MIN:
            kernels.dequantize_bytes(packed, n, byte_table(lut[0], bits), out)
        else:
            row_len = max(1, n // lut.shape[0])
            kernels.unpack_dequantize(packed, bits, n, lut, row_len, out)
    return out.reshape(shape)


def byte_table(levels: np.ndarray, bits: int) -> np.ndarray:
    """``(256, 8 // bits)`` float32: the levels of the codes packed in each byte value.

    ``bits`` divides 8; code ``t`` of a byte sits in bits ``[t*bits, (t+1)*bits)``.
    """
    per = 8 // bits
    b = np.arange(256, dtype=np.uint8)[:, None]
    codes = (b >> (np.arange(per, dtype=np.uint8) * bits)) & ((1 << bits) - 1)
    return np.ascontiguousarray(levels[codes], dtype=np.float32)


def dequantize(q: QuantizedTensor) -> np.ndarray:
    """Map a :class:`QuantizedTensor` back to float32 values of its original shape."""
    if not isinstance(q, QuantizedTensor):
        raise InvalidInputError(
            f"dequantize: expected the QuantizedTensor that quantize() returns, got "
            f"{type(q).__name__}"
        )
    return dequantize_packed(q.packed, q.shape, q.bits, q.scales)


def fake_quantize(x: Any, bits: int, **kwargs: Any) -> np.ndarray:
    """``dequantize(quantize(x, bits, **kwargs))``: the values the server will see."""
    return dequantize(quantize(x, bits, **kwargs))


def check_finite(x: np.ndarray, where: str) -> None:
    """Raise :class:`NonFiniteError` naming ``where`` if ``x`` holds NaN/Inf."""
    if not np.isfinite(x).all():
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise NonFiniteError(f"{where}: input holds {bad} NaN/Inf value(s); expected finite values")
