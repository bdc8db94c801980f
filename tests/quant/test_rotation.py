"""The randomized Hadamard rotation: layout, exactness, keys, and what it buys OCTAV."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedquant.errors import InvalidInputError, NonFiniteError
from fedquant.quant import rotation
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.quant.rotation import (
    block_sizes,
    largest_block,
    padded_length,
    rotate,
    scale_limit,
    signs_reference,
    tensor_key,
    unrotate,
)


def hadamard(n: int) -> np.ndarray:
    """Sylvester's construction, normalized: the dense reference."""
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def reference_rotate(x: np.ndarray, key: int, block: int, min_block: int) -> np.ndarray:
    """``H_blocks D pad(x)`` row by row, in float64 with dense matrices."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    n = rows.shape[1]
    p = padded_length(n, block, min_block)
    d = signs_reference(key, rows.shape[0] * p).reshape(rows.shape[0], p)
    out = np.zeros((rows.shape[0], p))
    out[:, :n] = rows
    out *= d
    off = 0
    for size in block_sizes(p, block):
        out[:, off : off + size] = out[:, off : off + size] @ hadamard(size)
        off += size
    return out


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("min_block", [1, 4, 16, 64])
@pytest.mark.parametrize("block", [64, 1024])
def test_layout_pads_less_than_one_unit_into_power_of_two_blocks(
    block: int, min_block: int
) -> None:
    if min_block > block:
        return
    for n in [*range(0, 300), 1000, 4095, 4096, 4097, 78400, 100_003]:
        p = padded_length(n, block, min_block)
        unit = min(min_block, 1 << max(0, (n - 1).bit_length())) if n else 1
        assert n <= p < n + unit, (n, p)
        sizes = block_sizes(p, block)
        assert sum(sizes) == p
        assert all(s & (s - 1) == 0 and unit <= s <= block for s in sizes), (n, sizes)
        assert sizes == sorted(sizes, reverse=True)
        assert largest_block(p, block) == (sizes[0] if sizes else 0)


def test_layout_of_the_paper_cnn() -> None:
    # the module docstring's example (fc1 needs no padding; fc2 1000 -> 1008)
    assert [padded_length(n) for n in (144, 2304, 78400, 1000)] == [144, 2304, 78400, 1008]
    assert block_sizes(78400) == [65536, 8192, 4096, 512, 64]
    assert block_sizes(144) == [128, 16]
    assert largest_block(10**12) == rotation.DEFAULT_BLOCK


def test_bad_block_sizes_are_refused() -> None:
    for block, min_block in ((3, 1), (0, 1), (1 << 25, 1), (64, 128), (64, 0), (True, 1)):
        with pytest.raises(InvalidInputError, match="power of two"):
            rotation.check_blocks(block, min_block)


# --------------------------------------------------------------------------- the transform


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 144, 1000, 4097])
def test_rotate_equals_the_dense_reference(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    y = rotate(x, 12345, block=1024, min_block=16)
    ref = reference_rotate(x, 12345, 1024, 16)[0]
    # float32 butterflies: log2(1024) = 10 roundings of values of size ~|x|
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-5 * max(1.0, np.abs(x).max()))


def test_rows_are_rotated_one_by_one_with_their_own_signs() -> None:
    x = np.random.default_rng(0).standard_normal((5, 100)).astype(np.float32)
    y = rotate(x, 7, block=64, min_block=16)
    assert y.shape == (5, 112)
    np.testing.assert_allclose(y, reference_rotate(x, 7, 64, 16), atol=1e-5)
    # a row rotated alone gets the signs of row 0, not those of row 3
    assert not np.allclose(rotate(x[3], 7, block=64, min_block=16), y[3], atol=1e-3)


@pytest.mark.parametrize("n", [0, 1, 7, 64, 1000, 70_001, 300_000])
def test_rotation_is_orthogonal_and_its_inverse_exact(n: int) -> None:
    rng = np.random.default_rng(n)
    x = (rng.standard_t(3, n) * 0.05).astype(np.float32)
    y = rotate(x, 99)
    assert y.size == padded_length(n)
    # norm and inner products are preserved (float32 sums: relative 1e-6)
    np.testing.assert_allclose(np.linalg.norm(y.astype(np.float64)), np.linalg.norm(x), rtol=1e-5)
    z = rng.standard_normal(n).astype(np.float32)
    np.testing.assert_allclose(
        np.dot(rotate(z, 99).astype(np.float64), y),
        np.dot(z.astype(np.float64), x),
        rtol=1e-4,
        atol=1e-6,
    )
    back = unrotate(y, 99, n)
    # two transforms of 16 float32 stages each: a few ulps of max|x| per stage
    tol = 32 * np.finfo(np.float32).eps * max(float(np.abs(x).max()) if n else 0.0, 1e-30) * 17
    assert back.shape == (n,) and np.abs(back - x).max(initial=0.0) <= tol


def test_rotation_of_rows_inverts_too() -> None:
    x = np.random.default_rng(1).standard_normal((7, 33)).astype(np.float32)
    y = rotate(x, 5)
    assert y.shape == (7, 48)
    np.testing.assert_allclose(unrotate(y, 5, 33), x, atol=1e-6)


def test_signs_are_a_pure_function_of_key_and_position() -> None:
    # with blocks of one value the transform is D alone
    ones = np.ones(1000, np.float32)
    d = rotate(ones, 42, block=1, min_block=1)
    assert np.array_equal(d, signs_reference(42, 1000))
    assert np.array_equal(rotate(ones, 42, block=1, min_block=1), d)  # deterministic
    other = rotate(ones, 43, block=1, min_block=1)
    # independent keys: about half the signs differ (binomial, 1000 draws: +-6 sigma = +-0.095)
    assert 0.4 < np.mean(other != d) < 0.6
    assert abs(d.mean()) < 0.2


def test_the_stream_does_not_depend_on_threads_or_chunking() -> None:
    x = np.random.default_rng(2).standard_normal(1 << 19).astype(np.float32)
    p = padded_length(x.size)
    offsets, sizes = rotation._layout_arrays(p, rotation.DEFAULT_BLOCK)
    a = np.empty(p, np.float32)
    b = np.empty(p, np.float32)
    rotation._rotate.parallel(x, a, 1, x.size, p, offsets, sizes, np.uint64(3))
    rotation._rotate.serial(x, b, 1, x.size, p, offsets, sizes, np.uint64(3))
    assert np.array_equal(a, b)


def test_unusable_inputs_are_refused() -> None:
    with pytest.raises(NonFiniteError, match="1 NaN/Inf"):
        rotate(np.array([1.0, np.nan, 2.0], np.float32), 1)
    big = np.full(256, 3e38, np.float32)
    with pytest.raises(InvalidInputError, match="overflow float32 once rotated"):
        rotate(big, 1)
    with pytest.raises(InvalidInputError, match="float32"):
        rotate(np.ones(4), 1)  # float64
    with pytest.raises(InvalidInputError, match="1-D vector or 2-D rows"):
        rotate(np.ones((2, 2, 2), np.float32), 1)
    with pytest.raises(InvalidInputError, match="do not match n=5"):
        unrotate(np.ones(16, np.float32), 1, 5)
    for key in (-1, 1 << 64, True, 1.5):
        with pytest.raises(InvalidInputError, match="shared_key"):
            rotate(np.ones(4, np.float32), key)  # type: ignore[arg-type]


def test_scale_limit_keeps_rotated_back_levels_finite() -> None:
    for padded in (1, 16, 1000, 1 << 16, 1 << 20):
        s = scale_limit(padded)
        n = largest_block(padded)
        assert s * math.sqrt(n) < float(np.finfo(np.float32).max)
        assert s * math.sqrt(n) > 0.99 * float(np.finfo(np.float32).max)
        assert float(np.float32(s)) == s  # a float32 the encoder can send


# --------------------------------------------------------------------------- keys


def test_tensor_keys_depend_on_the_shared_key_and_the_name() -> None:
    a = tensor_key(1, "fc1.weight")
    assert a == tensor_key(1, "fc1.weight")
    assert a.key != tensor_key(2, "fc1.weight").key
    assert a.key != tensor_key(1, "fc2.weight").key
    assert a.check != tensor_key(2, "fc1.weight").check
    assert 0 <= a.key < 1 << 64 and 0 <= a.check < 1 << 32
    assert tensor_key(2**64 - 1, "é").key != tensor_key(0, "é").key


# --------------------------------------------------------------------------- what it is for


def _nmse(x: np.ndarray, bits: int, rotated: bool) -> float:
    if rotated:
        y = rotate(x, 2024)
        xh = unrotate(dequantize(quantize(y, bits, rounding="nearest")), 2024, x.size)
    else:
        xh = dequantize(quantize(x, bits, rounding="nearest"))
    return float(np.mean((xh.astype(np.float64) - x) ** 2) / np.var(x.astype(np.float64)))


def test_rotation_makes_octav_gaussian_on_student_t() -> None:
    """Student-t(3), 2**20 values, nearest rounding, OCTAV per tensor.

    Rotated: the NMSE of OCTAV on a Gaussian (closed form, ANCHORS.md's best
    uniform quantizer 0.1188 / 0.03744 / 0.01154 / 8.77e-5 plus OCTAV's 0.35 %
    / 0.1 % / 0.01 % / 0 gap). Over 6 seeds the rotated NMSE stayed within
    +1.6 % / +1.5 % / +2 % / -5..+4 % of it (at 8 bits the blocks' different
    energies make a scale mixture); the tolerances are 3 % / 3 % / 4 % / 8 %.

    Gain over per-tensor OCTAV: the exact population ratios (OCTAV on the
    Student-t(3) density against the Gaussian, ``fedquant.tools.bench.limits``) are
    2.8 / 5.3 / 10.5 / 210. A sample's per-tensor error depends on its largest
    values: over 6 seeds the ratios ranged 2.8-3.0 / 5.0-5.9 / 9.7-12.6 /
    121-370, so the bounds asserted are below the smallest: 2.5 / 4.5 / 8.5 /
    100. ANCHORS.md's 3x / 6x / 13x / 460x sit at the top of (or above) that
    range; its own per-tensor figures (0.341 / 0.125 / 0.0170 at 2 / 4 / 8
    bits) give 2.9x / 10.8x / 194x.
    """
    x = (np.random.default_rng(0).standard_t(3, 1 << 20) / math.sqrt(3)).astype(np.float32)
    gauss = {2: 0.1188 * 1.0035, 3: 0.03744 * 1.001, 4: 0.01154, 8: 8.77e-5}
    tol = {2: 0.03, 3: 0.03, 4: 0.04, 8: 0.08}
    min_gain = {2: 2.5, 3: 4.5, 4: 8.5, 8: 100.0}
    for bits in (2, 3, 4, 8):
        rot = _nmse(x, bits, True)
        plain = _nmse(x, bits, False)
        assert rot == pytest.approx(gauss[bits], rel=tol[bits]), bits
        assert plain / rot > min_gain[bits], (bits, plain / rot)


def test_rotation_gives_the_same_error_on_any_distribution() -> None:
    # ANCHORS.md: measured the same on Gaussian, Laplace, Student-t(3), log-normal
    rng = np.random.default_rng(1)
    n = 1 << 18
    sources = {
        "gauss": rng.standard_normal(n),
        "laplace": rng.laplace(size=n),
        "student": rng.standard_t(3, n),
        "lognormal": rng.lognormal(size=n) * rng.choice([-1.0, 1.0], n),
    }
    got = [_nmse(v.astype(np.float32), 4, True) for v in sources.values()]
    # 4 bits: 0.01154 on a Gaussian; +-6 % covers the sampling spread of 2**18 values
    assert max(got) / min(got) < 1.06, got
    assert all(g == pytest.approx(0.01154, rel=0.06) for g in got), got
