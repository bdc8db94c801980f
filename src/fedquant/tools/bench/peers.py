"""Peer compressors, written for the benchmark from their papers (NumPy, seeded).

Each peer is a pair of pure functions ``encode(x, bits, rng) -> Encoded`` and
``decode(Encoded) -> x_hat`` registered in :data:`PEERS`. ``Encoded`` holds
the arrays the peer would transmit and counts the bits of its payload with
the packing the paper assumes (fixed-length codes, float32 side information;
no entropy coding), so ``payload_bits / n`` is the true bits per coordinate.
The arrays themselves are kept unpacked (one code per byte): these are
reference implementations for error measurements, vectorized but not tuned
for speed -- :func:`torch_qint8` (PyTorch's fused C++ quantizer) is the tuned
peer of the speed benchmark.

=====================  ==============================================================
name                   what it is
=====================  ==============================================================
``qsgd``               QSGD (Alistarh et al., NeurIPS 2017): ``||v|| sign(v_i) xi_i``,
                       ``xi_i`` stochastic on ``s = 2**(b-1) - 1`` levels of ``[0, 1]``
                       (1 sign bit + ``b-1`` level bits), one L2 norm for the vector.
``qsgd-512``           the same with one norm per bucket of 512 coordinates.
``terngrad``           TernGrad (Wen et al., NeurIPS 2017): ``max|v| sign(v_i) b_i``,
                       ``b_i ~ Bernoulli(|v_i| / max|v|)``; 2-bit codes.
``terngrad-clip``      TernGrad with the paper's gradient clipping at ``2.5 sigma``
                       first (biased, lower variance).
``minmax``             stochastic uniform quantization between ``min(v)`` and
                       ``max(v)`` on ``2**b`` levels: TensorFlow Federated's default
                       compression (8 bits, tensors over 20,000 elements).
``rotation``           Suresh et al., "Distributed Mean Estimation with Limited
                       Communication" (ICML 2017), pi_srk: a randomized Hadamard
                       rotation ``H D / sqrt(d)`` (``d`` padded to a power of two), then
                       ``minmax`` on the rotated vector.
``signsgd``            signSGD (Bernstein et al., ICML 2018), 1 bit; decoded with the
                       MSE-optimal scale ``mean|v|`` (the "scaled sign" of
                       Karimireddy et al., ICML 2019).
``topk``               top-k sparsification at *equal bits*: ``k`` float32 values and
                       ``ceil(log2 n)``-bit indices, ``k = floor(b n / (32 + ceil(log2 n)))``.
``torch-qint8``        ``torch.quantize_per_tensor`` to qint8 with min-max scale and
                       nearest rounding (8 bits only).
``hadamard-octav``     not a peer: the ``rotation`` peer's Hadamard rotation followed by
                       fedquant's quantizer (OCTAV, stochastic) -- a reference for
                       fedquant's own ``QuantSpec(rotation=True)``.
=====================  ==============================================================
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedquant.errors import InvalidInputError
from fedquant.quant.quantizer import dequantize, quantize
from fedquant.tools.bench.registry import lookup

FLOAT_BITS = 32


@dataclass(frozen=True, eq=False)
class Encoded:
    """What a peer transmits for one vector of ``n`` coordinates.

    Attributes
    ----------
    peer : str
        The peer's name.
    n : int
        Number of coordinates of the original (flat) vector.
    payload_bits : int
        Bits the payload occupies with fixed-length codes and float32 side information.
    arrays : dict of str to np.ndarray
        Codes, indices or values (unpacked).
    params : dict of str to Any
        Scalars needed to decode (norms, min/max, the rotation seed...).
    """

    peer: str
    n: int
    payload_bits: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_coord(self) -> float:
        return self.payload_bits / max(self.n, 1)


Encoder = Callable[[np.ndarray, int, np.random.Generator], Encoded]
Decoder = Callable[[Encoded], np.ndarray]


@dataclass(frozen=True)
class Peer:
    """A registered peer: its functions, the bit widths it supports, whether it is unbiased."""

    name: str
    encode: Encoder
    decode: Decoder
    bits: tuple[int, ...]
    unbiased: bool
    cite: str


def _flat32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))


def _stochastic_floor(t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``floor(t) + Bernoulli(frac(t))`` in place on float32 ``t`` (unbiased rounding)."""
    f = np.floor(t)
    u = rng.random(t.size, dtype=np.float32)
    t -= f
    f += u < t
    return f


# --------------------------------------------------------------------------- QSGD


