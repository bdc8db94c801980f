"""Clipping thresholds: OCTAV optimality and speed path, the other rules, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant import clipping
from fedquant.quant.clipping import ThresholdMethod, channel_thresholds, threshold
from fedquant.quant.grid import noise_coefficient, paper_coefficient, step_size
from fedquant.quant.quantizer import dequantize, quantize

N = 200_000


def samples(dist: str, n: int = N, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "gauss":
        return rng.standard_normal(n).astype(np.float32)
    if dist == "laplace":
        return rng.laplace(size=n).astype(np.float32)
    return rng.standard_t(3, size=n).astype(np.float32)


def expected_mse(x: np.ndarray, s: float, bits: int, rounding: str) -> float:
    """Exact MSE over the sample for threshold s (expected over the rounding noise)."""
    x = x.astype(np.float64)
    if s == 0:
        return float(np.mean(x**2))
    step = step_size(s, bits)
    t = (np.clip(x, -s, s) + s) / step
    if rounding == "nearest":
        q = np.round(t) * step - s
        return float(np.mean((x - q) ** 2))
    f = t - np.floor(t)
    clip = np.maximum(np.abs(x) - s, 0.0) ** 2
    return float(np.mean(clip + f * (1 - f) * step**2))


@pytest.mark.parametrize("dist", ["gauss", "laplace", "t3"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_octav_is_near_the_grid_search_optimum(dist: str, bits: int, rounding: str) -> None:
    x = samples(dist)
    s = threshold(x, bits, rounding, "octav")
    amax = float(np.abs(x).max())
    grid = np.geomspace(amax / 2000, amax, 300)
    best = min(expected_mse(x, g, bits, rounding) for g in grid)
    # refine around the best grid point (the grid spacing is 2.6 %)
    g0 = grid[int(np.argmin([expected_mse(x, g, bits, rounding) for g in grid]))]
    best = min(
        best, *(expected_mse(x, g, bits, rounding) for g in np.linspace(0.975 * g0, 1.025 * g0, 41))
    )
    got = expected_mse(x, s, bits, rounding)
    # OCTAV models the in-range noise as uniform with variance c*s**2. From 3 bits
    # on that costs < 0.5 % (the acceptance bound). At 2 bits the model is off
    # enough that the fixed point sits 0.6-1.1 % above the true optimum on this
    # grid (measured: Gaussian 0.68 % nearest / 1.0 % stochastic, Laplace 1.1 % /
    # 0.65 %); ANCHORS.md's "within about 1 %" for stochastic rounding says the
    # same. We bound B = 2 at 1.5 % so that a real regression still fails.
    assert got <= best * (1.015 if bits == 2 else 1.005)


# Best uniform quantizer NMSE on a unit Gaussian (ANCHORS.md); the figures are
# grid-independent optima, so OCTAV's threshold must land within 2 % of them.
BEST_UNIFORM = {
    "nearest": {2: 0.1188, 4: 0.01154, 8: 8.77e-5},
    "stochastic": {2: 0.1766, 4: 0.01994, 8: 1.63e-4},
}


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gaussian_nmse_matches_best_uniform(rounding: str, bits: int) -> None:
    # A stratified sample (Gaussian quantiles at evenly spaced probabilities) has
    # the population's tail, so its NMSE is the population figure: at 8 bits a
    # random sample of 1e6 spreads over +-5 % because the optimal clip (3.94
    # sigma) lies where only ~80 samples remain.
    norm = pytest.importorskip("scipy.stats").norm
    p = (np.arange(1_000_000) + 0.5) / 1_000_000
    x = np.random.default_rng(42).permutation(norm.ppf(p)).astype(np.float32)
    q = quantize(x, bits, rounding=rounding, seed=1)
    nmse = np.mean((x.astype(np.float64) - dequantize(q)) ** 2) / np.var(x.astype(np.float64))
    # stochastic rounding noise over 1e6 values: < 0.3 % standard error, inside 2 %
    assert nmse == pytest.approx(BEST_UNIFORM[rounding][bits], rel=0.02)


@pytest.mark.parametrize("dist", ["gauss", "laplace", "t3"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_histogram_path_matches_the_exact_fixed_point(dist: str, bits: int, rounding: str) -> None:
    x = samples(dist, 300_000, seed=5)
    assert x.size > clipping.EXACT_LIMIT  # the histogram path runs
    c = noise_coefficient(bits, rounding)
    s_hist = clipping._octav(x, c, None, "test")
    s_exact = clipping._octav_exact(x, c)
    # the bound: resulting MSE within 0.1 % of the exact fixed point
    assert (
        expected_mse(x, s_hist, bits, rounding) <= expected_mse(x, s_exact, bits, rounding) * 1.001
    )


def test_matched_coefficient_beats_the_papers_on_this_grid() -> None:
    x = samples("gauss", 1_000_000, seed=9)
    var = float(np.var(x.astype(np.float64)))
    nmse = {}
    for bits in (1, 2):
        matched = threshold(x, bits, "nearest", "octav")
        paper = threshold(x, bits, "nearest", "octav-paper")
        nmse[bits] = (
            expected_mse(x, matched, bits, "nearest") / var,
            expected_mse(x, paper, bits, "nearest") / var,
        )
    # ANCHORS.md: with 4^-B/3 on the +-s grid the 1-bit error nearly doubles ...
    assert nmse[1][1] > 1.6 * nmse[1][0]
    # ... and the 2-bit error is 2-11 % higher
    assert 1.02 < nmse[2][1] / nmse[2][0] < 1.11


def test_paper_variant_does_exactly_ten_iterations() -> None:
    x = samples("laplace", 5000)
    a = np.sort(np.abs(x.astype(np.float64)))
    s = a.mean()
    c = paper_coefficient(3)
    for _ in range(10):
        s = a[a > s].sum() / (c * np.count_nonzero(a <= s) + np.count_nonzero(a > s))
    assert threshold(x, 3, "nearest", "octav-paper") == pytest.approx(
        float(np.float32(s)), rel=1e-6
    )


@pytest.mark.parametrize("method", [m.value for m in ThresholdMethod])
def test_edge_cases_every_method(method: str) -> None:
    kw = {"bits": 4, "rounding": "nearest", "method": method}
    assert threshold(np.zeros(1000, np.float32), **kw) == 0.0
    assert threshold(np.zeros(100_000, np.float32), **kw) == 0.0
    assert threshold(np.array([], np.float32), **kw) == 0.0
    assert threshold(np.array([-3.0], np.float32), **kw) == pytest.approx(3.0)
    const = threshold(np.full(50_000, 2.0, np.float32), **kw)
    assert 0 < const <= 2.0
    huge = np.full(3000, 3.4e38, np.float32)
    huge[::2] *= -1
    assert threshold(huge, **kw) == pytest.approx(3.4e38, rel=1e-6)
    for scale in (1e-41, 1e-38, 1e30, 1e37):
        for n in (1000, 50_000):
            x = np.clip(samples("gauss", n) * np.float64(scale), -3.4e38, 3.4e38).astype(np.float32)
            s = threshold(x, **kw)
            amax = float(np.abs(x).max())
            assert np.isfinite(s) and 0 < s <= amax * (1 + 1e-6)
            if method in ("octav", "aciq-gauss", "kl"):
                # scale-equivariant rules: s / max|x| matches the unit-scale answer
                ref = threshold(samples("gauss", n), **kw) / float(
                    np.abs(samples("gauss", n)).max()
                )
                tol = 0.25 if scale < 1e-37 else 0.01  # denormals hold only a few significant bits
                assert s / amax == pytest.approx(ref, rel=tol)


def test_octav_constant_input_is_exact() -> None:
    for n in (10, 100_000):
        assert threshold(np.full(n, -0.5, np.float32), 3, "nearest") == pytest.approx(0.5)
        assert threshold(np.full(n, 7.0, np.float32), 1, "stochastic") == pytest.approx(7.0)


def test_channel_thresholds_match_per_row_calls() -> None:
    x = samples("laplace", 40 * 500).reshape(40, 5, 100)
    s = channel_thresholds(x, 3, "stochastic", "octav")
    assert s.shape == (40,)
    for r in (0, 17, 39):
        assert s[r] == threshold(x[r], 3, "stochastic", "octav")


def test_max_and_percentile() -> None:
    x = samples("t3", 10_000)
    assert threshold(x, 2, method="max") == pytest.approx(float(np.abs(x).max()))
    p = threshold(x, 2, method="percentile", percentile=99.0)
    assert p == pytest.approx(float(np.percentile(np.abs(x), 99.0)), rel=1e-3)


def test_bad_input() -> None:
    x = samples("gauss", 100)
    with pytest.raises(InvalidInputError, match="threshold method='mse' is unknown"):
        threshold(x, 2, method="mse")
    with pytest.raises(InvalidInputError, match="bits=0 is not a supported bit width"):
        threshold(x, 0)
    with pytest.raises(InvalidInputError, match="rounding='floor' is unknown"):
        threshold(x, 2, rounding="floor")
    for method in ThresholdMethod:
        for n in (100, 100_000):
            y = samples("gauss", n)
            y[n // 2] = np.nan
            with pytest.raises(NonFiniteError, match="NaN/Inf"):
                threshold(y, 2, method=method)


def _reference_octav(x: np.ndarray, c: float, iterations: int | None) -> float:
    """The OCTAV rule written plainly in NumPy (sorted |x|, prefix sums), as documented."""
    a = np.sort(np.abs(x.astype(np.float64)))
    c1 = np.concatenate(([0.0], np.cumsum(a)))
    n = a.size
    if n == 0 or a[-1] == 0.0:
        return 0.0
    s, prev = float(c1[-1] / n), float("nan")
    for _ in range(clipping.OCTAV_MAX_ITER if iterations is None else iterations):
        k = int(np.searchsorted(a, s, side="right"))
        n_gt, s1_gt = n - k, float(c1[-1] - c1[k])
        if n_gt <= 0 or s1_gt <= 0.0:
            return s
        s_new = s1_gt / (c * k + n_gt)
        if iterations is None:
            if abs(s_new - s) <= clipping.OCTAV_TOL * s:
                return s_new
            if abs(s_new - prev) <= clipping.OCTAV_TOL * s:  # 2-cycle: its midpoint
                return 0.5 * (s + s_new)
        prev, s = s, s_new
    return s


@pytest.mark.parametrize("n", [1, 2, 3, 17, 144, 2304, 32768])
@pytest.mark.parametrize("iterations", [None, 10])
def test_compiled_octav_equals_the_plain_rule(n: int, iterations: int | None) -> None:
    rng = np.random.default_rng(n)
    c = noise_coefficient(2, "stochastic")
    cases = [
        rng.standard_normal(n).astype(np.float32),
        rng.standard_t(3, n).astype(np.float32),
        np.full(n, 0.25, np.float32),  # constant: its own fixed point
        rng.integers(-2, 3, n).astype(np.float32),  # few distinct values: 2-cycles
    ]
    for x in cases:
        # exactly the same float64 arithmetic: equal, not just close
        assert clipping._octav_exact(x, c, iterations) == _reference_octav(x, c, iterations)
