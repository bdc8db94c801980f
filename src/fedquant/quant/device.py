"""Quantization of torch tensors where they live (a CUDA GPU), in torch ops.

:func:`fedquant.quant.codec.encode` sends a floating tensor that sits on a
device other than the CPU here when it is quantized per tensor or per channel
with an OCTAV threshold, without rotation or entropy coding: the threshold, the
codes, the bit packing and the squared error are computed on the device, and
only the packed codes (the codes, for widths that do not divide 8), the
histogram the threshold is read from (8,160 bins per row) and the scales cross
to the host. Everything else (rotation, rANS, the other threshold rules) copies
the tensor to the host and takes the CPU path.

Same grid, same random stream, same thresholds
----------------------------------------------
* The grid and the rounding are those of :mod:`fedquant.quant.kernels`
  (end levels at ``+-s``; ``t = v * L/(2s) + L/2`` in float32; values on the
  grid keep their code under both roundings).
* The stochastic stream is the kernels' counter-based one (SplitMix64 of the
  group of 4 elements, 16 bits per element), written with int64 torch ops
  (``torch`` has no full uint64 arithmetic: products wrap modulo 2**64 the
  same way, and right shifts are masked to be logical): the codes are a pure
  function of the key and the element index, whatever the device.
* The OCTAV threshold is computed from the same log-linear histogram of
  ``|x|`` (:func:`fedquant.quant.kernels.abs_histogram`), counted on the device
  with ``bincount`` and iterated on the host by the same compiled fixed point:
  the thresholds equal the CPU path's up to the summation order of the per-bin
  sums (float64). Tensors of up to :data:`~fedquant.quant.clipping.EXACT_LIMIT`
  elements per row, or holding denormals, use the CPU's exact sorting path on
  a host copy (they are small, or rare).

The same functions run on CPU tensors, which is how the tests check them
without a GPU; the codes may differ from the numba kernels' in a few elements
where float32 rounding of ``t`` (fused multiply-add or not) falls on the other
side of a rounding boundary.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from fedquant.errors import NonFiniteError
from fedquant.quant import kernels
from fedquant.quant.clipping import (
    EXACT_LIMIT,
    OCTAV_MAX_ITER,
    OCTAV_TOL,
    PAPER_ITERATIONS,
    ThresholdMethod,
    _as_float32,
    _octav_exact,
)
from fedquant.quant.grid import Rounding, noise_coefficient, num_steps, paper_coefficient
from fedquant.quant.packing import pack
from fedquant.quant.quantizer import _F32_SAFE

#: the threshold rules computed on the device (the others take the CPU path)
DEVICE_METHODS = (ThresholdMethod.OCTAV, ThresholdMethod.OCTAV_PAPER)
_EDGES = kernels.histogram_edges()
_BINS = 1 << (8 + kernels.HIST_MANTISSA)  # every 13-bit pattern, Inf/NaN included


def _i64(v: int) -> int:
    """A uint64 constant as the int64 with the same bits."""
    return v - (1 << 64) if v >= 1 << 63 else v


_GAMMA = _i64(int(kernels._GAMMA))
_M1 = _i64(int(kernels._M1))
_M2 = _i64(int(kernels._M2))


class DeviceQuantized(NamedTuple):
    """What crosses to the host: packed codes, float32 scales, the measured MSE."""

    packed: np.ndarray
    scales: np.ndarray
    mse: float


def is_device_tensor(t: Any) -> bool:
    """A torch tensor on a device other than the CPU (without importing torch)."""
    dev = getattr(t, "device", None)
    return hasattr(t, "detach") and dev is not None and getattr(dev, "type", "cpu") != "cpu"


def _shr(z: Any, k: int) -> Any:
    """Logical right shift of int64 ``z`` by ``k`` (torch's ``>>`` is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniforms(key: int, n: int, device: Any) -> Any:
    """The kernels' stream (:func:`fedquant.quant.kernels.uniform_reference`) for
    elements ``0 .. n-1``, as a float32 tensor on ``device``."""
    import torch

    groups = (n + 3) // 4
    g = torch.arange(1, groups + 1, dtype=torch.int64, device=device)
    z = g * _GAMMA + _i64(int(key))
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    lanes = torch.stack([_shr(z, 16 * j) & 0xFFFF for j in range(4)], dim=1).reshape(-1)[:n]
    return (lanes.to(torch.float32) + 0.5) * (1.0 / 65536.0)


class AbsHistograms(NamedTuple):
    """Per-row histograms of ``|x|``: counts (int64) and sums (float64), ``(rows, 2**13)``."""

    counts: np.ndarray
    sums: np.ndarray


def abs_histograms(rows: Any) -> AbsHistograms:
    """Per-row log-linear histograms of ``|x|`` (the bins of
    :func:`fedquant.quant.kernels.abs_histogram`): counts (int64) and float64 sums,
    ``(rows, 2**13)`` each, Inf/NaN in the bins past ``HIST_BINS``."""
    import torch

    r = rows.shape[0]
    pattern = rows.reshape(r, -1).contiguous().view(torch.int32) & 0x7FFFFFFF
    idx = (pattern >> (23 - kernels.HIST_MANTISSA)).to(torch.int64)
    idx += torch.arange(r, device=rows.device, dtype=torch.int64).reshape(-1, 1) * _BINS
    idx = idx.reshape(-1)
    a = rows.reshape(-1).abs().to(torch.float64)
    cnt = torch.bincount(idx, minlength=r * _BINS)
    sums = torch.bincount(idx, weights=a, minlength=r * _BINS)
    return AbsHistograms(
        counts=cnt.reshape(r, _BINS).cpu().numpy(), sums=sums.reshape(r, _BINS).cpu().numpy()
    )


def octav_thresholds(
    rows: Any, bits: int, rounding: Rounding, method: ThresholdMethod, where: str
) -> np.ndarray:
    """OCTAV threshold of each row of the 2-D device tensor ``rows`` (float32, host)."""
    if method is ThresholdMethod.OCTAV:
        c, iterations = noise_coefficient(bits, rounding), -1
    else:
        c, iterations = paper_coefficient(bits), PAPER_ITERATIONS
    n_rows, m = rows.shape
    out = np.zeros(n_rows, dtype=np.float32)
    if m == 0:
        return out
    if m <= EXACT_LIMIT:
        host = rows.detach().cpu().numpy()
        _check_finite(host, where)
        for r in range(n_rows):
            out[r] = _as_float32(_octav_exact(host[r], c, None if iterations < 0 else iterations))
        return out
    hist = abs_histograms(rows)
    cnt, s1 = hist.counts, hist.sums
    bad = int(cnt[:, kernels.HIST_BINS :].sum())
    if bad:
        raise NonFiniteError(f"{where}: input holds {bad} NaN/Inf value(s); expected finite values")
    denormal = 1 << kernels.HIST_MANTISSA
    for r in range(n_rows):
        if not s1[r].any():
            continue
        if s1[r, :denormal].any():  # denormals: the exact path, as on the CPU
            row = rows[r].detach().cpu().numpy()
            s = _octav_exact(row, c, None if iterations < 0 else iterations)
        else:
            s = kernels.octav_histogram(
                np.ascontiguousarray(cnt[r, : kernels.HIST_BINS]),
                np.ascontiguousarray(s1[r, : kernels.HIST_BINS]),
                _EDGES,
                c,
                iterations,
                OCTAV_TOL,
                OCTAV_MAX_ITER,
            )
        out[r] = _as_float32(float(s))
    return out


def _check_finite(host: np.ndarray, where: str) -> None:
    if not np.isfinite(host).all():
        bad = int(np.count_nonzero(~np.isfinite(host)))
        raise NonFiniteError(f"{where}: input holds {bad} NaN/Inf value(s); expected finite values")


def quantize_on_device(
    rows: Any,
    scales: np.ndarray,
    bits: int,
    rounding: Rounding,
    key: int,
) -> DeviceQuantized:
    """Quantize the 2-D float32 tensor ``rows`` (one scale per row) where it lives.

    Returns the packed codes (layout of :mod:`fedquant.quant.packing`), the scales
    and the MSE, on the host.
    """
    import torch

    dev = rows.device
    n_rows, m = rows.shape
    n = n_rows * m
    steps = num_steps(bits)
    s64 = torch.from_numpy(scales.astype(np.float64)).to(dev).reshape(-1, 1)
    step64 = 2.0 * s64 / steps
    inv = torch.where(s64 > 0, steps / (2.0 * s64.clamp_min(1e-300)), 0.0)
    nz = scales[scales > 0]
    if nz.size == 0 or (nz.min() > _F32_SAFE[0] and nz.max() < _F32_SAFE[1]):
        inv, x = inv.to(torch.float32), rows  # float32 arithmetic, as the kernels
    else:
        x = rows.to(torch.float64)  # extreme scales: float64, as the kernels
    half = steps / 2.0
    t = torch.addcmul(torch.full_like(x, half), x, inv).clamp_(0.0, float(steps))
    if rounding is Rounding.STOCHASTIC:
        u = uniforms(key, n, dev).reshape(n_rows, m)
        f = torch.floor(t)
        k = (f + (u < (t - f)).to(t.dtype)).clamp_(max=float(steps))
        kn = torch.floor(t + 0.5)
        on_grid = rows == ((kn.to(torch.float64) - half) * step64).to(torch.float32)
        k = torch.where(on_grid, kn, k)
    else:
        k = torch.floor(t + 0.5)
    levels = ((k.to(torch.float64) - half) * step64).to(torch.float32)
    sq = float(((rows.to(torch.float64) - levels.to(torch.float64)) ** 2).sum()) if n else 0.0
    codes = k.to(torch.uint8).reshape(-1)
    if 8 % bits == 0 and n:
        packed = pack_torch(codes, bits).cpu().numpy()
    else:  # widths that do not divide 8: the codes cross, packed on the host
        packed = pack(codes.cpu().numpy(), bits)
    return DeviceQuantized(packed, scales, sq / n if n else 0.0)


def pack_torch(codes: Any, bits: int) -> Any:
    """Pack a flat uint8 tensor of codes where it lives, for ``bits`` that divide 8: the
    layout of :mod:`fedquant.quant.packing` (LSB first, the last byte zero-padded)."""
    import torch

    per = 8 // bits
    pad = (-codes.numel()) % per
    if pad:
        codes = torch.cat((codes, codes.new_zeros(pad)))
    c = codes.reshape(-1, per)
    out = c[:, 0].clone()
    for j in range(1, per):
        out |= c[:, j] << (bits * j)
    return out