def qsgd_levels(bits: int) -> int:
    """QSGD's ``s`` at ``bits`` bits per coordinate: 1 sign bit and ``bits - 1`` level bits."""
    if bits < 2:
        raise InvalidInputError(f"qsgd: bits={bits}; QSGD needs at least 2 (sign + level)")
    return (1 << (bits - 1)) - 1


def _qsgd_encode(x: np.ndarray, bits: int, rng: np.random.Generator, bucket: int) -> Encoded:
    v = _flat32(x)
    n = v.size
    s = qsgd_levels(bits)
    nb = max(1, -(-n // bucket))
    padded = np.zeros(nb * bucket, dtype=np.float32)
    padded[:n] = v
    rows = padded.reshape(nb, bucket)
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64)).astype(np.float32)
    inv = np.where(norms > 0, s / np.where(norms > 0, norms, 1.0), 0.0).astype(np.float32)
    t = np.abs(rows) * inv[:, None]
    levels = _stochastic_floor(t.reshape(-1), rng).reshape(nb, bucket)
    codes = (np.sign(rows) * levels).astype(np.int8).reshape(-1)[:n]
    return Encoded(
        "qsgd",
        n,
        n * bits + FLOAT_BITS * nb,
        {"codes": codes, "norms": norms},
        {"s": s, "bucket": bucket},
    )


def qsgd_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """QSGD with one L2 norm for the whole vector."""
    v = _flat32(x)
    return _qsgd_encode(v, bits, rng, max(v.size, 1))


def qsgd_bucket_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """QSGD with one L2 norm per bucket of 512 coordinates (the paper's bucketing)."""
    return _qsgd_encode(x, bits, rng, 512)


def qsgd_decode(e: Encoded) -> np.ndarray:
    s, bucket = e.params["s"], e.params["bucket"]
    norms = e.arrays["norms"]
    scale = np.repeat(norms / np.float32(s), bucket)[: e.n]
    return e.arrays["codes"].astype(np.float32) * scale


# --------------------------------------------------------------------------- TernGrad


def _terngrad(x: np.ndarray, bits: int, rng: np.random.Generator, clip: float | None) -> Encoded:
    if bits != 2:
        raise InvalidInputError(f"terngrad: bits={bits}; TernGrad sends 2-bit ternary codes")
    v = _flat32(x)
    if clip is not None and v.size:
        sigma = float(np.std(v, dtype=np.float64))
        v = np.clip(v, -clip * sigma, clip * sigma)
    st = float(np.max(np.abs(v))) if v.size else 0.0
    p = np.abs(v) / np.float32(st) if st > 0 else np.zeros_like(v)
    b = rng.random(v.size, dtype=np.float32) < p
    codes = (np.sign(v) * b).astype(np.int8)
    return Encoded("terngrad", v.size, 2 * v.size + FLOAT_BITS, {"codes": codes}, {"scale": st})


def terngrad_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """TernGrad with the max-norm scaler (unbiased)."""
    return _terngrad(x, bits, rng, None)


def terngrad_clip_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """TernGrad after clipping at 2.5 standard deviations (the paper's Sec. 3.3)."""
    return _terngrad(x, bits, rng, 2.5)


def terngrad_decode(e: Encoded) -> np.ndarray:
    return e.arrays["codes"].astype(np.float32) * np.float32(e.params["scale"])


# --------------------------------------------------------------------------- min-max


def _minmax_codes(
    v: np.ndarray, bits: int, rng: np.random.Generator
) -> tuple[np.ndarray, float, float]:
    lo = float(v.min()) if v.size else 0.0
    hi = float(v.max()) if v.size else 0.0
    steps = (1 << bits) - 1
    if hi > lo:
        t = (v - np.float32(lo)) * np.float32(steps / (hi - lo))
        np.clip(t, 0.0, steps, out=t)
        codes = np.minimum(_stochastic_floor(t, rng), steps).astype(np.uint8)
    else:
        codes = np.zeros(v.size, dtype=np.uint8)
    return codes, lo, hi


