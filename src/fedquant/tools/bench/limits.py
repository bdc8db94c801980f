"""What no quantizer of a given kind can beat: closed forms and exact searches.

Every figure here is recomputed, none is pasted (``../shared/ANCHORS.md``
lists the values to expect; the tests compare).

* :func:`quantizer_mse` -- the exact MSE of a symmetric scalar quantizer with
  given levels on a :class:`~fedquant.tools.bench.sources.Density` (or on a data
  sample, :class:`EmpiricalDensity`), for nearest or stochastic rounding.
  Values beyond the end levels are clipped to them. With nearest rounding a
  value goes to the closest level; with stochastic rounding a value between
  neighbours ``lo < x < hi`` goes to ``hi`` with probability ``(x-lo)/(hi-lo)``,
  which adds the variance ``(x - lo)(hi - x)``.
* :func:`best_uniform` -- the best uniform quantizer: the clipping threshold
  that minimizes :func:`quantizer_mse` on a grid (fedquant's end-point grid,
  or the midrise grid of the OCTAV paper), found by a scan then golden-section
  search. For nearest rounding both grids give the same optimum (they are the
  same family of level sets, parametrized differently; Max, 1960).
* :func:`octav_threshold` -- OCTAV's fixed point (Sakr et al., ICML 2022) on
  the density itself: ``s <- E[|x| 1{|x|>s}] / (c P(|x|<=s) + P(|x|>s))``.
* :func:`lloyd_max` -- the optimal non-uniform fixed-rate quantizer (Lloyd,
  1957/1982; Max, 1960) by Lloyd's iterations on the density;
  :func:`kmeans_1d` does the same on a data sample without assuming symmetry.
* :func:`rate_distortion` -- Shannon's bound: ``D(R) = 4**-R`` for a unit
  Gaussian, and the Shannon lower bound ``exp(2 h) / (2 pi e) * 4**-R`` for
  the other sources (tight at high rate; ``h`` is the differential entropy).
  The Gaussian ``4**-R`` is *not* a lower bound for non-Gaussian sources.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedquant.errors import InvalidInputError
from fedquant.quant.grid import Rounding, check_bits, parse_rounding
from fedquant.tools.bench.sources import Density, Gaussian, Laplace, StudentT3

Grid = Literal["endpoint", "midrise"]
GRIDS: tuple[str, ...] = ("endpoint", "midrise")


class EmpiricalDensity(Density):
    """The symmetrized empirical distribution of a sample (half its mass at ``+a_i``, half at ``-a_i``).

    A symmetric quantizer's error at ``x`` and ``-x`` is the same, so its
    exact expected MSE on the sample equals :func:`quantizer_mse` on this
    density. Tail moments come from the sorted ``|a|`` and prefix sums, so a
    whole quantizer is evaluated in ``O(levels * log n)``.
    """

    name = "empirical"
    label = "sample"

    def __init__(self, a: np.ndarray) -> None:
        self.abs = np.sort(np.abs(np.asarray(a, dtype=np.float64).reshape(-1)))
        if self.abs.size == 0:
            raise InvalidInputError("EmpiricalDensity: the sample is empty")
        self.n = self.abs.size
        zero = np.zeros(1)
        self.c0 = np.arange(self.n + 1, dtype=np.float64)
        self.c1 = np.concatenate((zero, np.cumsum(self.abs)))
        self.c2 = np.concatenate((zero, np.cumsum(self.abs * self.abs)))
        self.variance = float(np.var(np.asarray(a, dtype=np.float64)))
        self.mean_sq = float(self.c2[-1] / self.n)

    def pdf(self, x: np.ndarray) -> np.ndarray:  # pragma: no cover - not meaningful
        raise NotImplementedError("an empirical distribution has no density")

    def tail_moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = np.searchsorted(self.abs, np.asarray(x, dtype=np.float64), side="right")
        h = 0.5 / self.n
        return (
            h * (self.c0[-1] - self.c0[k]),
            h * (self.c1[-1] - self.c1[k]),
            h * (self.c2[-1] - self.c2[k]),
        )

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError("resample the data directly")


# --------------------------------------------------------------------------- grids


def endpoint_levels(s: float, bits: int) -> np.ndarray:
    """fedquant's grid (:mod:`fedquant.quant.grid`): ``2**B`` levels from ``-s`` to ``s``."""
    steps = (1 << check_bits(bits)) - 1
    return -s + np.arange(steps + 1, dtype=np.float64) * (2.0 * s / steps)


