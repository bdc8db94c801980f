"""OCTAV on large inputs: an exact tail over a fixed sample of blocks, against the full search."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from fedquant.errors import NonFiniteError
from fedquant.quant import clipping, kernels
from fedquant.quant.clipping import SUBSAMPLE_MIN, channel_thresholds, threshold
from fedquant.quant.grid import noise_coefficient, step_size

#: just past the size where the sampled search starts
N = SUBSAMPLE_MIN + 12_345
BITS = (2, 4, 8)
ROUNDINGS = ("nearest", "stochastic")


def draw(dist: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "gauss":
        return rng.standard_normal(n, dtype=np.float32)
    if dist == "laplace":
        return rng.laplace(size=n).astype(np.float32)
    return rng.standard_t(3, size=n).astype(np.float32)


def full_search(x: np.ndarray, bits: int, rounding: str) -> float:
    """The OCTAV threshold on the histogram of every element (the path below SUBSAMPLE_MIN)."""
    cnt, s1, bad = kernels.abs_histogram(x)
    assert bad == 0
    c = noise_coefficient(bits, rounding)
    s = kernels.octav_histogram(
        cnt, s1, clipping._EDGES, c, -1, clipping.OCTAV_TOL, clipping.OCTAV_MAX_ITER
    )
    return float(np.float32(s))


def expected_mse(x: np.ndarray, s: float, bits: int, rounding: str) -> float:
    """MSE over ``x`` at threshold ``s`` (expected over the rounding noise)."""
    a = np.abs(x.astype(np.float64))
    step = step_size(s, bits)
    t = (np.minimum(a, s) + s) / step
    clip = np.maximum(a - s, 0.0) ** 2
    if rounding == "nearest":
        return float(np.mean(clip + (t - np.round(t)) ** 2 * step**2))
    f = t - np.floor(t)
    return float(np.mean(clip + f * (1 - f) * step**2))


def uses_sample(x: np.ndarray, bits: int, rounding: str, **kw: int) -> bool:
    got = clipping._octav_sampled(x, noise_coefficient(bits, rounding), "t", **kw)
    if not isinstance(got, float):  # the full histogram, for the usual path
        full = kernels.abs_histogram(x)
        assert np.array_equal(got[0], full[0]) and np.array_equal(got[1], full[1])
    return isinstance(got, float)


@pytest.fixture(scope="module", params=["gauss", "laplace", "t3"])
def big(request: pytest.FixtureRequest) -> tuple[str, np.ndarray]:
    return request.param, draw(request.param, N, seed=11)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_sampled_search_keeps_the_full_search_mse(
    big: tuple[str, np.ndarray], bits: int, rounding: str
) -> None:
    dist, x = big
    got = threshold(x, bits, rounding)
    want = full_search(x, bits, rounding)
    # the bound: the MSE within 0.1 % of the full search's ...
    assert expected_mse(x, got, bits, rounding) <= expected_mse(x, want, bits, rounding) * 1.001
    # ... and by construction the same fixed point, to float32 rounding
    assert got == pytest.approx(want, rel=3e-7)
    if bits >= 4:  # the sampled path did run (at 2 bits the tail is too fat to pay)
        assert uses_sample(x, bits, rounding), (dist, bits, rounding)


@pytest.fixture(scope="module")
def trained_layer() -> np.ndarray:
    """The first layer (1024 x 512) of a small MLP trained for a few dozen Adam steps."""
    torch = pytest.importorskip("torch")
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(512, 10, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 10)
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        xb = torch.randn(128, 512, generator=gen)
        loss = torch.nn.functional.cross_entropy(model(xb), (xb @ teacher).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model[0].weight.detach().numpy().astype(np.float32).reshape(-1)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_trained_weights_keep_the_full_search_mse(rounding: str, trained_layer: np.ndarray) -> None:
    # a 512k layer with the production sample scaled down (32 blocks of 1024):
    # the tail is read exactly whatever the sample's size
    w = trained_layer
    kw = {"blocks": 32, "block": 1024}
    for bits in BITS:
        c = noise_coefficient(bits, rounding)
        want = full_search(w, bits, rounding)
        if not uses_sample(w, bits, rounding, **kw):
            assert bits == 2  # too fat a tail: the full search runs
            continue
        got = float(np.float32(clipping._octav_sampled(w, c, "t", **kw)))
        mse_got = expected_mse(w, got, bits, rounding)
        assert mse_got <= expected_mse(w, want, bits, rounding) * 1.001
        assert got == pytest.approx(want, rel=3e-7)


def test_per_channel_rows_take_the_same_search() -> None:
    rng = np.random.default_rng(3)
    x = np.stack([rng.standard_normal(N // 2), 5.0 * rng.laplace(size=N // 2)]).astype(np.float32)
    kw = {"blocks": 64, "block": 1024}
    assert all(uses_sample(np.ascontiguousarray(r), 4, "nearest", **kw) for r in x)
    got = channel_thresholds(x, 4, "nearest")
    want = [full_search(np.ascontiguousarray(r), 4, "nearest") for r in x]
    np.testing.assert_allclose(got, want, rtol=3e-7)


def sampled_mask(n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    for s in kernels.sample_starts(n, clipping.SAMPLE_BLOCKS, clipping.SAMPLE_BLOCK):
        mask[s : s + clipping.SAMPLE_BLOCK] = True
    return mask


def test_outlier_rows_the_sample_misses_still_set_the_threshold() -> None:
    # a 1027 x 4096 matrix whose 12 outlier rows (x 40) all lie outside the sample
    x = draw("gauss", 1027 * 4096, seed=4).reshape(1027, 4096)
    assert x.size >= SUBSAMPLE_MIN
    hit = sampled_mask(x.size).reshape(x.shape).any(axis=1)
    rows = np.flatnonzero(~hit)[::40][:12]
    assert rows.size == 12
    x[rows] *= 40.0
    flat = x.reshape(-1)
    assert not np.abs(flat[sampled_mask(flat.size)]).max() > 10  # the sample sees none
    got = threshold(flat, 8, "nearest")
    assert got == pytest.approx(full_search(flat, 8, "nearest"), rel=3e-7)
    # the sample alone would have clipped them (what the exact tail guards against)
    cnt, s1, _ = kernels.abs_histogram_blocks(
        flat,
        kernels.sample_starts(flat.size, clipping.SAMPLE_BLOCKS, clipping.SAMPLE_BLOCK),
        clipping.SAMPLE_BLOCK,
    )
    c = noise_coefficient(8, "nearest")
    sample_only = kernels.octav_histogram(cnt, s1, clipping._EDGES, c, -1, 1e-10, 200)
    assert sample_only < 0.5 * got


def test_a_misleading_sample_falls_back_to_the_full_search() -> None:
    # the sampled blocks hold large values, the rest small: the first estimate is far
    # too high, the fixed point falls below the cut, and every element is read
    x = draw("gauss", N, seed=6)
    x[sampled_mask(N)] *= 20.0
    assert not uses_sample(x, 4, "nearest")
    assert threshold(x, 4, "nearest") == full_search(x, 4, "nearest")


def test_sparse_and_zero_inputs() -> None:
    x = np.zeros(N, np.float32)
    assert threshold(x, 4, "nearest") == 0.0
    # non-zeros outside the sample only: the sample is all zeros, the full search runs
    idx = np.flatnonzero(~sampled_mask(N))[::997]
    x[idx] = draw("laplace", idx.size, seed=2)
    assert not uses_sample(x, 4, "nearest")
    assert threshold(x, 4, "nearest") == full_search(x, 4, "nearest") > 0


def test_non_finite_values_outside_the_sample_are_refused() -> None:
    x = draw("gauss", N, seed=8)
    out = np.flatnonzero(~sampled_mask(N))
    x[out[[5, 50_000]]] = [np.nan, -np.inf]
    with pytest.raises(NonFiniteError, match=r"threshold\(method='octav'\): input holds 2 NaN/Inf"):
        threshold(x, 4, "nearest")


def test_sample_layout_is_fixed_by_the_size() -> None:
    n = SUBSAMPLE_MIN + 777
    a = kernels.sample_starts(n, 256, 4096)
    assert np.array_equal(a, kernels.sample_starts(n, 256, 4096))
    assert not np.array_equal(a, kernels.sample_starts(n + 16, 256, 4096))
    b = np.arange(256)
    assert (a % 16 == 0).all() and (a >= b * n // 256).all()
    assert (a + 4096 <= (b + 1) * n // 256).all()  # one block inside each stratum
    with pytest.raises(ValueError, match="do not fit"):
        kernels.sample_starts(256 * 4096, 256, 4096)


def test_kernels_do_not_depend_on_the_thread_count() -> None:
    x = draw("t3", 1 << 20, seed=1)
    x[7] = np.nan
    starts = kernels.sample_starts(x.size, 64, 1024)
    cut = np.uint32(0x3F800000)  # |x| >= 1
    for fn, args in (
        (kernels.abs_histogram, (x,)),
        (kernels.abs_histogram_blocks, (x, starts, 1024)),
        (kernels.abs_histogram_gaps, (x, starts, 1024, cut)),
        (kernels.abs_histogram_gaps, (x, starts, 1024, np.uint32(0))),
    ):
        par, ser = fn.parallel(*args), fn.serial(*args)
        for p, s in zip(par, ser, strict=True):
            assert np.array_equal(p, s)
    # the blocks' histogram is the histogram of the blocks; the gaps' is the rest's
    fc, f1, fbad = kernels.abs_histogram(x)
    inside = np.zeros(x.size, bool)
    inside[(starts[:, None] + np.arange(1024)).reshape(-1)] = True
    bc, b1, bbad = kernels.abs_histogram_blocks(x, starts, 1024)
    rc, r1, rbad = kernels.abs_histogram(np.ascontiguousarray(x[inside]))
    assert np.array_equal(bc, rc) and np.array_equal(b1, r1) and bbad == rbad
    gc, g1, gbad = kernels.abs_histogram_gaps(x, starts, 1024, np.uint32(0))
    rc, r1, rbad = kernels.abs_histogram(np.ascontiguousarray(x[~inside]))
    assert np.array_equal(gc, rc) and np.array_equal(g1, r1) and gbad == rbad
    assert np.array_equal(gc + bc, fc) and np.array_equal(g1 + b1, f1)  # exact sums
    # the tail of the gaps: their bins from the cut on, the rest empty; Inf/NaN counted
    tc, t1, tbad = kernels.abs_histogram_gaps(x, starts, 1024, cut)
    k = int(cut) >> (23 - kernels.HIST_MANTISSA)
    assert tbad == gbad and bbad + gbad == fbad == 1
    assert np.array_equal(tc[k:], gc[k:]) and np.array_equal(t1[k:], g1[k:])
    assert not tc[:k].any() and not t1[:k].any()


def test_threshold_does_not_depend_on_the_thread_count() -> None:
    x = draw("laplace", N, seed=9)
    before = numba.get_num_threads()
    try:
        got = set()
        for t in {1, before}:
            numba.set_num_threads(t)
            got.add(threshold(x, 4, "stochastic"))
    finally:
        numba.set_num_threads(before)
    assert len(got) == 1