def _minmax_values(codes: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    steps = (1 << bits) - 1
    step = (hi - lo) / steps if hi > lo else 0.0
    lut = (lo + np.arange(steps + 1, dtype=np.float64) * step).astype(np.float32)
    return lut[codes]


def minmax_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """Stochastic uniform quantization between the vector's min and max."""
    v = _flat32(x)
    codes, lo, hi = _minmax_codes(v, bits, rng)
    return Encoded(
        "minmax",
        v.size,
        v.size * bits + 2 * FLOAT_BITS,
        {"codes": codes},
        {"lo": lo, "hi": hi, "bits": bits},
    )


def minmax_decode(e: Encoded) -> np.ndarray:
    return _minmax_values(e.arrays["codes"], e.params["lo"], e.params["hi"], e.params["bits"])


# --------------------------------------------------------------------------- rotation


def fwht(a: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform of a power-of-two-length vector, in place."""
    n = a.size
    if n & (n - 1):
        raise InvalidInputError(f"fwht: length {n} is not a power of two")
    h = 1
    tmp = np.empty(n // 2, dtype=a.dtype)
    while h < n:
        y = a.reshape(-1, 2, h)
        t = tmp.reshape(-1, h)
        np.copyto(t, y[:, 0, :])
        y[:, 0, :] += y[:, 1, :]
        np.subtract(t, y[:, 1, :], out=y[:, 1, :])
        h *= 2
    return a


def _signs(seed: int, n: int) -> np.ndarray:
    """The random diagonal ``D`` (+-1), regenerated by the receiver from a shared seed."""
    bits = np.random.default_rng(seed).integers(0, 2, n, dtype=np.int8)
    return (2 * bits - 1).astype(np.float32)


def rotate(v: np.ndarray, seed: int) -> np.ndarray:
    """``H D v / sqrt(d)`` with ``v`` zero-padded to ``d = 2**ceil(log2 n)`` (orthonormal)."""
    d = 1 << max(0, math.ceil(math.log2(max(v.size, 1))))
    y = np.zeros(d, dtype=np.float32)
    y[: v.size] = v
    y *= _signs(seed, d)
    fwht(y)
    y *= np.float32(1.0 / math.sqrt(d))
    return y


def unrotate(y: np.ndarray, seed: int, n: int) -> np.ndarray:
    """Inverse of :func:`rotate` (``D H y / sqrt(d)``), first ``n`` coordinates."""
    z = np.array(y, dtype=np.float32, copy=True)
    fwht(z)
    z *= np.float32(1.0 / math.sqrt(z.size))
    z *= _signs(seed, z.size)
    return z[:n]


def rotation_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """Suresh et al.'s pi_srk: randomized Hadamard rotation, then min-max stochastic quantization."""
    v = _flat32(x)
    seed = int(rng.integers(0, 2**63))
    y = rotate(v, seed)
    codes, lo, hi = _minmax_codes(y, bits, rng)
    return Encoded(
        "rotation",
        v.size,
        y.size * bits + 2 * FLOAT_BITS + 64,  # + the 64-bit rotation seed
        {"codes": codes},
        {"lo": lo, "hi": hi, "bits": bits, "seed": seed},
    )


def rotation_decode(e: Encoded) -> np.ndarray:
    y = _minmax_values(e.arrays["codes"], e.params["lo"], e.params["hi"], e.params["bits"])
    return unrotate(y, e.params["seed"], e.n)


def hadamard_octav_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """The rotation above, then fedquant's quantizer (OCTAV threshold, stochastic rounding)."""
    v = _flat32(x)
    seed = int(rng.integers(0, 2**63))
    y = rotate(v, seed)
    q = quantize(y, bits, rounding="stochastic", seed=rng)
    return Encoded(
        "hadamard-octav",
        v.size,
        8 * q.nbytes + 64,
        {"packed": q.packed},
        {"q": q, "seed": seed},
    )


def hadamard_octav_decode(e: Encoded) -> np.ndarray:
    return unrotate(dequantize(e.params["q"]), e.params["seed"], e.n)


# --------------------------------------------------------------------------- sign, top-k


def signsgd_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """signSGD: one sign bit per coordinate, plus ``mean|v|`` as the decoding scale."""
    if bits != 1:
        raise InvalidInputError(f"signsgd: bits={bits}; signSGD sends 1 bit per coordinate")
    v = _flat32(x)
    scale = float(np.mean(np.abs(v), dtype=np.float64)) if v.size else 0.0
    return Encoded("signsgd", v.size, v.size + FLOAT_BITS, {"signs": v >= 0}, {"scale": scale})


def signsgd_decode(e: Encoded) -> np.ndarray:
    s = np.float32(e.params["scale"])
    return np.where(e.arrays["signs"], s, -s).astype(np.float32)


def topk_count(n: int, bits: int) -> int:
    """``k`` such that ``k`` (float32 value, ``ceil(log2 n)``-bit index) pairs fit ``bits * n``."""
    index_bits = max(1, math.ceil(math.log2(max(n, 2))))
    return min(n, (bits * n) // (FLOAT_BITS + index_bits))


def topk_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """Top-k sparsification with the same bit budget as ``bits`` bits per coordinate."""
    v = _flat32(x)
    n = v.size
    k = topk_count(n, bits)
    idx = np.argpartition(np.abs(v), n - k)[n - k :] if 0 < k < n else np.arange(k)
    idx = np.sort(idx).astype(np.int64)
    index_bits = max(1, math.ceil(math.log2(max(n, 2))))
    return Encoded(
        "topk",
        n,
        k * (FLOAT_BITS + index_bits) + FLOAT_BITS,
        {"index": idx, "values": v[idx]},
        {"k": k},
    )


def topk_decode(e: Encoded) -> np.ndarray:
    out = np.zeros(e.n, dtype=np.float32)
    out[e.arrays["index"]] = e.arrays["values"]
    return out


# --------------------------------------------------------------------------- torch


def torch_qint8_encode(x: np.ndarray, bits: int, rng: np.random.Generator) -> Encoded:
    """``torch.quantize_per_tensor`` to qint8, scale ``(max - min)/255``, nearest rounding."""
    import torch

    if bits != 8:
        raise InvalidInputError(f"torch-qint8: bits={bits}; qint8 is 8 bits")
    v = _flat32(x)
    t = torch.from_numpy(v)
    lo = min(float(v.min()), 0.0) if v.size else 0.0
    hi = max(float(v.max()), 0.0) if v.size else 0.0
    scale = (hi - lo) / 255.0 or 1.0
    zero = round(-128 - lo / scale)
    with warnings.catch_warnings():  # deprecated in torch 2.13, still the fused CPU path
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*", category=UserWarning)
        q = torch.quantize_per_tensor(t, scale, max(-128, min(127, zero)), torch.qint8)
    return Encoded("torch-qint8", v.size, 8 * v.size + 2 * FLOAT_BITS, {}, {"q": q})


def torch_qint8_decode(e: Encoded) -> np.ndarray:
    return e.params["q"].dequantize().numpy()


def torch_qint8(x: np.ndarray) -> np.ndarray:
    """Round trip through :func:`torch_qint8_encode` (for the speed table)."""
    return torch_qint8_decode(torch_qint8_encode(x, 8, np.random.default_rng(0)))


#: every peer, by name
PEERS: dict[str, Peer] = {
    p.name: p
    for p in (
        Peer("qsgd", qsgd_encode, qsgd_decode, (2, 3, 4, 8), True, "Alistarh et al., NeurIPS 2017"),
        Peer(
            "qsgd-512",
            qsgd_bucket_encode,
            qsgd_decode,
            (2, 3, 4, 8),
            True,
            "Alistarh et al., NeurIPS 2017 (buckets of 512)",
        ),
        Peer("terngrad", terngrad_encode, terngrad_decode, (2,), True, "Wen et al., NeurIPS 2017"),
        Peer(
            "terngrad-clip",
            terngrad_clip_encode,
            terngrad_decode,
            (2,),
            False,
            "Wen et al., NeurIPS 2017 (clipped at 2.5 sigma)",
        ),
        Peer(
            "minmax",
            minmax_encode,
            minmax_decode,
            (1, 2, 3, 4, 8),
            True,
            "min-max stochastic (TensorFlow Federated's default at 8 bits)",
        ),
        Peer(
            "rotation",
            rotation_encode,
            rotation_decode,
            (1, 2, 3, 4, 8),
            True,
            "Suresh et al., ICML 2017 (randomized Hadamard + min-max)",
        ),
        Peer("signsgd", signsgd_encode, signsgd_decode, (1,), False, "Bernstein et al., ICML 2018"),
        Peer("topk", topk_encode, topk_decode, (1, 2, 3, 4, 8), False, "top-k at equal bits"),
        Peer(
            "torch-qint8",
            torch_qint8_encode,
            torch_qint8_decode,
            (8,),
            False,
            "torch.quantize_per_tensor (min-max, nearest)",
        ),
        Peer(
            "hadamard-octav",
            hadamard_octav_encode,
            hadamard_octav_decode,
            (1, 2, 3, 4, 8),
            False,
            "reference: Hadamard rotation + fedquant OCTAV (stochastic)",
        ),
    )
}


def get_peer(name: str) -> Peer:
    """The peer called ``name``; :class:`InvalidInputError` lists the known names."""
    return lookup(PEERS, name, "peer")
