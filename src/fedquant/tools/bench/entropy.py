"""Benchmark of entropy coding: bits per code against the entropy, and speed.

Rows are plain dicts, like the rest of :mod:`fedquant.tools.bench`.

:func:`entropy_efficiency`
    For fedquant's codes (OCTAV per tensor, optionally rotated) of seeded
    synthetic sources: the order-0 empirical entropy of the codes, the bits per
    code of fedquant's rANS coder (:mod:`fedquant.quant.entropy`, table and
    states included), of packing (``B``), and of zstd as a general-purpose
    peer -- over the packed bytes and over one byte per code -- when
    ``zstandard`` is installed (it is not a fedquant dependency).
:func:`entropy_weight_efficiency`
    The same per layer of a trained model, and the payload bytes of the whole
    state with and without ``entropy="rans"`` (what the codec really sends,
    with its per-tensor fallback to packing).
:func:`entropy_speed`
    rANS encode and decode (to codes, and straight to float32 levels), with
    the unpack + dequantize of packed codes and zstd as references; each as the
    median ratio to a memcpy of a float32 tensor of the same number of values,
    interleaved rep by rep (:func:`fedquant.tools.bench.speed.measure`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from fedquant.quant import entropy, rotation
from fedquant.quant.codec import encode
from fedquant.quant.packing import pack
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.quant.spec import QuantSpec
from fedquant.tools.bench.sources import get_density
from fedquant.tools.bench.speed import measure
from fedquant.tools.report import Row

BITS: tuple[int, ...] = (2, 3, 4, 5, 8)
SOURCES: tuple[str, ...] = ("gaussian", "laplace", "student-t3")
KEY = 0xE27


def _zstd() -> Any | None:
    try:
        import zstandard
    except ImportError:  # pragma: no cover - optional peer
        return None
    return zstandard


def zstd_version() -> str | None:
    """The version of the ``zstandard`` module the zstd columns use; None when not installed."""
    z = _zstd()
    return None if z is None else str(z.__version__)


def _codes(x: np.ndarray, bits: int, rounding: str, rotated: bool, seed: int) -> np.ndarray:
    v = rotation.rotate(x, rotation.tensor_key(KEY, "w").key) if rotated else x
    return quantize(v, bits, rounding=rounding, seed=seed).codes


def code_stats(codes: np.ndarray, bits: int, *, zstd_level: int = 3) -> Row:
    """Bits per code of every coder on one array of codes (see the module docstring)."""
    n = max(int(codes.size), 1)
    counts = entropy.histogram(codes, bits)
    coded = entropy.encode_codes(codes, bits) if codes.size else b""
    row: Row = {
        "codes": int(codes.size),
        "entropy": entropy.empirical_entropy(counts),
        "rans": 8.0 * len(coded) / n,
        "rans_table_bytes": entropy.coded_size_estimate(counts).table if codes.size else 0,
        "packed": float(bits),
    }
    row["rans_over_entropy"] = row["rans"] / row["entropy"] - 1 if row["entropy"] > 0 else None
    z = _zstd()
    if z is not None:
        c = z.ZstdCompressor(level=zstd_level)
        packed = pack(np.ascontiguousarray(codes, dtype=np.uint8), bits).tobytes()
        row["zstd_packed"] = 8.0 * len(c.compress(packed)) / n
        row["zstd_bytes_per_code"] = 8.0 * len(c.compress(codes.tobytes())) / n
    return row


def entropy_efficiency(
    *,
    sources: Sequence[str] = SOURCES,
    bits: Sequence[int] = BITS,
    roundings: Sequence[str] = ("nearest", "stochastic"),
    rotated: Sequence[bool] = (False, True),
    n: int = 1 << 20,
    seed: int = 0,
) -> list[Row]:
    """Bits per code of rANS, packing and zstd against the codes' entropy, per configuration."""
    rows: list[Row] = []
    for src in sources:
        x = get_density(src).sample(n, seed)
        for rot in rotated:
            for rnd in roundings:
                for b in bits:
                    codes = _codes(x, b, rnd, rot, seed)
                    rows.append(
                        {"source": src, "rotation": rot, "rounding": rnd, "bits": b}
                        | code_stats(codes, b)
                    )
    return rows


def entropy_weight_efficiency(
    state: Mapping[str, np.ndarray],
    model: str,
    *,
    bits: Sequence[int] = BITS,
    rounding: str = "stochastic",
    rotated: Sequence[bool] = (False, True),
    seed: int = 0,
) -> list[Row]:
    """Per layer: bits per code of each coder; then one ``layer="(payload)"`` row per
    configuration with the bytes of the encoded state, packed and with ``entropy="rans"``."""
    from fedquant.tools.bench.weights import quantizable_layers

    rows: list[Row] = []
    layers = quantizable_layers(state)
    for rot in rotated:
        for b in bits:
            for name, w in layers.items():
                codes = _codes(w.reshape(-1), b, rounding, rot, seed)
                rows.append(
                    {
                        "model": model,
                        "layer": name,
                        "rotation": rot,
                        "rounding": rounding,
                        "bits": b,
                    }
                    | code_stats(codes, b)
                )
            spec = QuantSpec(default_bits=b, rounding=rounding, rotation=rot)  # type: ignore[arg-type]
            packed = len(encode(state, spec, seed=seed, shared_key=KEY))
            coded = len(encode(state, spec.with_(entropy="rans"), seed=seed, shared_key=KEY))
            rows.append(
                {
                    "model": model,
                    "layer": "(payload)",
                    "rotation": rot,
                    "rounding": rounding,
                    "bits": b,
                    "payload_packed": packed,
                    "payload_rans": coded,
                    "saving": 1.0 - coded / packed,
                }
            )
    return rows


def entropy_speed(
    *,
    n: int = 10_000_000,
    bits: Sequence[int] = (2, 4, 8),
    rounding: str = "nearest",
    reps: int = 7,
    seed: int = 0,
) -> list[Row]:
    """rANS encode/decode throughput on Gaussian codes, as a ratio to a float32 memcpy."""
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    dst = np.empty_like(x)
    z = _zstd()
    rows: list[Row] = []
    for b in bits:
        q = quantize(x, b, rounding=rounding, seed=seed)
        codes = q.codes
        coded = entropy.encode_codes(codes, b)
        steps = 2.0 * q.scales.astype(np.float64) / ((1 << b) - 1)
        ops: dict[str, Callable[[], Any]] = {
            "rans encode": partial(entropy.encode_codes, codes, b),
            "rans decode (codes)": partial(entropy.decode_codes, coded, b, n),
            "rans decode (levels)": partial(
                entropy.decode_codes, coded, b, n, steps=steps, row_len=n
            ),
            "packed dequantize": partial(dequantize, q),
        }
        if z is not None:
            packed = q.packed.tobytes()
            cz = z.ZstdCompressor(level=3)
            blob = cz.compress(packed)
            dz = z.ZstdDecompressor()
            ops["zstd-3 compress (packed)"] = partial(cz.compress, packed)
            ops["zstd decompress (packed)"] = partial(dz.decompress, blob)
        for name, op in ops.items():
            m = measure(op, {"memcpy": partial(np.copyto, dst, x)}, reps=reps)
            rows.append(
                {
                    "op": name,
                    "bits": b,
                    "n": n,
                    "seconds": m["seconds"],
                    "mcodes_per_s": n / m["seconds"] / 1e6,
                    "ratio_memcpy": m["ratio"]["memcpy"],
                    "bpc": 8.0 * len(coded) / n if name.startswith("rans") else None,
                }
            )
    return rows
