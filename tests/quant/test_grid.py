"""The grid's noise coefficients and argument checks."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.errors import InvalidInputError
from fedquant.quant.grid import (
    check_bits,
    noise_coefficient,
    paper_coefficient,
    parse_rounding,
    step_size,
)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_nearest_coefficient_is_the_uniform_noise_variance(bits: int) -> None:
    # Monte-Carlo: values uniform on the grid's range, nearest rounding to levels
    # -s + k*step; the error variance must be step**2/12 = c*s**2.
    s = 1.7
    rng = np.random.default_rng(bits)
    x = rng.uniform(-s, s, 400_000)
    step = step_size(s, bits)
    q = np.round((x + s) / step) * step - s
    var = np.mean((x - q) ** 2)
    # relative standard error of a mean of 4e5 samples of a bounded error: ~0.2 %
    assert var == pytest.approx(noise_coefficient(bits, "nearest") * s * s, rel=0.01)


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_stochastic_coefficient_is_twice_nearest(bits: int) -> None:
    s = 1.0
    rng = np.random.default_rng(bits)
    x = rng.uniform(-s, s, 400_000)
    step = step_size(s, bits)
    t = (x + s) / step
    f = t - np.floor(t)
    var = np.mean(f * (1 - f)) * step**2  # expected variance of stochastic rounding
    assert var == pytest.approx(noise_coefficient(bits, "stochastic") * s * s, rel=0.01)
    assert noise_coefficient(bits, "stochastic") == 2 * noise_coefficient(bits, "nearest")


def test_paper_coefficient_differs_from_this_grid() -> None:
    assert paper_coefficient(1) == pytest.approx(1 / 12)
    assert noise_coefficient(1, "nearest") == pytest.approx(1 / 3)
    assert paper_coefficient(8) / noise_coefficient(8, "nearest") == pytest.approx((255 / 256) ** 2)


def test_bad_arguments() -> None:
    for b in (0, 9, 16, -1, 2.0, True):
        with pytest.raises(InvalidInputError, match="not a supported bit width; expected 1..8"):
            check_bits(b)  # type: ignore[arg-type]
    assert check_bits(32, allow_float=True) == 32
    with pytest.raises(
        InvalidInputError, match="rounding='up' is unknown; expected one of: nearest, stochastic"
    ):
        parse_rounding("up")
