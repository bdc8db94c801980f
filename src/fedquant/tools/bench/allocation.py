"""Adaptive bit allocation and update quantization, measured.

Two importable measurements (no script; print the rows with :func:`markdown`):

:func:`codec_comparison`
    On one model state (e.g. the trained global model): fixed widths (the
    paper's ``4-2-2-4``) against ``auto:`` allocation at *the same* budget
    (:func:`fedquant.quant.allocation.budget_of`): widths chosen, total
    squared error ``sum_l n_l MSE_l``, payload bytes, encode time (median of
    ``repeats``; the allocation's overhead is the ratio of the two, measured
    in the same run).
:func:`federated_comparison`
    Short federated runs on the embedded MNIST subset (the simulator, paper
    settings otherwise): ``4-2-2-4`` vs ``auto`` at its budget, and 2-bit
    weight upload vs 2-bit update upload with and without error feedback
    (equal bytes: the same spec; a delta payload carries 15 more bytes of
    metadata, ``"kind":"delta"``). Per run: accuracy per round, total uplink
    bytes, the uplink's total squared error per client upload, and for
    ``auto`` the widths chosen per round.

:func:`allocation_report` runs both: the codec comparison on the global model
the fixed ``4-2-2-4`` run ends with.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedquant.quant import codec
from fedquant.quant.allocation import allocate, budget_of
from fedquant.quant.spec import QuantSpec

__all__ = [
    "VARIANTS",
    "allocation_report",
    "codec_comparison",
    "federated_comparison",
    "markdown",
]

#: the federated runs: label -> RunConfig overrides ("{budget}" = the fixed spec's budget)
VARIANTS: dict[str, dict[str, Any]] = {
    "4-2-2-4 fixed": {"bits": "4-2-2-4"},
    "auto at 4-2-2-4's budget": {"bits": "auto:{budget}"},
    "2-bit weights": {"bits": "2"},
    "2-bit delta": {"bits": "2", "upload": "delta"},
    "2-bit delta + error feedback": {"bits": "2", "upload": "delta", "error_feedback": True},
}


def _float_shapes(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {n: tuple(a.shape) for n, a in state.items() if np.asarray(a).dtype.kind == "f"}


def codec_comparison(
    state: Mapping[str, np.ndarray],
    fixed: str | Sequence[str] = "4-2-2-4",
    *,
    rounding: str = "stochastic",
    repeats: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fixed widths vs ``auto:`` at the same budget, on one state dict.

    ``fixed`` is one bit setting or several (each is followed by ``auto`` at its budget).

    Returns
    -------
    list of dict
        One row per spec: ``spec``, ``budget_of`` (the fixed setting it is
        compared with), ``bits`` (per quantized tensor),
        ``bits_per_weight``, ``sq_error`` (``sum_l n_l MSE_l`` measured by the
        encoder), ``predicted_sq_error`` (``auto`` only: the allocation's
        objective), ``vnmse`` (``sq_error / sum_l ||x_l||**2``), ``bytes``,
        ``encode_ms`` (median), ``encode_ratio`` and ``sq_error_ratio`` (to
        the fixed spec's).
    """
    specs: list[tuple[str, str, QuantSpec]] = []
    for bits in [fixed] if isinstance(fixed, str) else list(fixed):
        budget = budget_of(bits, _float_shapes(state))
        specs.append((bits, bits, QuantSpec.from_strings(bits=bits, rounding=rounding)))
        auto = f"auto:{budget!r}"
        specs.append((bits, auto, QuantSpec.from_strings(bits=auto, rounding=rounding)))
    rows: list[dict[str, Any]] = []
    for base, label, spec in specs:
        codec.encode_with_stats(state, spec, seed=seed)  # warm-up (numba compilation)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            enc = codec.encode_with_stats(state, spec, seed=seed)
            times.append(time.perf_counter() - t0)
        quantized = {n: i for n, i in enc.tensors.items() if i.bits <= 8}
        weights = sum(i.numel for i in quantized.values())
        sq = sum(i.numel * i.mse for i in quantized.values())
        norm = sum(float(np.sum(np.asarray(state[n], np.float64) ** 2)) for n in quantized)
        row: dict[str, Any] = {
            "spec": label,
            "budget_of": base,
            "bits": {n: i.bits for n, i in quantized.items()},
            "bits_per_weight": sum(i.numel * i.bits for i in quantized.values()) / weights,
            "sq_error": sq,
            "vnmse": sq / norm if norm else math.nan,
            "bytes": enc.nbytes,
            "encode_ms": 1e3 * statistics.median(times),
        }
        if spec.bit_budget is not None:
            row["predicted_sq_error"] = allocate(state, spec).allocation.error
        rows.append(row)
    for row in rows:
        ref = next(r for r in rows if r["spec"] == row["budget_of"])
        row["encode_ratio"] = row["encode_ms"] / ref["encode_ms"]
        row["sq_error_ratio"] = row["sq_error"] / ref["sq_error"] if ref["sq_error"] else math.nan
    return rows


