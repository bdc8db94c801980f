"""Clipping-threshold rules other than OCTAV: ACIQ, percentile and KL (entropy) calibration.

Each rule maps a tensor to the clipping threshold ``s`` of the uniform grid of
:mod:`fedquant.quant.grid` (``2**B`` levels, end levels at ``-s`` and ``+s``).
They are the baselines the paper's OCTAV rule is compared with:

* :func:`aciq_threshold` -- Banner, Nahshan & Soudry, "Post-training 4-bit
  quantization of convolutional networks for rapid deployment" (ACIQ),
  NeurIPS 2019: fit a Gaussian or Laplace prior and take the threshold that
  minimizes that prior's analytic clipping + quantization noise.
* :func:`percentile_threshold` -- a fixed percentile of ``|a|``.
* :func:`kl_threshold` -- Migacz, "8-bit inference with TensorRT", GTC 2017:
  the threshold whose quantized histogram is closest in KL divergence to the
  clipped histogram of ``|a|``.

All three are pure functions of ``a``, a 1-D array of finite float32 values
(the caller has validated and flattened it). They compute in float64, so
denormal (``~1e-40``) and huge (``~1e38``) inputs neither underflow nor
overflow, and they return a Python ``float`` ``s`` with
``0 <= s <= max|a|``: a threshold above ``max|a|`` only coarsens the grid
without clipping anything less, so every rule is clamped to ``max|a|``.
``s == 0`` exactly when every value is 0 (or ``a`` is empty).

Examples
--------
>>> import numpy as np
>>> a = np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
>>> round(aciq_threshold(a, 4, "nearest", "gauss"), 1)    # s ~ 2.5 sigma
2.5
>>> round(percentile_threshold(a, 99.0), 2)                # ~ 2.576 for N(0, 1)
2.58
>>> 0.0 < kl_threshold(a, 4) <= float(np.abs(a).max())
True
"""

from __future__ import annotations

import math
import numbers
from functools import lru_cache
from typing import Literal

import numba
import numpy as np
import numpy.typing as npt

from fedquant.errors import InvalidInputError
from fedquant.quant.grid import Rounding, check_bits, noise_coefficient, parse_rounding

__all__ = ["aciq_threshold", "kl_threshold", "percentile_threshold"]

Prior = Literal["gauss", "laplace"]
_PRIORS: tuple[str, ...] = ("gauss", "laplace")

#: Search interval for the optimal multiplier ``alpha* = s / scale``, in units
#: of the prior's scale. At 8 bits alpha* is about 3.9 (Gaussian) and 9.9
#: (Laplace); the bounds leave a wide margin and the search checks it.
_ALPHA_MAX: dict[str, float] = {"gauss": 16.0, "laplace": 64.0}
_SCAN_POINTS = 1601
_GOLDEN_TOL = 1e-12

#: Largest ``num_bins`` :func:`kl_threshold` accepts: the candidate search costs
#: about ``num_bins**2 / 2`` additions, 2e9 at this bound.
_MAX_KL_BINS = 1 << 16


# --------------------------------------------------------------------------- helpers


