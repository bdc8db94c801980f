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

Model poisoning (:data:`ATTACKS`, :func:`attack`): Byzantine clients that
train honestly, then send a well-formed payload of adversarial values,
quantized with the run's uplink spec (so its metadata, MSE included, is what
an honest encoder measures on those values). Every attack acts on the
floating tensors; integer tensors are sent as trained. A client's *update*
is its tensor minus the global model it started from (for the delta tensors
of ``upload="delta"``, the tensor itself):

=================  ==========================================================
``scale-1e3``      the payload's tensors x 1e3 (the model, or the delta)
``scale-1e6``      the payload's tensors x 1e6
``sign-flip``      the update reversed: ``-u``
``gaussian``       an update of pure noise, ``N(0, rms(w)**2)`` per tensor,
                   ``w`` the attacker's trained tensor (noise as large as the
                   weights themselves), seeded per round and client
``alie``           "a little is enough" (Baruch et al., NeurIPS 2019): every
                   attacker sends ``mu - z sigma`` per coordinate, ``mu`` and
                   ``sigma`` the mean and standard deviation of the round's
                   honest updates, ``z`` from the number of clients and of
                   attackers (:func:`alie_z`)
=================  ==========================================================

``alie`` needs statistics of the honest updates. In the simulator the
attackers collude and see every sampled client's honest update of the round
(the omniscient setting of Baruch et al.; with only their own updates they
would estimate the same statistics less precisely): the strongest version of
the attack.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import numpy as np

from fedquant.errors import ConfigError
from fedquant.quant import codec, wire
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


#: model-poisoning attacks (well-formed payloads of adversarial values)
ATTACKS = ("scale-1e3", "scale-1e6", "sign-flip", "gaussian", "alie")
#: attacks that need the round's honest updates (the simulator collects them first)
ROUND_ATTACKS = ("alie",)
_SCALES = {"scale-1e3": 1e3, "scale-1e6": 1e6}


def alie_z(n: int, attackers: int) -> float:
    """Baruch et al.'s ``z_max`` for ``n`` clients of which ``attackers`` collude.

    ``s = floor(n/2 + 1) - attackers`` honest clients must be "won over";
    ``z = Phi^-1((n - s) / n)``, the largest shift that keeps the attackers'
    value closer to the mean than ``s`` honest values are. ``s`` is raised to
    1 (``z`` then at most ``Phi^-1(1 - 1/n)``); 0 for ``n = 1``.
    """
    if n < 1 or not 0 <= attackers <= n:
        raise ConfigError("hostile_mode", f"alie: {attackers} attackers of {n} clients")
    s = max(1, n // 2 + 1 - attackers)
    p = (n - s) / n
    return NormalDist().inv_cdf(p) if p > 0 else 0.0


def _is_float(a: np.ndarray) -> bool:
    return np.asarray(a).dtype.kind == "f"


def attack(
    mode: str,
    tensors: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    *,
    deltas: frozenset[str] | set[str] = frozenset(),
    rng: np.random.Generator | None = None,
    honest: Sequence[Mapping[str, np.ndarray]] = (),
    z: float = 0.0,
) -> dict[str, np.ndarray]:
    """The tensors a client in attack ``mode`` sends instead of its honest ``tensors``.

    Parameters
    ----------
    mode : one of :data:`ATTACKS`
    tensors : mapping
        What the client would honestly send (its model, or for ``deltas`` its update).
    start : mapping
        The global model it started from.
    deltas : set of str
        The tensors that travel as updates (``upload="delta"``).
    rng : numpy.random.Generator
        For ``gaussian``.
    honest : sequence of mapping
        For ``alie``: the round's honest payload tensors (same convention as ``tensors``).
    z : float
        For ``alie`` (:func:`alie_z`).
    """
    if mode not in ATTACKS:
        raise ConfigError("hostile_mode", f"{mode!r} is unknown; expected one of {ATTACKS}")

    def update(name: str, t: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.asarray(t[name], dtype=np.float64)
        return x if name in deltas else x - np.asarray(start[name], dtype=np.float64)

    out: dict[str, np.ndarray] = {}
    for name, x in tensors.items():
        x = np.asarray(x)
        if not _is_float(x):
            out[name] = x
            continue
        base = 0.0 if name in deltas else np.asarray(start[name], dtype=np.float64)
        if mode in _SCALES:
            y = _SCALES[mode] * x.astype(np.float64)
        elif mode == "sign-flip":
            y = base - update(name, tensors)
        elif mode == "gaussian":
            if rng is None:
                raise ConfigError("hostile_mode", "gaussian needs a random generator")
            w = update(name, tensors) + np.asarray(start[name], dtype=np.float64)  # trained
            sigma = float(np.sqrt(np.mean(w * w))) if w.size else 0.0
            y = base + rng.normal(0.0, sigma, size=x.shape)
        else:  # alie
            if not honest:
                raise ConfigError("hostile_mode", "alie needs the round's honest updates")
            us = np.stack([update(name, h) for h in honest])
            y = base + us.mean(axis=0) - z * us.std(axis=0)
        out[name] = np.asarray(y, dtype=x.dtype)
    return out


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
    layout = wire.walk(payload)
    recs = layout.records if layout is not None else ()
    if mode == "nan-scale":
        r = next((r for r in recs if r.n_scales), None)
        if r is not None:
            struct.pack_into("<f", buf, r.scales_at, float("nan"))
        return wire.reseal(buf)
    if mode == "nan-values":
        r = next((r for r in recs if r.kind == wire.KIND_FLOAT and r.data_len >= 4), None)
        if r is not None:
            struct.pack_into("<f", buf, r.data_at, float("inf"))
        return wire.reseal(buf)
    if mode in ("zero-mse", "tiny-mse", "negative-mse", "nan-mse"):
        value = {"zero-mse": 0.0, "tiny-mse": 1e-30, "negative-mse": -1.0, "nan-mse": float("nan")}[
            mode
        ]
        for r in recs:
            struct.pack_into("<d", buf, r.mse_at, value)
        return wire.reseal(buf)
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
