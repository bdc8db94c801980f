"""Error of the server's average of N uploads against the error of one upload.

A threshold rule such as OCTAV minimizes the mean squared error of *one* upload. The
server, though, averages many: unbiased rounding noise, independent across clients,
shrinks in the average, while the clipping bias of clients that quantize (nearly) the
same weights does not. This section measures both on the same tensors, uploaded N times
with N independent seeds — the limiting case of IID clients whose weights agree, as
they nearly do after a few local steps from the same global model.

With E the normalized squared error, E(N) = bias + noise / N for independent unbiased
noise, so two measurements give the split: ``bias = (N E(N) - E(1)) / (N - 1)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedquant.quant.clipping import ThresholdMethod, threshold
from fedquant.quant.codec import decode, encode
from fedquant.quant.grid import Rounding
from fedquant.quant.quantizer import fake_quantize
from fedquant.quant.spec import QuantSpec

#: threshold rules compared: ours, the paper's coefficient, and no clipping
METHODS = ("octav", "octav-paper", "max")
ROUNDINGS = ("stochastic", "nearest")
BITS = (2, 3, 4, 8)
#: numbers of uploads averaged (1 = a single upload)
CLIENTS = (1, 10, 30)
#: thresholds tried for the mean of N uploads, as multiples of each tensor's OCTAV threshold
FACTORS = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0, 2.5, 3.0)


def averaged_errors(
    tensors: Mapping[str, np.ndarray],
    *,
    method: str,
    rounding: str,
    bits: int,
    clients: Sequence[int] = CLIENTS,
    seed: int = 0,
) -> dict[int, float]:
    """Normalized squared error of the mean of the first ``n`` uploads, for each ``n``.

    Upload ``c`` encodes ``tensors`` with ``QuantSpec(method, rounding, bits)`` and the
    seed ``(seed, c)``; the server's estimate is the plain mean of the decoded uploads.

    Parameters
    ----------
    tensors : mapping of str to ndarray
        The weights every client uploads (float).
    method, rounding : str
        A threshold rule and a rounding mode of :class:`~fedquant.quant.spec.QuantSpec`.
    bits : int
        Bits per value, 1–8.
    clients : sequence of int
        The numbers of uploads to report (each ≥ 1).
    seed : int
        The run seed the per-upload seeds derive from.

    Returns
    -------
    dict of int to float
        ``n -> ||mean of n decoded uploads - tensors||^2 / ||tensors||^2``.
    """
    if not clients or min(clients) < 1:
        raise ValueError(f"clients={list(clients)}: expected numbers of uploads >= 1")
    ref, norm = _reference(tensors, "averaged_errors")
    spec = QuantSpec(method=ThresholdMethod(method), rounding=Rounding(rounding), default_bits=bits)
    total = {k: np.zeros(v.shape, dtype=np.float64) for k, v in ref.items()}
    wanted = set(clients)
    out: dict[int, float] = {}
    for c in range(max(clients)):
        decoded = decode(encode(ref, spec, seed=(seed, c))).tensors
        for k in ref:
            total[k] += decoded[k]
        n = c + 1
        if n in wanted:
            out[n] = sum(_squared_error(total[k] / n, ref[k]) for k in ref) / norm
    return out


def _reference(
    tensors: Mapping[str, np.ndarray], where: str
) -> tuple[dict[str, np.ndarray], float]:
    """The tensors as float32 and their total squared norm (the errors' denominator)."""
    ref = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    norm = sum(_squared_error(v, 0.0) for v in ref.values())
    if not norm > 0:
        raise ValueError(f"{where}: the tensors are all zero; the error is undefined")
    return ref, norm


def _squared_error(estimate: np.ndarray, truth: np.ndarray | float) -> float:
    return float(np.sum(np.square(np.subtract(estimate, truth, dtype=np.float64))))


def bias_share(errors: Mapping[int, float]) -> float | None:
    """Share of one upload's error that averaging cannot remove (the shared bias).

    From ``E(N) = bias + noise / N`` at N = 1 and the largest N measured; None
    without two distinct N. Clipped to [0, 1] (sampling noise can push it past).
    """
    n = max(errors)
    if n < 2 or 1 not in errors or not errors[1] > 0:
        return None
    bias = (n * errors[n] - errors[1]) / (n - 1)
    return float(min(1.0, max(0.0, bias / errors[1])))


def averaging_table(
    sources: Mapping[str, Mapping[str, np.ndarray]],
    *,
    bits: Sequence[int] = BITS,
    methods: Sequence[str] = METHODS,
    roundings: Sequence[str] = ROUNDINGS,
    clients: Sequence[int] = CLIENTS,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (source, rounding, bits, method): the errors and the bias share."""
    rows = []
    for name, tensors in sources.items():
        for rounding in roundings:
            for b in bits:
                for method in methods:
                    errs = averaged_errors(
                        tensors, method=method, rounding=rounding, bits=b, clients=clients,
                        seed=seed,
                    )  # fmt: skip
                    rows.append(
                        {
                            "source": name,
                            "rounding": rounding,
                            "bits": b,
                            "method": method,
                            "nmse": {str(n): e for n, e in sorted(errs.items())},
                            "bias_share": bias_share(errs),
                        }
                    )
    return rows


def threshold_sweep(
    tensors: Mapping[str, np.ndarray],
    *,
    rounding: str,
    bits: int,
    clients: int,
    factors: Sequence[float] = FACTORS,
    seed: int = 0,
) -> dict[str, Any]:
    """Error of the mean of ``clients`` uploads when every tensor is clipped at ``f`` times
    its OCTAV threshold, for each ``f`` in ``factors``: where the best threshold for the
    average lies, and what it would save over OCTAV's.

    Returns
    -------
    dict
        ``nmse`` (factor as text -> error of the mean), ``best_factor`` and ``best_nmse``.
    """
    if clients < 1 or not factors or min(factors) <= 0:
        raise ValueError(f"clients={clients}, factors={list(factors)}: expected >= 1 and > 0")
    ref, norm = _reference(tensors, "threshold_sweep")
    base = {k: threshold(v, bits, rounding, "octav") for k, v in ref.items()}
    errs: dict[str, float] = {}
    for f in factors:
        err = 0.0
        for i, (k, v) in enumerate(ref.items()):
            total = np.zeros(v.shape, dtype=np.float64)
            for c in range(clients):
                total += fake_quantize(
                    v, bits, scale=f * base[k], rounding=rounding,
                    seed=np.random.SeedSequence([seed, c, i]),
                )  # fmt: skip
            err += _squared_error(total / clients, v)
        errs[f"{f:g}"] = err / norm
    best = min(errs, key=errs.__getitem__)
    return {"nmse": errs, "best_factor": float(best), "best_nmse": errs[best]}
