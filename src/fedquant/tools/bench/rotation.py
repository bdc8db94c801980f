"""Benchmark of the randomized Hadamard rotation: error, bytes, speed.

Rows are plain dicts, like the rest of :mod:`fedquant.tools.bench`.

:func:`rotation_errors`
    NMSE of fedquant's quantizer (OCTAV, per tensor) with and without the
    rotation on the synthetic sources of :mod:`fedquant.tools.bench.sources`,
    measured through the codec: the bits per coordinate count the real payload
    (padding and the 6-byte sub-header included). Each row also carries the
    closed-form NMSE of the same quantizer on a unit Gaussian
    (:mod:`fedquant.tools.bench.limits`), which the rotation should reach whatever
    the source, and the gain over the unrotated quantizer.
:func:`rotation_weight_errors`
    The same, per layer of a trained model (:mod:`fedquant.tools.bench.weights`),
    per tensor and per channel.
:func:`rotation_speed`
    Throughput of the rotation and of encode/decode with and without it, as
    the median ratio to a memcpy of the same float32 tensor, interleaved rep
    by rep (:func:`fedquant.tools.bench.speed.measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from fedquant.quant import rotation
from fedquant.quant.codec import decode, encode, encode_with_stats
from fedquant.quant.grid import noise_coefficient
from fedquant.quant.spec import QuantSpec
from fedquant.tools.bench import limits
from fedquant.tools.bench.error import nmse
from fedquant.tools.bench.sources import get_density
from fedquant.tools.bench.speed import _Threads, max_threads, measure
from fedquant.tools.report import Row

#: bit widths of the rotation tables
BITS: tuple[int, ...] = (2, 3, 4, 8)
SOURCES: tuple[str, ...] = ("gaussian", "laplace", "student-t3")
#: the shared key the benchmark rotates with (any 64-bit value)
KEY = 0xB3AC4


def gaussian_octav_nmse(bits: int, rounding: str) -> float:
    """Closed-form NMSE of OCTAV's threshold on a unit Gaussian (the rotation's target)."""
    g = get_density("gaussian")
    s = limits.octav_threshold(g, noise_coefficient(bits, rounding))
    return limits.uniform_mse(g, s, bits, rounding)


def _codec_nmse(x: np.ndarray, spec: QuantSpec, seed: int) -> tuple[float, float, float]:
    """(NMSE of the decoded values, bits per coordinate of the payload, reported MSE / var)."""
    enc = encode_with_stats({"w": x}, spec, seed=seed, shared_key=KEY)
    got = decode(enc.payload, shared_key=KEY).tensors["w"]
    var = float(np.var(x.astype(np.float64))) or 1.0
    return nmse(x, got), 8.0 * len(enc.payload) / max(x.size, 1), enc.tensors["w"].mse / var


def rotation_errors(
    *,
    sources: Sequence[str] = SOURCES,
    bits: Sequence[int] = BITS,
    roundings: Sequence[str] = ("nearest", "stochastic"),
    n: int = 1 << 20,
    seed: int = 0,
) -> list[Row]:
    """NMSE and bytes of OCTAV per tensor, plain and rotated, on seeded synthetic sources.

    Each row: ``source, rounding, bits, nmse_plain, nmse_rotated, gain``
    (plain / rotated), ``nmse_gaussian_octav`` (closed form),
    ``rotated_vs_gaussian`` (rotated / closed form), ``bpc_plain``,
    ``bpc_rotated`` (payload bits per value) and ``mse_report_error``: the
    relative difference between the MSE the encoder reports and the measured
    one (the rotated encoder excludes the padding's error analytically).
    """
    rows: list[Row] = []
    for src in sources:
        x = get_density(src).sample(n, seed).reshape(1, -1)
        for rnd in roundings:
            for b in bits:
                spec = QuantSpec(default_bits=b, rounding=rnd)  # type: ignore[arg-type]
                plain, bpc_plain, _ = _codec_nmse(x, spec, seed)
                rot, bpc_rot, reported = _codec_nmse(x, spec.with_(rotation=True), seed)
                gauss = gaussian_octav_nmse(b, rnd)
                rows.append(
                    {
                        "source": src,
                        "rounding": rnd,
                        "bits": b,
                        "n": n,
                        "nmse_plain": plain,
                        "nmse_rotated": rot,
                        "gain": plain / rot if rot > 0 else float("inf"),
                        "nmse_gaussian_octav": gauss,
                        "rotated_vs_gaussian": rot / gauss,
                        "bpc_plain": bpc_plain,
                        "bpc_rotated": bpc_rot,
                        "mse_report_error": abs(reported - rot) / rot if rot > 0 else 0.0,
                    }
                )
    return rows


def _excess_kurtosis(w: np.ndarray) -> float:
    """``E[(x - mean)^4] / var^2 - 3`` of the values: 0 for a Gaussian, 3 for a Laplace,
    -1.2 for a uniform (how heavy the tails are that the rotation evens out)."""
    x = w.astype(np.float64).reshape(-1)
    x = x - x.mean()
    var = float(np.mean(x * x))
    return float(np.mean(x**4) / var**2 - 3.0) if var > 0 else 0.0


def rotation_weight_errors(
    state: Mapping[str, np.ndarray],
    model: str,
    *,
    bits: Sequence[int] = BITS,
    granularities: Sequence[str] = ("tensor", "channel"),
    rounding: str = "nearest",
    seed: int = 0,
) -> list[Row]:
    """Per layer of ``state`` (its conv and linear weights): NMSE and bytes, plain and rotated.

    Each row: ``model, layer, numel, variance`` (of the layer's values, to
    aggregate NMSEs over layers), ``kurtosis`` (excess, of the layer's values),
    ``granularity, rounding, bits``, then the
    columns of :func:`rotation_errors` (without the Gaussian reference).
    """
    from fedquant.tools.bench.weights import quantizable_layers

    rows: list[Row] = []
    for name, w in quantizable_layers(state).items():
        for gran in granularities:
            for b in bits:
                spec = QuantSpec(default_bits=b, rounding=rounding, granularity=gran)  # type: ignore[arg-type]
                plain, bpc_plain, _ = _codec_nmse(w, spec, seed)
                rot, bpc_rot, _ = _codec_nmse(w, spec.with_(rotation=True), seed)
                rows.append(
                    {
                        "model": model,
                        "layer": name,
                        "numel": int(w.size),
                        "variance": float(np.var(w.astype(np.float64))),
                        "kurtosis": _excess_kurtosis(w),
                        "granularity": gran,
                        "rounding": rounding,
                        "bits": b,
                        "nmse_plain": plain,
                        "nmse_rotated": rot,
                        "gain": plain / rot if rot > 0 else float("inf"),
                        "bpc_plain": bpc_plain,
                        "bpc_rotated": bpc_rot,
                    }
                )
    return rows


def rotation_speed(
    *,
    n: int = 10_000_000,
    bits: int = 4,
    rounding: str = "nearest",
    threads: Sequence[int] = (1, 0),
    reps: int = 7,
    seed: int = 0,
) -> list[Row]:
    """Rotation, inverse rotation, and encode/decode with and without rotation, vs memcpy.

    ``ratio_memcpy = t_memcpy / t_op`` (median over ``reps`` interleaved reps):
    0.25 means the operation costs four copies of the float32 tensor.
    ``threads`` 0 means all (numba's pool).
    """
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    dst = np.empty_like(x)
    x2 = x.reshape(1, -1)
    key = rotation.tensor_key(KEY, "w").key
    y = rotation.rotate(x, key)
    spec = QuantSpec(default_bits=bits, rounding=rounding)  # type: ignore[arg-type]
    rspec = spec.with_(rotation=True)
    plain = encode({"w": x2}, spec, seed=seed)
    rotated = encode({"w": x2}, rspec, seed=seed, shared_key=KEY)
    ops: dict[str, Callable[[], Any]] = {
        "rotate": partial(rotation.rotate, x, key),
        "unrotate": partial(rotation.unrotate, y, key, n),
        "encode": partial(encode, {"w": x2}, spec, seed=seed),
        "encode(rotation)": partial(encode, {"w": x2}, rspec, seed=seed, shared_key=KEY),
        "decode": partial(decode, plain),
        "decode(rotation)": partial(decode, rotated, shared_key=KEY),
    }
    rows: list[Row] = []
    for th in threads:
        nth = th or max_threads()
        with _Threads(nth):
            for name, op in ops.items():
                m = measure(op, {"memcpy": partial(np.copyto, dst, x)}, reps=reps)
                rows.append(
                    {
                        "op": name,
                        "bits": bits if "code" in name else None,
                        "rounding": rounding if "code" in name else None,
                        "threads": nth,
                        "n": n,
                        "seconds": m["seconds"],
                        "melem_per_s": n / m["seconds"] / 1e6,
                        "ratio_memcpy": m["ratio"]["memcpy"],
                    }
                )
    return rows