def midrise_levels(s: float, bits: int) -> np.ndarray:
    """The midrise grid of the OCTAV paper: ``2**B`` cells of width ``2s/2**B`` covering
    ``[-s, s]``, each represented by its centre (end levels at ``+-(s - step/2)``)."""
    cells = 1 << check_bits(bits)
    return -s + (np.arange(cells, dtype=np.float64) + 0.5) * (2.0 * s / cells)


def grid_levels(s: float, bits: int, grid: Grid | str) -> np.ndarray:
    """Levels of ``grid`` ("endpoint" or "midrise") for threshold ``s``."""
    if grid == "endpoint":
        return endpoint_levels(s, bits)
    if grid == "midrise":
        return midrise_levels(s, bits)
    raise InvalidInputError(f"grid={grid!r} is unknown; expected one of: {', '.join(GRIDS)}")


# --------------------------------------------------------------------------- exact MSE


def quantizer_mse(density: Density, levels: np.ndarray, rounding: Rounding | str) -> float:
    """Exact MSE of the symmetric quantizer with sorted ``levels`` on ``density``.

    Computed on ``x >= 0`` and doubled. Each piece of the error is a quadratic
    in ``x`` on an interval, integrated exactly from the interval's mass and
    first two moments:

    * nearest, level ``l`` on ``[a, b]``: ``M2 - 2 l M1 + l**2 M0``;
    * stochastic between ``lo`` and ``hi``: ``-M2 + (lo + hi) M1 - lo hi M0``;
    * beyond the top level ``L`` (clipping): ``G2(L) - 2 L G1(L) + L**2 G0(L)``.
    """
    rnd = parse_rounding(rounding)
    lv = np.asarray(levels, dtype=np.float64)
    if lv.size < 2 or not np.allclose(lv, -lv[::-1], rtol=1e-12, atol=1e-300):
        raise InvalidInputError("quantizer_mse: levels must be sorted and symmetric about 0")
    pos = lv[lv > 0]
    if pos.size == 0:  # all levels at 0: the error is the second moment
        return float(2.0 * density.tail_moments(np.zeros(1))[2][0])
    has_zero = bool(np.any(lv == 0))
    top = pos[-1]
    g0, g1, g2 = (float(v[0]) for v in density.tail_moments(np.array([top])))
    clip = g2 - 2.0 * top * g1 + top * top * g0
    if rnd is Rounding.NEAREST:
        reps = np.concatenate(([0.0], pos)) if has_zero else pos
        edges = np.concatenate(([0.0], 0.5 * (reps[:-1] + reps[1:]), [np.inf]))
        m0, m1, m2 = density.interval_moments(edges[:-1], edges[1:])
        # the last cell's part above `top` is in the same formula; no separate clip term
        inner = m2 - 2.0 * reps * m1 + reps * reps * m0
        return float(2.0 * np.sum(inner))
    lo = np.concatenate(([0.0], pos[:-1])) if has_zero else np.concatenate(([-pos[0]], pos[:-1]))
    a = np.concatenate(([0.0], pos[:-1]))
    m0, m1, m2 = density.interval_moments(a, pos)
    inner = -m2 + (lo + pos) * m1 - lo * pos * m0
    return float(2.0 * (np.sum(inner) + clip))


def uniform_mse(
    density: Density, s: float, bits: int, rounding: Rounding | str, grid: Grid | str = "endpoint"
) -> float:
    """Exact MSE of the uniform ``bits``-bit quantizer with threshold ``s`` on ``grid``."""
    if s <= 0:
        return quantizer_mse(density, np.zeros(2), rounding)
    return quantizer_mse(density, grid_levels(s, bits, grid), rounding)


@dataclass(frozen=True)
class Optimum:
    """A threshold (or level set) and the MSE it achieves."""

    s: float
    mse: float


def _golden(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10) -> Optimum:
    """Golden-section minimum of a unimodal ``f`` on ``[lo, hi]``."""
    g = (math.sqrt(5.0) - 1.0) / 2.0
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol * max(abs(a), abs(b), 1e-300):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    s = 0.5 * (a + b)
    return Optimum(s, f(s))