def federated_comparison(
    rounds: int = 5,
    num_clients: int = 10,
    *,
    seed: int = 0,
    variants: Sequence[str] | None = None,
    **overrides: Any,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, np.ndarray]]]:
    """Short federated runs of :data:`VARIANTS` on the embedded MNIST subset.

    Parameters
    ----------
    rounds, num_clients, seed : int
        The runs' settings (everything else: :class:`~fedquant.fl.config.RunConfig`'s
        defaults, or ``overrides``).
    variants : sequence of str, optional
        Labels of :data:`VARIANTS` to run (default: all).
    **overrides
        Further :class:`~fedquant.fl.config.RunConfig` fields for every run.

    Returns
    -------
    rows : list of dict
        Per run: ``label``, ``bits``, ``upload``, ``error_feedback``,
        ``final_accuracy``, ``accuracy`` (per round), ``uplink_bytes`` (total),
        ``bytes_per_upload``, ``uplink_sq_error`` (mean over rounds of
        ``sum_l n_l MSE_l``, the squared error of one client's upload: of its
        weights, or of its update), ``bits_per_round`` (``auto`` only: mean
        width per tensor over the clients) and ``seconds``.
    states : dict
        The final global model of each run, by label.
    """
    from fedquant.fl.config import RunConfig
    from fedquant.fl.simulation import Simulation, final_accuracy

    labels = list(VARIANTS) if variants is None else list(variants)
    base = RunConfig(num_clients=num_clients, rounds=rounds, seed=seed, **overrides)
    budget: float | None = None
    rows: list[dict[str, Any]] = []
    states: dict[str, dict[str, np.ndarray]] = {}
    for label in labels:
        changes = dict(VARIANTS[label])
        if "{budget}" in str(changes.get("bits", "")):
            if budget is None:
                sim0 = Simulation(base)
                budget = budget_of(base.bits, _float_shapes(sim0.initial_state))
            changes["bits"] = str(changes["bits"]).replace("{budget}", repr(budget))
        cfg = base.with_(**changes)
        t0 = time.perf_counter()
        sim = Simulation(cfg)
        sizes = {n: int(a.size) for n, a in sim.initial_state.items()}
        state = sim.run()
        m = state.metrics
        uploads = sum(r["clients_aggregated"] for r in m)
        row: dict[str, Any] = {
            "label": label,
            "bits": cfg.bits,
            "upload": cfg.upload,
            "error_feedback": cfg.error_feedback,
            "final_accuracy": final_accuracy(m),
            "accuracy": [r.get("test_accuracy") for r in m],
            "uplink_bytes": m[-1]["cum_uplink_bytes"],
            "bytes_per_upload": m[-1]["cum_uplink_bytes"] / max(1, uploads),
            "uplink_sq_error": float(
                np.mean([sum(sizes[n] * e for n, e in r["mse"].items()) for r in m if "mse" in r])
            ),
            "seconds": time.perf_counter() - t0,
        }
        if "bits" in m[0]:
            row["bits_per_round"] = [r.get("bits") for r in m]
        rows.append(row)
        states[label] = state.global_state
    return rows, states


def allocation_report(
    rounds: int = 5,
    num_clients: int = 10,
    *,
    seed: int = 0,
    fixed: Sequence[str] = ("4-2-2-4", "2", "3", "4"),
    **overrides: Any,
) -> dict[str, list[dict[str, Any]]]:
    """:func:`federated_comparison`, then :func:`codec_comparison` of ``fixed`` (each against
    ``auto`` at its budget) on the final model of the fixed ``4-2-2-4`` run."""
    fed, states = federated_comparison(rounds, num_clients, seed=seed, **overrides)
    trained = states.get("4-2-2-4 fixed") or next(iter(states.values()))
    return {"federated": fed, "codec": codec_comparison(trained, fixed, seed=seed)}


def markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of ``columns`` of ``rows`` (floats to 4 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
