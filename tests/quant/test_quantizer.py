"""The quantizer: round trips, error bounds, unbiasedness, determinism, bad input."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant import kernels
from fedquant.quant.packing import pack, unpack
from fedquant.quant.quantizer import (
    Granularity,
    QuantizedTensor,
    byte_table,
    dequantize,
    dequantize_packed,
    level_table,
    quantize,
)

SHAPES = [(), (0,), (1,), (7,), (3, 5), (4, 3, 3, 3), (17, 1, 2)]


def _rows(x: np.ndarray, q: QuantizedTensor) -> np.ndarray:
    return x.reshape(q.scales.size, -1) if x.size else x.reshape(1, 0)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_grid(
    bits: int, granularity: str, rounding: str, shape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(zlib.crc32(repr((bits, granularity, rounding, shape)).encode()))
    x = rng.standard_normal(shape).astype(np.float32)
    q = quantize(x, bits, rounding=rounding, granularity=granularity, seed=7)
    y = dequantize(q)
    assert y.shape == x.shape and y.dtype == np.float32
    assert q.packed.size == -(-x.size * bits // 8)
    codes = q.codes
    assert codes.size == x.size
    assert codes.size == 0 or int(codes.max()) <= (1 << bits) - 1
    expected_gran = (
        Granularity.CHANNEL if granularity == "channel" and x.ndim >= 2 else Granularity.TENSOR
    )
    assert q.granularity is expected_gran
    # the reported MSE is the measured one
    err = float(np.mean((x.astype(np.float64) - y) ** 2)) if x.size else 0.0
    assert q.mse == pytest.approx(err, rel=1e-4, abs=1e-12)
    # inside the clip range the error is below one step (half a step for nearest)
    rows_x, rows_y = _rows(x, q), _rows(y, q)
    for r, (s, step) in enumerate(zip(q.scales, q.steps, strict=True)):
        inside = np.abs(rows_x[r]) <= s
        bound = step * (0.5 if rounding == "nearest" else 1.0) * (1 + 1e-5) + 1e-12
        assert np.all(np.abs(rows_x[r][inside] - rows_y[r][inside]) <= bound)
        # outside the range the value is the end level
        out = ~inside
        assert np.allclose(rows_y[r][out], np.sign(rows_x[r][out]) * s, rtol=1e-6)


@pytest.mark.parametrize("bits", range(1, 9))
def test_values_on_the_grid_come_back_unchanged(bits: int) -> None:
    s = 0.75
    levels = level_table(np.array([s]), bits)[0]
    x = np.random.default_rng(bits).permutation(np.tile(levels, 3)).astype(np.float32)
    q = quantize(x, bits, scale=s, rounding="nearest")
    assert np.array_equal(dequantize(q), x)
    # stochastic rounding leaves grid points alone too (probability of moving is 0)
    q = quantize(x, bits, scale=s, rounding="stochastic", seed=1)
    assert np.array_equal(dequantize(q), x)
    # the kernel measures the error in float32 arithmetic: levels may differ from
    # the float64-derived level table in the last ulp (~1e-8 here, squared 1e-16)
    assert q.mse < 1e-14


def test_docstring_example_codes() -> None:
    q = quantize(np.array([-1.5, -0.4, 0.6, 1.5], np.float32), bits=2, scale=1.5)
    assert q.codes.tolist() == [0, 1, 2, 3]
    assert dequantize(q).tolist() == [-1.5, -0.5, 0.5, 1.5]
    assert q.packed.tobytes() == pack(np.array([0, 1, 2, 3], np.uint8), 2).tobytes()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    # 64 fixed points inside the range, each quantized with R independent seeds.
    # Per point the rounding error is a two-valued variable with variance
    # p(1-p) step**2 <= step**2/4, so the mean over R draws has standard error
    # <= step / (2 sqrt(R)). We allow 5 standard errors (two-sided p ~ 6e-7 per
    # point) plus 2**-17 step for the 16-bit random numbers.
    s, reps = 1.0, 4000
    step = 2 * s / ((1 << bits) - 1)
    x = np.random.default_rng(0).uniform(-s, s, 64).astype(np.float32)
    total = np.zeros(64)
    for r in range(reps):
        total += dequantize(quantize(x, bits, scale=s, rounding="stochastic", seed=r))
    mean = total / reps
    tol = 5 * step / (2 * np.sqrt(reps)) + step * 2**-17
    assert np.all(np.abs(mean - x) <= tol)
    # and it is not nearest rounding in disguise: draws differ
    a = quantize(x, bits, scale=s, rounding="stochastic", seed=1).codes
    b = quantize(x, bits, scale=s, rounding="stochastic", seed=2).codes
    assert not np.array_equal(a, b)


def test_random_stream_matches_reference_and_ignores_threads() -> None:
    # the kernels' uniforms equal the NumPy twin, element for element
    n = 300_003  # above kernels.PARALLEL_MIN: the parallel kernel runs; not a multiple of 4
    x = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    s, bits, key = 1.5, 3, np.uint64(12345)
    steps = (1 << bits) - 1
    t = np.clip(
        x.astype(np.float32) * np.float32(steps / (2 * s)) + np.float32(steps / 2), 0, steps
    )
    f = np.floor(t)
    u = kernels.uniform_reference(int(key), np.arange(n))
    ref = np.minimum(f + (u < (t - f)), steps).astype(np.uint8)
    inv, step = np.array([steps / (2 * s)], np.float32), np.array([2 * s / steps], np.float32)
    step64 = np.array([2 * s / steps])
    out_p = np.empty(-(-n * bits // 8), np.uint8)
    out_s = np.empty_like(out_p)
    kernels.quantize_pack.parallel(x, n, inv, step, step64, bits, True, key, out_p)
    kernels.quantize_pack.serial(x, n, inv, step, step64, bits, True, key, out_s)
    assert np.array_equal(out_p, out_s)
    # float rounding of t may differ in the last ulp between NumPy and the fused kernel
    assert np.mean(unpack(out_p, bits, n) == ref) > 0.999


def test_random_stream_uses_16_bits_per_element_centred() -> None:
    # four elements share one 64-bit word; every 16-bit value u maps to (u + 1/2) / 2**16
    u = kernels.uniform_reference(7, np.arange(1 << 20))
    k = u * 65536 - 0.5
    assert np.array_equal(k, np.round(k)) and k.min() >= 0 and k.max() <= 65535
    # all 2**16 values occur about equally often (2**20 draws: 16 per value expected)
    counts = np.bincount(k.astype(np.int64), minlength=65536)
    assert counts.min() > 0 and abs(counts.mean() - 16) < 1e-9
    assert abs(float(u.astype(np.float64).mean()) - 0.5) < 1e-3  # sd of the mean: 2.8e-4
    # the words of consecutive groups differ (not one word repeated)
    assert len(np.unique(u[:4000].reshape(-1, 4), axis=0)) == 1000


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_grid_value_is_exact_under_both_roundings(bits: int, granularity: str) -> None:
    # Each level, as the decoder computes it, many times over and at several scales:
    # the grid position of a float32 level computed in float32 misses the integer by a
    # few ulps, which once made stochastic rounding move ~1e-5 of such values one step.
    rng = np.random.default_rng(bits)
    scales = np.array([0.75, 1e-3, 3.3, 123.456, 0.1], np.float32)
    reps = max(4, 80_000 // (1 << bits))
    levels = level_table(scales, bits)  # (5, 2**bits)
    x = np.stack([rng.permutation(np.repeat(row, reps)) for row in levels]).astype(np.float32)
    for rounding in ("nearest", "stochastic"):
        if granularity == "channel":
            q = quantize(x, bits, scale=scales, rounding=rounding, granularity="channel", seed=5)
            assert np.array_equal(dequantize(q), x), rounding
        else:
            for r, s in enumerate(scales):
                q = quantize(x[r], bits, scale=s, rounding=rounding, seed=r)
                assert np.array_equal(dequantize(q), x[r]), (rounding, float(s))


def test_same_seed_same_codes_different_seed_different_codes() -> None:
    x = np.random.default_rng(0).standard_normal((32, 50)).astype(np.float32)
    for gran in ("tensor", "channel"):
        a = quantize(x, 2, rounding="stochastic", granularity=gran, seed=11)
        b = quantize(x, 2, rounding="stochastic", granularity=gran, seed=11)
        c = quantize(x, 2, rounding="stochastic", granularity=gran, seed=np.random.default_rng(11))
        assert np.array_equal(a.packed, b.packed)
        assert not np.array_equal(a.packed, c.packed)


def test_per_channel_uses_one_scale_per_row() -> None:
    x = np.random.default_rng(0).standard_normal((8, 4000)).astype(np.float32)
    x *= np.arange(1, 9, dtype=np.float32)[:, None]  # row r has standard deviation r + 1
    qc = quantize(x, 3, granularity="channel")
    qt = quantize(x, 3, granularity="tensor")
    assert qc.scales.shape == (8,) and qt.scales.shape == (1,)
    # each row's threshold follows its own spread (4000 samples: thresholds vary ~2 %)
    per_sigma = qc.scales / np.arange(1, 9)
    assert np.all(np.abs(per_sigma / np.median(per_sigma) - 1) < 0.1)
    assert qc.mse < qt.mse


@pytest.mark.parametrize("magnitude", [1e-40, 1e-35, 1e35, 3e38])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_extreme_magnitudes(magnitude: float, rounding: str) -> None:
    x = np.clip(np.random.default_rng(1).standard_normal(1000) * magnitude, -3.4e38, 3.4e38)
    x = x.astype(np.float32)
    q = quantize(x, 4, rounding=rounding, seed=0)
    y = dequantize(q)
    assert np.isfinite(y).all() and np.isfinite(q.mse) and np.isfinite(q.scales).all()
    rms = np.sqrt(np.mean(x.astype(np.float64) ** 2))
    # 4-bit quantization keeps the error well below the signal (NMSE < 0.1)
    assert np.sqrt(np.mean((x.astype(np.float64) - y) ** 2)) < 0.32 * rms


def test_all_zero_and_constant() -> None:
    z = np.zeros((4, 5), np.float32)
    q = quantize(z, 2, rounding="stochastic", seed=0)
    assert q.scales.tolist() == [0.0] and np.array_equal(dequantize(q), z) and q.mse == 0.0
    c = np.full(100, -2.5, np.float32)
    q = quantize(c, 1)
    assert np.array_equal(dequantize(q), c) and q.mse == 0.0


def test_torch_tensor_input() -> None:
    torch = pytest.importorskip("torch")
    t = torch.randn(10, 10)
    q = quantize(t, 4, rounding="stochastic", seed=3)
    assert np.array_equal(q.packed, quantize(t.numpy(), 4, rounding="stochastic", seed=3).packed)


def test_bad_input() -> None:
    x = np.ones(10, np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[3] = bad
        with pytest.raises(NonFiniteError, match="1 NaN/Inf value"):
            quantize(y, 4)
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            quantize(y, 4, scale=1.0)
        big = np.ones(100_000, np.float32)
        big[-1] = bad
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            quantize(big, 4)
    with pytest.raises(
        InvalidInputError, match="bits=0 is not a supported bit width; expected 1..8"
    ):
        quantize(x, 0)
    with pytest.raises(InvalidInputError, match="bits=9 is not a supported"):
        quantize(x, 9)
    with pytest.raises(
        InvalidInputError, match="threshold method='best' is unknown; expected one of: octav"
    ):
        quantize(x, 4, method="best")
    with pytest.raises(InvalidInputError, match="granularity='row' is unknown"):
        quantize(x, 4, granularity="row")
    with pytest.raises(InvalidInputError, match="stochastic rounding needs seed="):
        quantize(x, 4, rounding="stochastic")
    with pytest.raises(InvalidInputError, match="seed=-1 is not usable"):
        quantize(x, 4, rounding="stochastic", seed=-1)
    with pytest.raises(InvalidInputError, match="expected a floating-point array, got dtype int64"):
        quantize(np.arange(4), 4)
    with pytest.raises(InvalidInputError, match="got 2 scale"):
        quantize(x, 4, scale=[1.0, 2.0])
    with pytest.raises(InvalidInputError, match="scale must be finite"):
        quantize(x, 4, scale=float("nan"))


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 7, 9, 2049, 131_073, 300_005])  # partial bytes; parallel
def test_whole_byte_dequantize_equals_the_generic_kernel(bits: int, n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    q = quantize(x, bits, scale=1.7)
    lut = level_table(q.scales, bits)
    generic = np.empty(n, np.float32)
    kernels.unpack_dequantize(q.packed, bits, n, lut, n, generic)
    fast = dequantize(q)
    assert np.array_equal(fast, generic)
    assert np.array_equal(fast, lut[0][q.codes])
    serial = np.empty(n, np.float32)
    kernels.dequantize_bytes.serial(q.packed, n, byte_table(lut[0], bits), serial)
    assert np.array_equal(serial, fast)


@pytest.mark.parametrize("scale", [1e-38, 1e-3, 0.7, 3.0, 1e30, 3.4e38])
def test_8_bit_arithmetic_dequantize_equals_the_level_table(scale: float) -> None:
    codes = np.tile(np.arange(256, dtype=np.uint8), 1200)  # 307,200: the parallel kernel too
    s = np.array([scale], np.float32)
    got = dequantize_packed(codes, codes.shape, 8, s)
    assert np.array_equal(got, level_table(s, 8)[0][codes])
    assert got[255] == s[0] and got[0] == -s[0]
