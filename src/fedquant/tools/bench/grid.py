"""The level-grid table: OCTAV's noise coefficient must match the grid and rounding used.

OCTAV (Sakr et al., ICML 2022) picks the clipping threshold ``s`` that
minimizes ``clipping noise + c s**2 P(|x| <= s)``, where ``c s**2`` models the
in-range noise. Which ``c`` is right depends on the grid and the rounding
(:mod:`fedquant.quant.grid`):

* midrise grid (step ``2s/2**B``), nearest rounding: ``c = 4**-B / 3`` -- the
  OCTAV paper's setting;
* end levels at ``+-s`` (step ``2s/(2**B - 1)``, fedquant and the reference
  code of arXiv 2405.13365), nearest: ``c = 1 / (3 (2**B - 1)**2)``;
* the same grid with stochastic rounding, whose in-range variance averages
  ``step**2 / 6``: ``c = 2 / (3 (2**B - 1)**2)``.

:func:`grid_table` computes, for each case and source, OCTAV's threshold (the
converged fixed point on the density), the exact NMSE there
(:func:`fedquant.tools.bench.limits.uniform_mse`), the best NMSE any threshold
achieves on the same grid with the same rounding, and the excess -- then
checks the closed forms by Monte-Carlo: fedquant's own ``threshold`` and
``quantize`` on seeded samples (the paper-coefficient rows use
``method="octav-paper"``, i.e. its 10 iterations; the midrise rows quantize
with a small NumPy midrise quantizer, since fedquant has no such grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedquant.quant.clipping import threshold
from fedquant.quant.grid import noise_coefficient, paper_coefficient
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.tools.bench import limits
from fedquant.tools.bench.sources import DENSITIES, get_density

#: (key, grid, rounding, coefficient, description)
CASES: tuple[tuple[str, str, str, str, str], ...] = (
    (
        "octav-paper",
        "midrise",
        "nearest",
        "paper",
        "OCTAV paper: midrise grid, nearest, c = 4^-B/3",
    ),
    (
        "reference-code",
        "endpoint",
        "nearest",
        "paper",
        "+-s grid, nearest, c = 4^-B/3 (paper's code)",
    ),
    (
        "fedquant-nearest",
        "endpoint",
        "nearest",
        "matched",
        "+-s grid, nearest, c = 1/(3L^2) (fedquant)",
    ),
    (
        "reference-code-stochastic",
        "endpoint",
        "stochastic",
        "paper",
        "+-s grid, stochastic, c = 4^-B/3",
    ),
    (
        "stochastic-as-nearest",
        "endpoint",
        "stochastic",
        "nearest",
        "+-s grid, stochastic, c = 1/(3L^2) (step^2/12)",
    ),
    (
        "fedquant-stochastic",
        "endpoint",
        "stochastic",
        "matched",
        "+-s grid, stochastic, c = 2/(3L^2) (fedquant)",
    ),
)


def coefficient(kind: str, bits: int, rounding: str) -> float:
    """``c`` of a case: ``"paper"`` (4**-B/3), ``"nearest"`` (step**2/12 on the +-s grid) or
    ``"matched"`` (the grid's and rounding's own, :func:`fedquant.quant.grid.noise_coefficient`)."""
    if kind == "paper":
        return paper_coefficient(bits)
    if kind == "nearest":
        return noise_coefficient(bits, "nearest")
    return noise_coefficient(bits, rounding)


def midrise_quantize(x: np.ndarray, s: float, bits: int) -> np.ndarray:
    """Nearest rounding onto the midrise grid of threshold ``s`` (for the Monte-Carlo check)."""
    cells = 1 << bits
    step = 2.0 * s / cells
    k = np.clip(np.floor((x.astype(np.float64) + s) / step), 0, cells - 1)
    return (-s + (k + 0.5) * step).astype(np.float32)


def grid_table(
    bits: Sequence[int] = (1, 2, 3, 4, 8),
    sources: Sequence[str] = tuple(DENSITIES),
    *,
    n: int = 1 << 20,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per source x case x bit width (see the module docstring).

    Row keys: ``source, case, description, grid, rounding, coefficient, bits,
    c, s_octav, nmse_octav, s_best, nmse_best, excess`` (``nmse_octav /
    nmse_best - 1``) and the Monte-Carlo ``mc_s, mc_nmse`` (``n`` samples;
    ``n = 0`` skips them). Thresholds are in units of the standard deviation.
    """
    rows: list[dict[str, Any]] = []
    for k, name in enumerate(sources):
        d = get_density(name)
        x = d.sample(n, seed=np.random.default_rng([seed, k])) if n else None
        var = float(np.var(x, dtype=np.float64)) if x is not None else 1.0
        for b in bits:
            best: dict[tuple[str, str], limits.Optimum] = {}
            for key, grid, rnd, kind, desc in CASES:
                c = coefficient(kind, b, rnd)
                s = limits.octav_threshold(d, c)
                if (grid, rnd) not in best:
                    best[grid, rnd] = limits.best_uniform(d, b, rnd, grid)
                opt = best[grid, rnd]
                mse = limits.uniform_mse(d, s, b, rnd, grid)
                row: dict[str, Any] = {
                    "source": name,
                    "case": key,
                    "description": desc,
                    "grid": grid,
                    "rounding": rnd,
                    "coefficient": kind,
                    "bits": b,
                    "c": c,
                    "s_octav": s,
                    "nmse_octav": mse,
                    "s_best": opt.s,
                    "nmse_best": opt.mse,
                    "excess": mse / opt.mse - 1.0,
                    "mc_s": None,
                    "mc_nmse": None,
                }
                if x is not None:
                    method = "octav-paper" if kind == "paper" else "octav"
                    trnd = "nearest" if kind == "nearest" else rnd
                    s_mc = threshold(x, b, trnd, method)
                    if grid == "midrise":
                        xh = midrise_quantize(x, s_mc, b)
                    else:
                        xh = dequantize(
                            quantize(
                                x,
                                b,
                                scale=s_mc,
                                rounding=rnd,
                                seed=np.random.SeedSequence([seed, k, b]),
                            )
                        )
                    diff = x.astype(np.float64) - xh
                    row["mc_s"] = s_mc / var**0.5
                    row["mc_nmse"] = float(np.mean(diff * diff)) / var
                rows.append(row)
    return rows
