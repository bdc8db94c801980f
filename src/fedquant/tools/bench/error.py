"""Quantization-error benchmark: fedquant vs peers vs limits.

The metric is the normalized MSE, ``NMSE = mean((x - x_hat)**2) / var(x)``,
measured on the decoded values (not taken from the quantizer's own report).
For the zero-mean synthetic sources it equals the vNMSE
``||x - x_hat||**2 / ||x||**2`` used by the peer papers, up to sampling.

Sources
-------
* Seeded samples of the unit Gaussian, Laplace and Student-t(3)
  (:mod:`fedquant.tools.bench.sources`), default ``2**20`` values each;
* the conv and linear weights of a trained model, per layer
  (:func:`weights_errors`; by default the paper's CNN trained centrally on
  MNIST and CIFAR-10, :mod:`fedquant.tools.bench.weights`).

Contenders, at B = 1, 2, 3, 4, 8 bits
-------------------------------------
* fedquant: every threshold method x rounding (x granularity on layers);
* the peers of :mod:`fedquant.tools.bench.peers`, each at the bit widths it has;
* the limits of :mod:`fedquant.tools.bench.limits`: best uniform quantizer (nearest
  and stochastic rounding), Lloyd-Max and rate-distortion -- in closed form
  for the synthetic sources, exactly on the sample for layers.

Bits per coordinate (``bpc``) count the payload as sent: codes plus float32
scales for fedquant (one per tensor or per row), each peer's side information
as its paper sends it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedquant.quant.clipping import ThresholdMethod
from fedquant.quant.grid import Rounding
from fedquant.quant.quantizer import Granularity, dequantize, quantize
from fedquant.tools.bench import limits, peers
from fedquant.tools.bench.sources import DENSITIES, get_density
from fedquant.tools.report import Row

BITS: tuple[int, ...] = (1, 2, 3, 4, 8)
METHODS: tuple[str, ...] = tuple(m.value for m in ThresholdMethod)
ROUNDINGS: tuple[str, ...] = tuple(r.value for r in Rounding)
GRANULARITIES: tuple[str, ...] = tuple(g.value for g in Granularity)
#: peers of the error tables (``torch-qint8`` is 8-bit min-max nearest; it is in the speed table)
PEER_NAMES: tuple[str, ...] = tuple(p for p in peers.PEERS if p != "torch-qint8")


def nmse(x: np.ndarray, x_hat: np.ndarray) -> float:
    """``mean((x - x_hat)**2) / var(x)`` in float64 (0 for a constant ``x`` reproduced exactly)."""
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    b = np.asarray(x_hat, dtype=np.float64).reshape(-1)
    mse = float(np.mean((a - b) ** 2)) if a.size else 0.0
    var = float(np.var(a)) if a.size else 0.0
    if var == 0.0:
        return 0.0 if mse == 0.0 else float("inf")
    return mse / var


def fedquant_errors(
    x: np.ndarray,
    source: str,
    *,
    bits: Sequence[int] = BITS,
    methods: Sequence[str] = METHODS,
    roundings: Sequence[str] = ROUNDINGS,
    granularities: Sequence[str] = ("tensor",),
    seed: int = 0,
) -> list[Row]:
    """NMSE of :func:`fedquant.quantize` for every method x rounding x granularity x bits.

    Stochastic rounding uses a seed derived from ``seed`` and the configuration.
    """
    rows: list[Row] = []
    std = float(np.std(x, dtype=np.float64)) or 1.0
    for gran in granularities:
        if gran == "channel" and x.ndim < 2:
            continue
        for b in bits:
            for method in methods:
                for rnd in roundings:
                    ss = np.random.SeedSequence(
                        [
                            seed,
                            b,
                            METHODS.index(method),
                            ROUNDINGS.index(rnd),
                            GRANULARITIES.index(gran),
                        ]
                    )
                    q = quantize(x, b, method=method, rounding=rnd, granularity=gran, seed=ss)
                    rows.append(
                        {
                            "source": source,
                            "scheme": "fedquant",
                            "method": method,
                            "rounding": rnd,
                            "granularity": q.granularity.value,
                            "bits": b,
                            "bpc": 8.0 * q.nbytes / max(x.size, 1),
                            "nmse": nmse(x, dequantize(q)),
                            "s_over_std": float(q.scales[0]) / std if q.scales.size == 1 else None,
                        }
                    )
    return rows


def peer_errors(
    x: np.ndarray,
    source: str,
    *,
    bits: Sequence[int] = BITS,
    names: Sequence[str] = PEER_NAMES,
    seed: int = 0,
) -> list[Row]:
    """NMSE of each peer at each of ``bits`` that it supports."""
    rows: list[Row] = []
    for name in names:
        p = peers.get_peer(name)
        for b in bits:
            if b not in p.bits:
                continue
            rng = np.random.default_rng([seed, b, len(rows)])
            enc = p.encode(x, b, rng)
            rows.append(
                {
                    "source": source,
                    "scheme": name,
                    "method": "",
                    "rounding": "stochastic" if p.unbiased else "",
                    "granularity": "",
                    "bits": b,
                    "bpc": enc.bits_per_coord,
                    "nmse": nmse(x, p.decode(enc)),
                    "s_over_std": None,
                }
            )
    return rows


def _limit_row(source: str, scheme: str, b: int, value: float, s: float | None = None) -> Row:
    return {
        "source": source,
        "scheme": scheme,
        "method": "",
        "rounding": "",
        "granularity": "",
        "bits": b,
        "bpc": float(b),
        "nmse": value,
        "s_over_std": s,
    }


def density_limits(name: str, bits: Sequence[int] = BITS) -> list[Row]:
    """Closed-form limits for a unit-variance synthetic source."""
    d = get_density(name)
    rows: list[Row] = []
    for b in bits:
        for rnd in ROUNDINGS:
            opt = limits.best_uniform(d, b, rnd)
            rows.append(_limit_row(name, f"best-uniform-{rnd}", b, opt.mse, opt.s))
        rows.append(_limit_row(name, "lloyd-max", b, limits.lloyd_max(d, b).mse))
        rows.append(_limit_row(name, "rate-distortion", b, limits.rate_distortion(b, name)))
    return rows


def sample_limits(x: np.ndarray, source: str, bits: Sequence[int] = BITS) -> list[Row]:
    """Limits computed exactly on a sample: best symmetric uniform quantizer (nearest and
    stochastic), unconstrained Lloyd-Max (1-D k-means), and the Gaussian ``4**-B``
    for reference (a bound only for Gaussian data). All normalized by ``var(x)``."""
    emp = limits.EmpiricalDensity(x)
    var = emp.variance or 1.0
    std = var**0.5
    rows: list[Row] = []
    for b in bits:
        for rnd in ROUNDINGS:
            opt = limits.best_uniform(emp, b, rnd)
            rows.append(_limit_row(source, f"best-uniform-{rnd}", b, opt.mse / var, opt.s / std))
        rows.append(_limit_row(source, "lloyd-max", b, limits.kmeans_1d(x, b).mse / var))
        rows.append(_limit_row(source, "rate-distortion", b, 4.0 ** (-b)))
    return rows


def synthetic_errors(
    *,
    n: int = 1 << 20,
    bits: Sequence[int] = BITS,
    sources: Sequence[str] = tuple(DENSITIES),
    methods: Sequence[str] = METHODS,
    peer_names: Sequence[str] = PEER_NAMES,
    seed: int = 0,
) -> list[Row]:
    """All rows for the synthetic sources: fedquant, peers and closed-form limits."""
    rows: list[Row] = []
    for k, name in enumerate(sources):
        x = get_density(name).sample(n, seed=np.random.default_rng([seed, k]))
        rows += fedquant_errors(x, name, bits=bits, methods=methods, seed=seed)
        rows += peer_errors(x, name, bits=bits, names=peer_names, seed=seed)
        rows += density_limits(name, bits)
    return rows


def weights_errors(
    state: Mapping[str, Any],
    model: str,
    *,
    bits: Sequence[int] = BITS,
    methods: Sequence[str] = METHODS,
    granularities: Sequence[str] = GRANULARITIES,
    peer_names: Sequence[str] = PEER_NAMES,
    seed: int = 0,
) -> list[Row]:
    """Per-layer rows for the quantizable tensors of ``state`` (source ``"<model>/<tensor>"``).

    ``state`` maps names to arrays or tensors (see
    :func:`fedquant.tools.bench.weights.load_state` for checkpoint files).
    """
    from fedquant.tools.bench.weights import load_state, quantizable_layers

    rows: list[Row] = []
    for lname, w in quantizable_layers(load_state(state)).items():
        src = f"{model}/{lname}"
        rows += fedquant_errors(
            w, src, bits=bits, methods=methods, granularities=granularities, seed=seed
        )
        rows += peer_errors(w, src, bits=bits, names=peer_names, seed=seed)
        rows += sample_limits(w, src, bits)
        for r in rows:
            if r["source"] == src:
                r["numel"] = int(w.size)
                r["var"] = float(np.var(w, dtype=np.float64))
    return rows


def aggregate_layers(rows: Iterable[Row], model: str) -> list[Row]:
    """Whole-model rows: per configuration, ``sum(MSE_l n_l) / sum(var_l n_l)`` over layers
    and the size-weighted bits per coordinate."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for r in rows:
        if not str(r["source"]).startswith(model + "/"):
            continue
        key = (r["scheme"], r["method"], r["rounding"], r["granularity"], r["bits"])
        groups.setdefault(key, []).append(r)
    out: list[Row] = []
    for (scheme, method, rnd, gran, b), rs in groups.items():
        num = sum(r["nmse"] * r["var"] * r["numel"] for r in rs)
        den = sum(r["var"] * r["numel"] for r in rs)
        n = sum(r["numel"] for r in rs)
        out.append(
            {
                "source": model,
                "scheme": scheme,
                "method": method,
                "rounding": rnd,
                "granularity": gran,
                "bits": b,
                "bpc": sum(r["bpc"] * r["numel"] for r in rs) / n,
                "nmse": num / den if den else 0.0,
                "s_over_std": None,
                "numel": n,
                "layers": len(rs),
            }
        )
    return out
