"""Test sources of the error benchmarks: unit-variance Gaussian, Laplace and Student-t(3).

Each source is a symmetric density with variance 1 that can do two things:

* draw seeded float32 samples (:meth:`Density.sample`), for Monte-Carlo
  measurements of the real quantizers;
* give exact *tail moments* (:meth:`Density.tail_moments`)::

      G0(x) = P(X > x),   G1(x) = E[X 1{X > x}],   G2(x) = E[X**2 1{X > x}]   (x >= 0)

  from which every closed form of :mod:`fedquant.tools.bench.limits` is built: the
  mass and first two moments of any interval ``[a, b]`` on the positive side
  are ``G(a) - G(b)``, and the clipping error above a level ``L`` is
  ``G2(L) - 2 L G1(L) + L**2 G0(L)``. Working with upper tails (not CDFs)
  keeps full relative precision far out in the tails.

The closed forms (derived here; each is checked against numerical quadrature
of the density in the tests):

Gaussian, ``f = exp(-x**2/2)/sqrt(2 pi)``::

    G0 = erfc(x/sqrt 2)/2,   G1 = f(x),   G2 = x f(x) + G0

Laplace with scale ``b = 1/sqrt 2`` (variance ``2 b**2 = 1``), ``f = exp(-|x|/b)/(2b)``::

    G0 = e/2,   G1 = e (x + b)/2,   G2 = e (x**2 + 2 b x + 2 b**2)/2,   e = exp(-x/b)

Student-t with 3 degrees of freedom scaled to variance 1 (``X = T/sqrt 3``),
``f = 2 / (pi (1 + x**2)**2)``::

    G0 = (atan2(1, x) - x/(1+x**2))/pi,  G1 = 1/(pi (1+x**2)),  G2 = (atan2(1, x) + x/(1+x**2))/pi
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numba
import numpy as np

from fedquant.tools.bench.registry import lookup


@numba.vectorize(["float64(float64)"], cache=True)
def _erfc(x: float) -> float:  # pragma: no cover - compiled
    return math.erfc(x)


class Density(ABC):
    """A symmetric, unit-variance density with closed-form tail moments."""

    name: ClassVar[str]
    label: ClassVar[str]

    @abstractmethod
    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Density at ``x``."""

    @abstractmethod
    def tail_moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(G0, G1, G2)`` at ``x >= 0`` (``np.inf`` allowed: all zero there)."""

    @abstractmethod
    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` float64 samples."""

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        """``n`` seeded float32 samples of the unit-variance source."""
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        return self._draw(int(n), rng).astype(np.float32)

    def interval_moments(
        self, a: np.ndarray, b: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mass, first and second moment of ``[a, b]`` for ``0 <= a <= b <= inf``."""
        a0, a1, a2 = self.tail_moments(np.asarray(a, dtype=np.float64))
        b0, b1, b2 = self.tail_moments(np.asarray(b, dtype=np.float64))
        return a0 - b0, a1 - b1, a2 - b2

    def mean_abs(self) -> float:
        """``E|X| = 2 G1(0)``."""
        return float(2.0 * self.tail_moments(np.zeros(1))[1][0])


class Gaussian(Density):
    """The standard normal distribution."""

    name = "gaussian"
    label = "Gaussian"

    def pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)

    def tail_moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        g0 = 0.5 * _erfc(x / math.sqrt(2.0))
        with np.errstate(invalid="ignore"):
            f = self.pdf(x)
            xf = np.where(np.isinf(x), 0.0, x * f)
        return g0, f, xf + g0

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_normal(n)


class Laplace(Density):
    """The Laplace distribution with scale ``1/sqrt(2)`` (variance 1)."""

    name = "laplace"
    label = "Laplace"
    b = 1.0 / math.sqrt(2.0)

    def pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.exp(-np.abs(x) / self.b) / (2.0 * self.b)

    def tail_moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        b = self.b
        e = 0.5 * np.exp(-x / b)
        fin = np.isfinite(x)
        xs = np.where(fin, x, 0.0)
        return e, e * (xs + b), e * (xs * xs + 2.0 * b * xs + 2.0 * b * b)

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.laplace(0.0, self.b, n)


class StudentT3(Density):
    """Student's t with 3 degrees of freedom, scaled by ``1/sqrt(3)`` to variance 1.

    Its fourth moment is infinite: a heavy-tailed stress test for clipping rules.
    """

    name = "student-t3"
    label = "Student-t(3)"

    def pdf(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return 2.0 / (math.pi * (1.0 + x * x) ** 2)

    def tail_moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = np.asarray(x, dtype=np.float64)
        fin = np.isfinite(x)
        xs = np.where(fin, x, 0.0)
        at = np.where(fin, np.arctan2(1.0, xs), 0.0)
        r = np.where(fin, xs / (1.0 + xs * xs), 0.0)
        g1 = np.where(fin, 1.0 / (math.pi * (1.0 + xs * xs)), 0.0)
        return (at - r) / math.pi, g1, (at + r) / math.pi

    def _draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.standard_t(3, n) / math.sqrt(3.0)


#: the synthetic sources, by name
DENSITIES: dict[str, Density] = {d.name: d for d in (Gaussian(), Laplace(), StudentT3())}


def get_density(name: str) -> Density:
    """The source called ``name``; :class:`InvalidInputError` lists the known names."""
    return lookup(DENSITIES, name, "source")
