"""Hostile and buggy clients, for robustness tests and demonstrations.

:func:`corrupt` turns an honest payload into what a hostile or buggy client
would send. The modes cover the failure classes the server must survive
(:mod:`fedquant.fl.ingest`, :mod:`fedquant.fl.aggregation`):

=================  ==========================================================
``nan-scale``      a clipping threshold set to NaN (checksum fixed)
``nan-values``     a float32 tensor's values set to NaN/Inf (checksum fixed)
``zero-mse``       every tensor claims MSE 0 (would take all inverse-MSE weight)
``tiny-mse``       every tensor claims MSE 1e-30
``negative-mse``   every tensor claims MSE -1
``nan-mse``        every tensor claims MSE NaN
``huge-examples``  claims 10**12 training examples (FedAvg)
``wrong-name``     a tensor renamed
``wrong-shape``    a tensor reshaped
``wrong-dtype``    an integer tensor sent as float
``oversized``      the payload padded far beyond any honest size
``truncated``      the payload cut short
``duplicate``      the same client id replies twice (handled by the caller)
=================  ==========================================================

Byzantine clients that send well-formed but adversarial weights with honest-
looking metadata are *not* modelled: inverse-MSE and FedAvg are not robust
aggregators against them (norm bounding or trimmed means would be needed).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import numpy as np

from fedquant.errors import ConfigError
from fedquant.quant import codec
from fedquant.quant.grid import Rounding
from fedquant.quant.spec import QuantSpec

MODES = (
    "nan-scale",
    "nan-values",
    "zero-mse",
    "tiny-mse",
    "negative-mse",
    "nan-mse",
    "huge-examples",
    "wrong-name",
    "wrong-shape",
    "wrong-dtype",
    "oversized",
    "truncated",
    "duplicate",
)


def _records(payload: bytes) -> Iterator[dict[str, int]]:
    """Offsets of each record's fields in a valid payload (scale, mse, data)."""
    meta_len = struct.unpack_from("<I", payload, 20)[0]
    pos = 24 + meta_len
    count = struct.unpack_from("<I", payload, 16)[0]
    for _ in range(count):
        (name_len,) = struct.unpack_from("<H", payload, pos)
        fixed = pos + 2 + name_len
        kind, ndim = payload[fixed + 1], payload[fixed + 6]
        dims = fixed + 8
        nsc = dims + 8 * ndim
        (n_scales,) = struct.unpack_from("<I", payload, nsc)
        scales = nsc + 4
        mse = scales + 4 * n_scales
        data_len_at = mse + 8
        (data_len,) = struct.unpack_from("<Q", payload, data_len_at)
        data = data_len_at + 8
        yield {
            "kind": kind,
            "scales": scales,
            "n_scales": n_scales,
            "mse": mse,
            "data": data,
            "data_len": data_len,
        }
        pos = data + data_len


def _fix(buf: bytearray) -> bytes:
    return codec.reseal(buf)


def _reencode(payload: bytes, edit: str, shared_key: int | None = None) -> bytes:
    dec = codec.decode(payload, shared_key=shared_key)
    t = dict(dec.tensors)
    name = next(n for n, a in t.items() if a.ndim >= 2)
    if edit == "wrong-name":
        t = {("evil." + n if n == name else n): a for n, a in t.items()}
    elif edit == "wrong-shape":
        t[name] = t[name].reshape(-1)
    else:
        ints = [n for n, a in t.items() if a.dtype.kind in "iub"]
        if ints:
            t[ints[0]] = t[ints[0]].astype(np.float32)
        else:
            t[name] = t[name].astype(np.float16)
    return codec.encode(t, QuantSpec(default_bits=8, rounding=Rounding.NEAREST), meta=dec.meta)


def corrupt(payload: bytes, mode: str, *, shared_key: int | None = None) -> bytes:
    """What a hostile client in ``mode`` sends instead of the honest ``payload``.

    ``shared_key`` decodes rotated payloads (the modes that re-encode).
    """
    if mode not in MODES:
        raise ConfigError(
            "hostile_mode", f"{mode!r} is unknown; expected one of: {', '.join(MODES)}"
        )
    buf = bytearray(payload)
    recs = list(_records(payload))
    if mode == "nan-scale":
        r = next((r for r in recs if r["n_scales"]), None)
        if r is not None:
            struct.pack_into("<f", buf, r["scales"], float("nan"))
        return _fix(buf)
    if mode == "nan-values":
        r = next((r for r in recs if r["kind"] == codec.KIND_FLOAT and r["data_len"] >= 4), None)
        if r is not None:
            struct.pack_into("<f", buf, r["data"], float("inf"))
        return _fix(buf)
    if mode in ("zero-mse", "tiny-mse", "negative-mse", "nan-mse"):
        value = {"zero-mse": 0.0, "tiny-mse": 1e-30, "negative-mse": -1.0, "nan-mse": float("nan")}[
            mode
        ]
        for r in recs:
            struct.pack_into("<d", buf, r["mse"], value)
        return _fix(buf)
    if mode == "huge-examples":
        dec = codec.decode(payload, shared_key=shared_key)
        meta = {**dec.meta, "num_examples": 10**12}
        return codec.encode(
            dec.tensors, QuantSpec(default_bits=8, rounding=Rounding.NEAREST), meta=meta
        )
    if mode in ("wrong-name", "wrong-shape", "wrong-dtype"):
        return _reencode(payload, mode, shared_key)
    if mode == "oversized":
        return payload + bytes(4 * len(payload) + (1 << 20))
    if mode == "truncated":
        return payload[: len(payload) // 2]
    return payload  # duplicate: the payload itself is honest
