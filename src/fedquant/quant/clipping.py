"""Clipping thresholds: pure functions ``(values, bits, rounding) -> s``.

The methods (:class:`ThresholdMethod`):

``octav``
    The MSE-optimal threshold of Sakr et al., "Optimal Clipping and
    Magnitude-aware Differentiation for Improved Quantization-aware Training"
    (ICML 2022), used by Bozorgasl & Chen (arXiv 2405.13365): the fixed point of

        s <- E[|x| 1{|x|>s}] / (c E[1{|x|<=s}] + E[1{|x|>s}])

    with ``c`` matched to fedquant's grid and rounding
    (:func:`fedquant.quant.grid.noise_coefficient`). Iterated to convergence from
    ``mean |x|``. It costs one pass over the data instead of one per
    iteration: the expectations are read off a log-linear histogram of ``|x|``
    (2**5 bins per octave with per-bin counts and sums, linear inside a bin),
    and the iteration runs on the histogram, in compiled code. The result's
    MSE is within 1e-3 of the exact fixed point's (tested on Gaussian, Laplace
    and Student-t samples at 1-8 bits). Inputs of up to 32,768 elements, or
    holding denormals, use an exact sort + prefix-sum path. Inputs of
    :data:`SUBSAMPLE_MIN` elements or more first try a cheaper histogram with
    the same tail: exact above a cut placed from a fixed, unseeded sample of
    blocks, the sample's below it. Where the fixed point lands above the cut it
    is the full histogram's (the rule reads only the values above ``s``);
    elsewhere the full histogram is read (:func:`_octav_sampled`).
``octav-paper``
    The paper's variant, for comparisons: coefficient ``4**-B / 3`` (which
    belongs to a different grid, see :mod:`fedquant.quant.grid`) and exactly
    10 iterations from ``mean |x|``.
``max``
    ``max |x|``: no clipping (the paper's "max scalar" baseline).
``aciq-gauss``, ``aciq-laplace``
    Banner et al.'s analytic rule (NeurIPS 2019) for a Gaussian or Laplace prior
    fitted to the data (:mod:`fedquant.quant.calibration`).
``percentile``
    A percentile of ``|x|`` (``percentile=99.99`` by default).
``kl``
    TensorRT-style entropy calibration (the paper's open question 1).

Every method returns a finite ``s`` with ``0 <= s <= max|x|``; ``s == 0`` only
when all values are 0.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

import numpy as np

from fedquant.choices import parse_choice
from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant import calibration, kernels
from fedquant.quant.grid import (
    Rounding,
    check_bits,
    noise_coefficient,
    paper_coefficient,
    parse_rounding,
)

#: inputs up to this many elements use the exact (sorting) OCTAV path.
EXACT_LIMIT = 1 << 15
#: fixed-point iterations are stopped once the relative change is below this.
OCTAV_TOL = 1e-10
OCTAV_MAX_ITER = 200
PAPER_ITERATIONS = 10
#: inputs (rows) of at least this many elements search the OCTAV threshold with an
#: exact tail and a sampled bulk (:func:`_octav_sampled`); far above every layer of
#: the built-in models, whose thresholds therefore come from the full histogram.
SUBSAMPLE_MIN = 1 << 22
#: the sample: this many blocks ...
SAMPLE_BLOCKS = 1 << 8
#: ... of this many contiguous elements (16 KiB of float32) each.
SAMPLE_BLOCK = 1 << 12
#: the exact tail starts at this fraction of the sample's threshold ...
SAMPLE_MARGIN = 0.9
#: ... and is read only where it holds at most this fraction of the sample: a fatter
#: tail (low bit widths) makes its pass cost as much as the full histogram's.
SAMPLE_MAX_TAIL = 0.08
#: the tail holds at least this many sampled values (a first estimate far out in a
#: heavy tail rests on few of them).
SAMPLE_MIN_TAIL = 2048


class ThresholdMethod(str, Enum):
    """Names of the clipping-threshold rules."""

    OCTAV = "octav"
    OCTAV_PAPER = "octav-paper"
    MAX = "max"
    ACIQ_GAUSS = "aciq-gauss"
    ACIQ_LAPLACE = "aciq-laplace"
    PERCENTILE = "percentile"
    KL = "kl"


def parse_method(method: ThresholdMethod | str) -> ThresholdMethod:
    """Normalize a method name; raise :class:`InvalidInputError` for unknown names."""
    return parse_choice(ThresholdMethod, method, "threshold method")


class AbsStats(NamedTuple):
    """Summary of ``|x|`` from one pass: size, max, mean, mean of squares."""

    n: int
    max: float
    mean: float
    mean_sq: float


def abs_stats(x: np.ndarray, *, where: str = "threshold") -> AbsStats:
    """One pass over flat float32 ``x``; raises :class:`NonFiniteError` on NaN/Inf."""
    n = int(x.size)
    if n == 0:
        return AbsStats(0, 0.0, 0.0, 0.0)
    mx, s1, s2, bad = kernels.abs_stats(x)
    if bad:
        raise NonFiniteError(f"{where}: input holds {bad} NaN/Inf value(s); expected finite values")
    return AbsStats(n, float(mx), s1 / n, s2 / n)


# --------------------------------------------------------------------------- OCTAV


_EDGES = kernels.histogram_edges()
#: the histogram bins of denormals (and zero)
_DENORMAL_BINS = 1 << kernels.HIST_MANTISSA


def _iterations(iterations: int | None) -> int:
    return -1 if iterations is None else int(iterations)


def _octav_exact(x: np.ndarray, c: float, iterations: int | None = None) -> float:
    """OCTAV on sorted ``|x|`` with prefix sums: the exact tail statistics (finite ``x``).

    On a finite sample the rule is a step function of ``s`` and may have no
    exact fixed point: the iteration then ends in a 2-cycle straddling one
    sample value, and the midpoint of the cycle is returned. Any
    ``s >= max|x|`` clips nothing, so there the rule is read as "stay" (this
    makes constant inputs a fixed point at their value).
    """
    a = np.abs(np.asarray(x, dtype=np.float32).reshape(-1).astype(np.float64))
    a.sort()
    return float(kernels.octav_sorted(a, c, _iterations(iterations), OCTAV_TOL, OCTAV_MAX_ITER))


def _nonfinite(where: str, bad: int) -> NonFiniteError:
    return NonFiniteError(f"{where}: input holds {bad} NaN/Inf value(s); expected finite values")


def _octav(x: np.ndarray, c: float, iterations: int | None, where: str) -> float:
    """OCTAV from ``mean |x|``: exact for small inputs, else on a histogram.

    Larger inputs use the log-linear histogram; large ones are iterated to convergence
    on the sampled histogram (:func:`_octav_sampled`).
    """
    if x.size == 0:
        return 0.0
    if x.size > EXACT_LIMIT:
        if iterations is None and x.size >= SUBSAMPLE_MIN:
            got = _octav_sampled(x, c, where)
            if isinstance(got, float):
                return got
            cnt, s1 = got
        else:
            cnt, s1, bad = kernels.abs_histogram(x)
            if bad:
                raise _nonfinite(where, bad)
        if not s1.any():
            return 0.0
        if not s1[:_DENORMAL_BINS].any():  # no denormals: the histogram is exact enough
            return float(
                kernels.octav_histogram(
                    cnt, s1, _EDGES, c, _iterations(iterations), OCTAV_TOL, OCTAV_MAX_ITER
                )
            )
    elif not np.isfinite(x).all():
        raise _nonfinite(where, int(np.count_nonzero(~np.isfinite(x))))
    return _octav_exact(x, c, iterations)


def _octav_sampled(
    x: np.ndarray,
    c: float,
    where: str,
    *,
    blocks: int = SAMPLE_BLOCKS,
    block: int = SAMPLE_BLOCK,
) -> float | tuple[np.ndarray, np.ndarray]:
    """OCTAV (to convergence) on a histogram whose tail is exact and whose bulk is sampled.

    1. A first estimate ``s0`` from the histogram of ``blocks`` blocks of ``block``
       elements (:func:`fedquant.quant.kernels.sample_starts`: a layout fixed by
       the size, no seed).
    2. One pass over the other elements histograms their tail ``|x| >= cut``, with
       ``cut`` the lower edge of the bin of ``SAMPLE_MARGIN * s0``, or lower, so
       that at least ``SAMPLE_MIN_TAIL`` sampled values lie in the tail (the pass
       also counts the non-finite values); the sample's tail is added to it.
    3. The bins below ``cut`` are the sample's, scaled to the number of elements
       the tail leaves there; the fixed point is iterated on that histogram.

    The OCTAV rule at ``s`` reads only the values above ``s``: for every
    ``s >= cut`` this histogram gives the rule of the full one, up to rounding.
    A fixed point found at or above ``cut`` is therefore the full histogram's
    (the sample only moves the starting point, ``mean |x|``, and the iterations
    below ``cut``; denormals below ``cut`` do not matter). It is returned.

    Otherwise the full histogram of ``x`` is returned -- counts and sums, equal to
    :func:`fedquant.quant.kernels.abs_histogram`'s -- for the caller's usual path:
    where the fixed point lies below ``cut`` (a second pass), where the sample is
    all zeros or mostly denormals (``cut`` would not be a normal float), and where
    the tail pass would not pay, more than ``SAMPLE_MAX_TAIL`` of the sample lying
    in the tail; the last two read the elements outside the sample only.
    """
    n = x.size
    starts = kernels.sample_starts(n, blocks, block)
    cnt, s1, bad = kernels.abs_histogram_blocks(x, starts, block)
    cut_bin = 0
    if s1.any():
        s0 = kernels.octav_histogram(cnt, s1, _EDGES, c, -1, OCTAV_TOL, OCTAV_MAX_ITER)
        cut_bin = int(np.searchsorted(_EDGES, SAMPLE_MARGIN * s0, side="right")) - 1
        # a threshold far out in a heavy tail rests on few sampled values: the tail then
        # starts low enough to hold SAMPLE_MIN_TAIL of them
        above = np.cumsum(cnt[::-1])[::-1]
        cut_bin = min(cut_bin, int(np.searchsorted(-above, -SAMPLE_MIN_TAIL, side="right")) - 1)
        if int(above[max(cut_bin, 0)]) > SAMPLE_MAX_TAIL * blocks * block:
            cut_bin = 0
    if cut_bin < _DENORMAL_BINS:  # the full histogram: the rest added to the sample's
        cut_bin = 0
    tc, t1, tbad = kernels.abs_histogram_gaps(
        x, starts, block, np.uint32(cut_bin << (23 - kernels.HIST_MANTISSA))
    )
    if bad + tbad:
        raise _nonfinite(where, bad + tbad)
    tc[cut_bin:] += cnt[cut_bin:]
    t1[cut_bin:] += s1[cut_bin:]
    if cut_bin == 0:  # the sums are exact: the same histogram as abs_histogram(x)
        return tc, t1
    below, below_sample = n - int(tc.sum()), int(cnt[:cut_bin].sum())
    counts = tc.astype(np.float64)
    if below:
        scale = below / max(below_sample, 1)  # > 0: the tail holds < SAMPLE_MAX_TAIL of it
        counts[:cut_bin] = cnt[:cut_bin] * scale
        t1[:cut_bin] = s1[:cut_bin] * scale
    s = float(kernels.octav_histogram(counts, t1, _EDGES, c, -1, OCTAV_TOL, OCTAV_MAX_ITER))
    if s >= _EDGES[cut_bin]:
        return s
    # the fixed point lies below the cut (rare): the rest of the elements, all of them
    tc, t1, _ = kernels.abs_histogram_gaps(x, starts, block, np.uint32(0))
    return tc + cnt, t1 + s1


# --------------------------------------------------------------------------- dispatch


def threshold(
    x: np.ndarray,
    bits: int,
    rounding: Rounding | str = Rounding.NEAREST,
    method: ThresholdMethod | str = ThresholdMethod.OCTAV,
    *,
    percentile: float = 99.99,
) -> float:
    """Clipping threshold ``s`` for the values ``x`` (any shape; flattened).

    Parameters
    ----------
    x : np.ndarray
        Finite values (float32 is used internally; other dtypes are converted).
    bits : int
        Bit width, 1..8.
    rounding : {"nearest", "stochastic"}, default "nearest"
        The rounding the quantizer will use; OCTAV and ACIQ match their noise
        coefficient to it.
    method : str, default "octav"
        One of :class:`ThresholdMethod`.
    percentile : float, default 99.99
        Used by ``method="percentile"`` only.

    Returns
    -------
    float
        ``0 <= s <= max|x|``, rounded to float32 (the precision of the wire format).

    Raises
    ------
    InvalidInputError
        Unknown method/rounding, bits outside 1..8.
    NonFiniteError
        ``x`` holds NaN or Inf.
    """
    bits = check_bits(bits)
    rnd = parse_rounding(rounding)
    m = parse_method(method)
    try:
        flat = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
    except (TypeError, ValueError) as e:
        raise InvalidInputError(
            f"threshold: x is not an array of numbers ({type(x).__name__}: {e})"
        ) from None
    return _threshold_flat(flat, bits, rnd, m, percentile)


def _threshold_flat(
    flat: np.ndarray, bits: int, rnd: Rounding, m: ThresholdMethod, percentile: float
) -> float:
    where = f"threshold(method={m.value!r})"
    if m is ThresholdMethod.OCTAV:
        s = _octav(flat, noise_coefficient(bits, rnd), None, where)
    elif m is ThresholdMethod.OCTAV_PAPER:
        s = _octav(flat, paper_coefficient(bits), PAPER_ITERATIONS, where)
    else:
        st = abs_stats(flat, where=where)
        if st.n == 0 or st.max == 0.0:
            return 0.0
        if m is ThresholdMethod.MAX:
            s = st.max
        elif m is ThresholdMethod.ACIQ_GAUSS:
            s = calibration.aciq_threshold(flat, bits, rnd.value, "gauss")
        elif m is ThresholdMethod.ACIQ_LAPLACE:
            s = calibration.aciq_threshold(flat, bits, rnd.value, "laplace")
        elif m is ThresholdMethod.PERCENTILE:
            s = calibration.percentile_threshold(flat, percentile)
        else:
            s = calibration.kl_threshold(flat, bits)
        s = min(s, st.max)
    return _as_float32(s)


def _as_float32(s: float) -> float:
    """Round a threshold to float32, never upwards past the float32 range."""
    f = np.float32(s)
    if not np.isfinite(f):
        f = np.finfo(np.float32).max
    return float(f)


def channel_thresholds(
    x: np.ndarray,
    bits: int,
    rounding: Rounding | str = Rounding.NEAREST,
    method: ThresholdMethod | str = ThresholdMethod.OCTAV,
    *,
    percentile: float = 99.99,
) -> np.ndarray:
    """One threshold per output channel (row of ``x.reshape(x.shape[0], -1)``), float32."""
    bits = check_bits(bits)
    rnd = parse_rounding(rounding)
    m = parse_method(method)
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    rows = np.ascontiguousarray(arr.reshape(arr.shape[0], -1))
    out = np.empty(rows.shape[0], dtype=np.float32)
    for r in range(rows.shape[0]):
        out[r] = _threshold_flat(rows[r], bits, rnd, m, percentile)
    return out
