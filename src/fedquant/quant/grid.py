"""The level grid of fedquant's uniform quantizer, and the noise model that goes with it.

The grid
--------
A B-bit quantizer (1 <= B <= 8) with clipping threshold ``s > 0`` has
``2**B`` levels whose *end levels sit exactly at -s and +s*::

    L     = 2**B - 1                 # number of steps between the end levels
    step  = 2 * s / L                # distance between neighbouring levels
    level = -s + k * step            # k = 0 .. L, the integer code sent on the wire

For B = 2 and s = 1.5 the levels are -1.5, -0.5, 0.5, 1.5 (step 1). The grid is
symmetric and has no level at 0 (an even number of levels). A value is first
clipped to ``[-s, s]`` and then rounded to a neighbouring level:

* ``nearest``: to the closer level. Inside the clip range the error is at most
  ``step/2``; modelled as uniform noise it has variance ``step**2 / 12``.
* ``stochastic``: up with probability equal to the fractional position between
  the two levels, so that ``E[Q(x)] = clip(x, -s, s)`` (unbiased inside the
  range). This needs the end levels at +-s -- with levels inside the range a
  value between the top level and ``s`` could not be rounded without bias. The
  added variance is ``p(1-p) step**2``, which averages ``step**2 / 6`` -- twice
  that of nearest rounding.

Why the grid matters for the clipping threshold
-----------------------------------------------
OCTAV (Sakr et al., ICML 2022) minimizes ``clipping noise + c * s**2 * P(|x|<=s)``
where ``c * s**2`` is the in-range noise variance. The coefficient must be the
one of the grid *and* rounding actually used:

* this grid, nearest rounding:    ``c = 1 / (3 L**2)``   (step**2/12 = s**2/(3 L**2))
* this grid, stochastic rounding: ``c = 2 / (3 L**2)``   (step**2/6)
* the "midrise" grid (step 2s/2**B, end levels at +-(s - step/2)) with nearest
  rounding has ``c = 4**-B / 3``; this is the coefficient of the OCTAV paper
  and of the reference code of arXiv 2405.13365, which however uses the grid
  above. With ``4**-B/3`` on this grid the threshold is too small: at B = 1 the
  error nearly doubles, at B = 2 it is 2-11 % higher. ``fedquant bench --grid``
  (:func:`fedquant.tools.bench.grid_table`) recomputes these figures.

:func:`noise_coefficient` returns the matched coefficient; ``paper_coefficient``
returns the paper's, for comparisons.
"""

from __future__ import annotations

from enum import Enum

from fedquant.choices import parse_choice
from fedquant.errors import InvalidInputError

#: bit widths that are quantized; 32 means "send float32 unchanged".
QUANT_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
FLOAT_BITS = 32


class Rounding(str, Enum):
    """How a clipped value is mapped to one of its two neighbouring levels."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


def check_bits(bits: int, *, allow_float: bool = False, where: str = "bits") -> int:
    """Return ``bits`` if it is a supported bit width, else raise :class:`InvalidInputError`."""
    ok = isinstance(bits, int) and not isinstance(bits, bool)
    if ok and (1 <= bits <= 8 or (allow_float and bits == FLOAT_BITS)):
        return bits
    allowed = "1..8 or 32 (float32, unquantized)" if allow_float else "1..8"
    raise InvalidInputError(f"{where}={bits!r} is not a supported bit width; expected {allowed}")


def parse_rounding(rounding: Rounding | str) -> Rounding:
    """Normalize a rounding name; raise :class:`InvalidInputError` for unknown names."""
    return parse_choice(Rounding, rounding, "rounding")


def num_steps(bits: int) -> int:
    """``L = 2**bits - 1``: the number of steps between the end levels (= the top code)."""
    return (1 << check_bits(bits)) - 1


def step_size(scale: float, bits: int) -> float:
    """Distance between neighbouring levels for threshold ``scale``: ``2 s / (2**B - 1)``."""
    return 2.0 * float(scale) / num_steps(bits)


def noise_coefficient(bits: int, rounding: Rounding | str) -> float:
    """In-range noise variance divided by ``s**2`` for this grid and rounding.

    >>> noise_coefficient(2, "nearest")   # step = 2s/3, step**2/12 = s**2/27
    0.037037037037037035
    >>> noise_coefficient(2, "stochastic")
    0.07407407407407407
    """
    steps = num_steps(bits)
    factor = 1.0 if parse_rounding(rounding) is Rounding.NEAREST else 2.0
    return factor / (3.0 * steps * steps)


def paper_coefficient(bits: int) -> float:
    """OCTAV's original coefficient ``4**-B / 3`` (midrise grid, nearest rounding)."""
    return 4.0 ** (-check_bits(bits)) / 3.0