def minimize_threshold(
    f: Callable[[float], float], lo: float, hi: float, points: int = 240
) -> Optimum:
    """Minimum of ``f(s)`` over ``[lo, hi]``: a geometric scan, then golden section
    between the neighbours of the best scan point (guards against local minima
    that a bare golden search could fall into)."""
    grid = np.geomspace(lo, hi, points)
    vals = np.array([f(float(s)) for s in grid])
    k = int(np.argmin(vals))
    a = float(grid[max(k - 1, 0)])
    b = float(grid[min(k + 1, points - 1)])
    best = _golden(f, a, b)
    if vals[k] < best.mse:  # flat or step-like objective (samples): keep the scan point
        return Optimum(float(grid[k]), float(vals[k]))
    return best


def best_uniform(
    density: Density, bits: int, rounding: Rounding | str, grid: Grid | str = "endpoint"
) -> Optimum:
    """The best uniform quantizer: ``min over s`` of :func:`uniform_mse`.

    The search spans ``[1e-3, 200] x sqrt(E x**2)`` (for a sample, up to its
    largest ``|x|``), wide enough for 8 bits on Student-t(3).
    """
    bits = check_bits(bits)
    rnd = parse_rounding(rounding)
    if isinstance(density, EmpiricalDensity):
        hi = float(density.abs[-1])
        if hi == 0.0:
            return Optimum(0.0, 0.0)
        lo = hi * 1e-4
    else:
        lo, hi = 1e-3, 200.0
    return minimize_threshold(lambda s: uniform_mse(density, s, bits, rnd, grid), lo, hi)


# --------------------------------------------------------------------------- OCTAV


def octav_threshold(
    density: Density, c: float, *, iterations: int | None = None, tol: float = 1e-13
) -> float:
    """OCTAV's fixed point on ``density``, from ``s = E|x|``.

    ``iterations=None`` iterates to convergence (relative change below ``tol``,
    at most 10,000 steps); an int runs exactly that many steps (the paper: 10).
    """
    s = density.mean_abs()
    steps = 10_000 if iterations is None else iterations
    for _ in range(steps):
        g0, g1, _ = (float(v[0]) for v in density.tail_moments(np.array([s])))
        if g0 <= 0.0 or g1 <= 0.0:
            return s
        new = 2.0 * g1 / (c * (1.0 - 2.0 * g0) + 2.0 * g0)
        if iterations is None and abs(new - s) <= tol * s:
            return new
        s = new
    return s


# --------------------------------------------------------------------------- Lloyd-Max


@dataclass(frozen=True)
class LloydMax:
    """Levels of a Lloyd-Max quantizer, its MSE and the iterations it took."""

    levels: np.ndarray
    mse: float
    iterations: int


def _compander_levels(density: Density, m: int) -> np.ndarray:
    """Positive levels of the high-rate optimal compander (point density ``f**(1/3)``;
    Panter & Dite, 1951), by numerical integration: a starting point within
    about 1 % of the Lloyd-Max MSE."""
    x = np.concatenate((np.linspace(0.0, 8.0, 40_001)[:-1], np.geomspace(8.0, 1e7, 40_001)))
    g = density.pdf(x) ** (1.0 / 3.0)
    cum = np.concatenate(([0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(x))))
    return np.interp((np.arange(m) + 0.5) / m * cum[-1], cum, x)


def lloyd_max(
    density: Density, bits: int, *, rtol: float = 1e-7, max_iter: int = 200_000
) -> LloydMax:
    """Symmetric Lloyd-Max quantizer of ``2**bits`` levels by Lloyd's iterations.

    Starts from the Panter-Dite compander and alternates the two optimality
    conditions -- thresholds at midpoints, levels at centroids. Lloyd's
    iteration converges linearly and slowly at 8 bits (tens of thousands of
    steps), so it stops when the remaining decrease of the MSE, extrapolated
    from the last two blocks of 50 steps as a geometric series, is below
    ``rtol`` of the MSE. For log-concave densities (Gaussian, Laplace) the
    optimum is unique (Fleischer, 1964), so this is *the* Lloyd-Max quantizer.
    """
    bits = check_bits(bits)
    m = 1 << (bits - 1)  # levels on the positive side
    pos = _compander_levels(density, m)

    def mse_of(p: np.ndarray) -> float:
        return quantizer_mse(density, np.concatenate((-p[::-1], p)), "nearest")

    mse = mse_of(pos)
    drops: list[float] = []
    it = 0
    while it < max_iter:
        for _ in range(50):
            edges = np.concatenate(([0.0], 0.5 * (pos[:-1] + pos[1:]), [np.inf]))
            m0, m1, _ = density.interval_moments(edges[:-1], edges[1:])
            ok = m0 > 0
            pos = np.where(ok, m1 / np.where(ok, m0, 1.0), pos)
            it += 1
        new = mse_of(pos)
        drops.append(mse - new)
        mse = new
        if drops[-1] <= 0.0:
            break
        if len(drops) >= 2 and drops[-1] < drops[-2]:
            r = drops[-1] / drops[-2]
            if drops[-1] * r / (1.0 - r) <= rtol * mse:
                break
    return LloydMax(np.concatenate((-pos[::-1], pos)), mse, it)