def _as_f32(a: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """View ``a`` as a 1-D contiguous float32 array (no copy if it already is one)."""
    return np.ascontiguousarray(a, dtype=np.float32).reshape(-1)


@numba.njit(cache=True, nogil=True)
def _abs_stats(a: npt.NDArray[np.float32]) -> tuple[float, float, float]:  # pragma: no cover
    """One pass over ``a``: ``(max|a|, sum|a|, sum a**2)``, accumulated in float64."""
    mx = 0.0
    s1 = 0.0
    s2 = 0.0
    for k in range(a.size):
        v = abs(np.float64(a[k]))
        if v > mx:
            mx = v
        s1 += v
        s2 += v * v
    return mx, s1, s2


def _check_prior(prior: str) -> str:
    if isinstance(prior, str) and prior in _PRIORS:
        return prior
    allowed = ", ".join(repr(p) for p in _PRIORS)
    raise InvalidInputError(f"prior={prior!r} is unknown; expected one of: {allowed}")


# --------------------------------------------------------------------------- ACIQ


def _gauss_mse(alpha: float, c: float, in_range_prob: bool) -> float:
    """Expected clipping + quantization noise of a unit Gaussian at threshold ``alpha``."""
    tail = math.erfc(alpha / math.sqrt(2.0))  # P(|X| > alpha)
    pdf = math.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
    clip = (1.0 + alpha * alpha) * tail - 2.0 * alpha * pdf
    inside = (1.0 - tail) if in_range_prob else 1.0
    return clip + c * alpha * alpha * inside


def _laplace_mse(alpha: float, c: float, in_range_prob: bool) -> float:
    """Expected clipping + quantization noise of a unit Laplace (b = 1) at threshold ``alpha``."""
    tail = math.exp(-alpha)  # P(|X| > alpha)
    clip = 2.0 * tail
    inside = (1.0 - tail) if in_range_prob else 1.0
    return clip + c * alpha * alpha * inside


@lru_cache(maxsize=256)
def _optimal_multiplier(prior: str, c: float, in_range_prob: bool = True) -> float:
    """``alpha*`` minimizing the prior's analytic MSE for in-range coefficient ``c``.

    Parameters
    ----------
    prior : {"gauss", "laplace"}
        The unit-scale prior (sigma = 1, resp. b = 1).
    c : float
        In-range noise variance divided by ``s**2`` (``noise_coefficient``).
    in_range_prob : bool, default True
        Weight the quantization noise by ``P(|X| <= s)`` (only values that are
        not clipped are rounded). ``False`` drops the factor, as Banner et al.
        do; their published multipliers are reproduced with ``False`` and
        ``c = 4**-B / 3``.

    Returns
    -------
    float
        The minimizer, found by a scan of ``_SCAN_POINTS`` points over
        ``[0, _ALPHA_MAX[prior]]`` followed by golden-section search in the
        bracket around the best scan point (plain Python; no SciPy).
    """
    f = _gauss_mse if prior == "gauss" else _laplace_mse
    hi = _ALPHA_MAX[prior]
    step = hi / (_SCAN_POINTS - 1)
    values = [f(k * step, c, in_range_prob) for k in range(_SCAN_POINTS)]
    best = min(range(_SCAN_POINTS), key=values.__getitem__)
    if best == _SCAN_POINTS - 1:  # pragma: no cover - guarded by the bounds above
        raise RuntimeError(f"ACIQ search for prior={prior!r}, c={c!r} hit its upper bound {hi}")
    lo, up = max(best - 1, 0) * step, (best + 1) * step
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    x1, x2 = up - inv_phi * (up - lo), lo + inv_phi * (up - lo)
    f1, f2 = f(x1, c, in_range_prob), f(x2, c, in_range_prob)
    while up - lo > _GOLDEN_TOL:
        if f1 <= f2:
            up, x2, f2 = x2, x1, f1
            x1 = up - inv_phi * (up - lo)
            f1 = f(x1, c, in_range_prob)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + inv_phi * (up - lo)
            f2 = f(x2, c, in_range_prob)
    return 0.5 * (lo + up)


@lru_cache(maxsize=64)
def _aciq_multiplier(prior: str, bits: int, rounding: Rounding) -> float:
    """``alpha*(prior, B, rounding)`` for fedquant's grid (cached)."""
    return _optimal_multiplier(prior, noise_coefficient(bits, rounding))


def aciq_threshold(
    a: npt.ArrayLike,
    bits: int,
    rounding: Rounding | str,
    prior: Prior,
) -> float:
    r"""Analytical clipping (ACIQ) threshold for a Gaussian or Laplace prior.

    Banner, Nahshan & Soudry, "Post-training 4-bit quantization of
    convolutional networks for rapid deployment", NeurIPS 2019. The prior's
    scale is fitted to ``a`` and ``s = alpha*(prior, B, rounding) * scale``,
    where ``alpha*`` minimizes the prior's expected quantization MSE

    .. math::

        \mathrm{MSE}(s) = E[(|X| - s)^2 \, 1\{|X| > s\}]
                          + c \, s^2 \, P(|X| \le s),

    with ``c = noise_coefficient(bits, rounding)`` -- the in-range noise of
    *this* grid and rounding (``1/(3 L**2)`` nearest, ``2/(3 L**2)``
    stochastic, ``L = 2**B - 1``), not Banner's ``4**-B / 3`` of the midrise
    grid. Unlike Banner, the rounding noise is weighted by ``P(|X| <= s)``:
    clipped values land exactly on an end level and are not rounded.

    Parameters
    ----------
    a : array_like of float32
        1-D array of finite values (already validated and flattened).
    bits : int
        Bit width ``B``, 1..8.
    rounding : Rounding or {"nearest", "stochastic"}
        Rounding mode of the quantizer the threshold is for.
    prior : {"gauss", "laplace"}
        Distribution assumed for the values, both centred at 0 (fedquant's
        grid is symmetric about 0, so the location is not fitted):

        * ``"gauss"``: ``sigma = sqrt(mean(a**2))``, the maximum-likelihood
          scale of ``N(0, sigma**2)`` (the RMS, not the standard deviation
          about the mean).
        * ``"laplace"``: ``b = mean(|a|)``, the maximum-likelihood scale of
          ``Laplace(0, b)``.

    Returns
    -------
    float
        ``min(alpha* * scale, max|a|)``; 0.0 when all values are 0.

    Raises
    ------
    InvalidInputError
        If ``bits`` is not in 1..8, ``rounding`` or ``prior`` is unknown.

    Notes
    -----
    Clipping term, derived for unit scale (``s`` in units of sigma or b); by
    symmetry it is twice the one-sided integral.

    *Gaussian* (``phi`` the standard normal pdf, ``Q(s) = erfc(s/sqrt 2)/2``
    its upper tail). With ``phi'(x) = -x phi(x)``,
    ``int_s^inf phi = Q(s)``, ``int_s^inf x phi = phi(s)`` and
    ``int_s^inf x**2 phi = s phi(s) + Q(s)`` (by parts), so::

        int_s^inf (x - s)**2 phi(x) dx = (1 + s**2) Q(s) - s phi(s)
        E[(|X| - s)**2 1{|X| > s}]    = (1 + s**2) erfc(s / sqrt 2) - 2 s phi(s)
        P(|X| <= s)                    = 1 - erfc(s / sqrt 2)

    This is Banner et al.'s eq. for the Gaussian clipping noise.

    *Laplace* (density ``exp(-|x|) / 2``). Substituting ``u = x - s``::

        2 int_s^inf (x - s)**2 exp(-x) / 2 dx = exp(-s) int_0^inf u**2 exp(-u) du
                                             = 2 exp(-s)

    i.e. ``2 b**2 exp(-s/b)`` at scale ``b``, and ``P(|X| <= s) = 1 - exp(-s)``.

    ``alpha*`` is found numerically (scan + golden section, plain Python) and
    cached per ``(prior, bits, rounding)``. With Banner's coefficient
    ``4**-M/3`` and without the ``P(|X| <= s)`` factor the same code gives
    Banner's published multipliers, 1.71 / 2.15 / 2.56 / 2.94 sigma and
    2.83 / 3.90 / 5.03 / 6.20 b for M = 2, 3, 4, 5 bits. For this grid and
    nearest rounding it gives 0.83 / 1.50 / 2.51 / 3.92 sigma and
    1.13 / 2.40 / 4.91 / 9.89 b at B = 1, 2, 4, 8 (stochastic rounding:
    0.66 / 1.27 / 2.31 / 3.77 sigma, 0.85 / 1.94 / 4.34 / 9.26 b).
    """
    bits = check_bits(bits)
    mode = parse_rounding(rounding)
    prior_name = _check_prior(prior)
    x = _as_f32(a)
    if x.size == 0:
        return 0.0
    max_abs, sum_abs, sum_sq = _abs_stats(x)
    if max_abs == 0.0:
        return 0.0
    if prior_name == "gauss":
        # sqrt(sum_sq / n) may underflow to 0 when every value is a tiny denormal;
        # scale by max_abs first, which keeps the ratio in [1/sqrt(n), 1].
        scale = max_abs * math.sqrt((sum_sq / (max_abs * max_abs)) / x.size)
    else:
        scale = sum_abs / x.size
    s = _aciq_multiplier(prior_name, bits, mode) * scale
    return float(min(s, max_abs))


# --------------------------------------------------------------------------- percentile


def percentile_threshold(a: npt.ArrayLike, percentile: float = 99.99) -> float:
    """The ``percentile``-th percentile of ``|a|``, as a clipping threshold.

    Uses NumPy's default ``method="linear"`` definition: with the ``n`` values
    of ``|a|`` sorted as ``v[0] <= ... <= v[n-1]`` and
    ``pos = percentile / 100 * (n - 1)``, the result is
    ``v[floor(pos)] + (pos - floor(pos)) * (v[floor(pos) + 1] - v[floor(pos)])``,
    equal to ``np.percentile(np.abs(a), percentile)``. The two order statistics
    are selected with :func:`numpy.partition` (O(n), no full sort).

    Parameters
    ----------
    a : array_like of float32
        1-D array of finite values (already validated and flattened).
    percentile : float, default 99.99
        In ``(0, 100]``; 100 gives ``max|a|``.

    Returns
    -------
    float
        The percentile (always ``<= max|a|``); 0.0 for an empty or all-zero ``a``.

    Raises
    ------
    InvalidInputError
        If ``percentile`` is not a real number in ``(0, 100]``.
    """
    ok = isinstance(percentile, numbers.Real) and not isinstance(percentile, bool)
    if not ok or not (0.0 < float(percentile) <= 100.0):
        raise InvalidInputError(
            f"percentile={percentile!r} is out of range; expected a number in (0, 100]"
        )
    x = _as_f32(a)
    n = x.size
    if n == 0:
        return 0.0
    pos = (float(percentile) / 100.0) * (n - 1)
    lo = min(math.floor(pos), n - 1)
    hi = min(lo + 1, n - 1)
    part = np.partition(np.abs(x), [lo, hi] if hi != lo else lo)
    v_lo, v_hi = float(part[lo]), float(part[hi])
    t = pos - lo
    return float(min(v_lo + t * (v_hi - v_lo), v_hi))


# --------------------------------------------------------------------------- KL (TensorRT)


@numba.njit(cache=True, nogil=True)
def _abs_histogram(
    a: npt.NDArray[np.float32], max_abs: float, num_bins: int
) -> npt.NDArray[np.int64]:  # pragma: no cover
    """Histogram of ``|a|`` with ``num_bins`` equal bins over ``[0, max_abs]`` (max in the last)."""
    hist = np.zeros(num_bins, dtype=np.int64)
    scale = num_bins / max_abs
    for k in range(a.size):
        idx = int(abs(np.float64(a[k])) * scale)
        if idx >= num_bins:
            idx = num_bins - 1
        hist[idx] += 1
    return hist


@numba.njit(cache=True, nogil=True)
def _kl_divergences(
    hist: npt.NDArray[np.int64], nlevels: int
) -> npt.NDArray[np.float64]:  # pragma: no cover
    """``out[i] = KL(P_i || Q_i)`` for ``i = nlevels .. num_bins``; ``inf`` elsewhere.

    ``P_i`` is ``hist[:i]`` with the mass of ``hist[i:]`` added to bin ``i-1``;
    ``Q_i`` merges ``hist[:i]`` into ``nlevels`` groups of ``i // nlevels`` bins
    (the last group takes the remainder) and spreads each group's mass evenly
    over the group's bins where ``P_i > 0``. Both are normalized to sum 1.
    ``inf`` marks a candidate where ``P_i > 0`` but ``Q_i = 0`` somewhere.
    """
    nb = hist.size
    h = hist.astype(np.float64)
    plogp = np.zeros(nb)
    for k in range(nb):
        if h[k] > 0.0:
            plogp[k] = h[k] * np.log(h[k])
    suffix = np.zeros(nb + 1)
    for k in range(nb - 1, -1, -1):
        suffix[k] = suffix[k + 1] + h[k]
    total = suffix[0]
    out = np.full(nb + 1, np.inf)
    for i in range(nlevels, nb + 1):
        outliers = suffix[i]
        kept = total - outliers  # mass of hist[:i], the unnormalized sum of Q
        if kept <= 0.0:
            continue
        width = i // nlevels
        acc = 0.0  # sum over bins with P > 0 of P * log(P / Q), unnormalized
        valid = True
        for j in range(nlevels):
            start = j * width
            stop = start + width if j < nlevels - 1 else i
            if j == nlevels - 1:
                stop -= 1  # bin i-1 carries the outliers; handled below
            g = 0.0  # Q's group mass
            nnz = 0
            spl = 0.0  # sum P log P over the group
            for k in range(start, stop):
                if h[k] > 0.0:
                    g += h[k]
                    nnz += 1
                    spl += plogp[k]
            mass = g  # P's group mass
            if j == nlevels - 1:
                p_last = h[i - 1] + outliers
                g += h[i - 1]
                if p_last > 0.0:
                    nnz += 1
                    spl += p_last * np.log(p_last)
                    mass += p_last
            if mass == 0.0:
                continue
            if g == 0.0:
                valid = False
                break
            acc += spl - mass * np.log(g / nnz)
        if valid:
            # KL = sum (P/total) log((P/total) / (Q/kept)) = acc/total + log(kept/total)
            out[i] = acc / total + np.log(kept / total)
    return out


def kl_threshold(a: npt.ArrayLike, bits: int, *, num_bins: int = 2048) -> float:
    """TensorRT-style entropy (KL divergence) calibration of the clipping threshold.

    Migacz, "8-bit inference with TensorRT", GTC 2017. A histogram of ``|a|``
    with ``num_bins`` equal bins of width ``w = max|a| / num_bins`` is built in
    one pass. For each candidate ``i = nlevels, ..., num_bins``:

    1. the reference ``P`` is the first ``i`` bins, with the mass of all bins
       from ``i`` on (the values the candidate would clip) added to bin ``i-1``;
    2. the candidate ``Q`` quantizes the first ``i`` bins *of the histogram*
       (without the clipped mass, as in Migacz's slides and MXNet's
       ``_get_optimal_threshold``) into ``nlevels = 2**(B-1)`` groups of
       ``i // nlevels`` bins (the last group also takes the ``i % nlevels``
       left-over bins), then expands each group back by spreading its mass
       uniformly over the group's bins where ``P`` is non-empty;
    3. ``P`` and ``Q`` are normalized and ``KL(P || Q) = sum P log(P / Q)``
       is taken over the bins where ``P > 0``.

    ``nlevels`` is the number of levels on the positive half of fedquant's
    symmetric ``2**B``-level grid (1 for ``B = 1``, 128 for ``B = 8``, as in
    TensorRT's 128 bins). The ``i`` with the smallest divergence wins (ties:
    the smallest ``i``) and ``s = (i + 0.5) * w``, the threshold formula of
    Migacz's slides, clamped to ``max|a|``. (MXNet uses the bin's upper edge
    ``i * w``; the two differ by half a bin, ``max|a| / 4096`` at the default.)

    Zero bins: wherever ``P = 0`` so is ``Q``, and those bins add nothing. If a
    candidate has ``P > 0`` but ``Q = 0`` in some bin -- clipped mass in bin
    ``i-1`` of a group whose histogram bins are all empty -- its divergence is
    infinite and it is skipped. TensorRT/MXNet instead smooth both
    distributions with ``eps = 1e-4``, which makes such a candidate's
    divergence finite but large; with that smoothing it is still never chosen
    in practice. The last candidate, ``i = num_bins``, clips nothing and is
    always finite, so constant or single-element inputs get ``s = max|a|``.

    At ``B = 1`` the rule degenerates: with one group ``Q`` is flat, and the
    candidate ``i = 1`` (a single bin) has ``P = Q`` and divergence 0, so the
    result is always ``1.5 * w``. KL calibration carries no information at one
    bit; use :func:`aciq_threshold` or OCTAV there.

    Parameters
    ----------
    a, bits
        As for :func:`aciq_threshold`.
    num_bins : int, default 2048
        Histogram bins, ``2**(B-1)`` to 65536. The search costs about
        ``num_bins**2 / 2`` additions (a few ms at 2048).

    Returns
    -------
    float
        The threshold, in ``(0, max|a|]``; 0.0 for an empty or all-zero ``a``.

    Raises
    ------
    InvalidInputError
        If ``bits`` is not in 1..8 or ``num_bins`` is out of range.
    """
    bits = check_bits(bits)
    nlevels = 1 << (bits - 1)
    ok = isinstance(num_bins, numbers.Integral) and not isinstance(num_bins, bool)
    if not ok or not (nlevels <= int(num_bins) <= _MAX_KL_BINS):
        raise InvalidInputError(
            f"num_bins={num_bins!r} is out of range for bits={bits}; "
            f"expected an integer in {nlevels}..{_MAX_KL_BINS} (at least 2**(bits-1))"
        )
    nbins = int(num_bins)
    x = _as_f32(a)
    if x.size == 0:
        return 0.0
    max_abs = max(float(x.max()), -float(x.min()))
    if max_abs == 0.0:
        return 0.0
    hist = _abs_histogram(x, max_abs, nbins)
    divergences = _kl_divergences(hist, nlevels)
    best = int(np.argmin(divergences))  # first minimum: ties go to the smallest i
    s = (best + 0.5) * (max_abs / nbins)
    return float(min(s, max_abs))