def kmeans_1d(a: np.ndarray, bits: int, *, max_iter: int = 2_000) -> LloydMax:
    """Lloyd's algorithm on a sample (1-D k-means), ``2**bits`` levels, no symmetry assumed.

    Lloyd's iterations never increase the MSE but can stop in a local optimum,
    so two starts are run and the better result kept: the sample's quantiles,
    and the levels of the best uniform quantizer -- which makes the result never
    worse than :func:`best_uniform`, as a limit must be. Each step costs
    ``O(levels * log n)`` thanks to prefix sums over the sorted sample. Returns
    the empirical MSE.
    """
    bits = check_bits(bits)
    x = np.sort(np.asarray(a, dtype=np.float64).reshape(-1))
    n = x.size
    k = 1 << bits
    if n == 0:
        raise InvalidInputError("kmeans_1d: the sample is empty")
    uniq = np.unique(x)
    if uniq.size <= k:  # every distinct value gets its own level
        return LloydMax(uniq, 0.0, 0)
    zero = np.zeros(1)
    c0 = np.arange(n + 1, dtype=np.float64)
    c1 = np.concatenate((zero, np.cumsum(x)))
    c2 = np.concatenate((zero, np.cumsum(x * x)))

    def cells(lv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.concatenate(([0], np.searchsorted(x, 0.5 * (lv[:-1] + lv[1:])), [n]))
        return np.diff(c0[idx]), np.diff(c1[idx]), np.diff(c2[idx])

    def lloyd(levels: np.ndarray) -> LloydMax:
        it = 0
        for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
            m0, m1, _ = cells(levels)
            new = np.sort(np.where(m0 > 0, m1 / np.where(m0 > 0, m0, 1.0), levels))
            if np.array_equal(new, levels):
                break
            levels = new
        m0, m1, m2 = cells(levels)
        sse = np.maximum(m2 - 2.0 * levels * m1 + levels * levels * m0, 0.0)
        return LloydMax(levels, float(sse.sum() / n), it)

    uniform = best_uniform(EmpiricalDensity(x), bits, "nearest")
    starts = (np.quantile(x, (np.arange(k) + 0.5) / k), endpoint_levels(uniform.s, bits))
    return min((lloyd(s0) for s0 in starts), key=lambda r: r.mse)


# --------------------------------------------------------------------------- rate-distortion

#: differential entropy (nats) of the unit-variance sources
_ENTROPY: dict[str, float] = {
    Gaussian.name: 0.5 * math.log(2.0 * math.pi * math.e),
    Laplace.name: 1.0 + math.log(2.0 * Laplace.b),
    # t_3: 2 (psi(2) - psi(3/2)) + log(sqrt(3) B(3/2, 1/2)), psi(2) - psi(3/2) = 2 log 2 - 1,
    # B(3/2, 1/2) = pi/2; scaling by 1/sqrt(3) subtracts log(sqrt(3))
    StudentT3.name: 2.0 * (2.0 * math.log(2.0) - 1.0) + math.log(math.pi / 2.0),
}


def rate_distortion(bits: float, source: str = "gaussian") -> float:
    """Shannon's distortion-rate bound at ``bits`` per sample for a unit-variance ``source``.

    Exact ``4**-bits`` for the Gaussian; for Laplace and Student-t(3) the
    Shannon lower bound ``exp(2 h)/(2 pi e) 4**-bits`` (factors 0.865 and 0.677).
    """
    try:
        h = _ENTROPY[source]
    except KeyError:
        raise InvalidInputError(
            f"rate_distortion: source={source!r} is unknown; expected one of: {', '.join(_ENTROPY)}"
        ) from None
    return math.exp(2.0 * h) / (2.0 * math.pi * math.e) * 4.0 ** (-bits)
