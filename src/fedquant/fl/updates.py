"""Update quantization with error feedback: clients upload ``w_i - w_global``, not ``w_i``.

With ``upload="delta"`` (``--upload delta``) a client quantizes its update

    u_i = (w_i - w_start) + e_i          (e_i = 0 without error feedback)

where ``w_start`` is the model it received this round, uploads ``Q(u_i)``, and
with error feedback (``--error-feedback``; Seide et al., Interspeech 2014;
Karimireddy et al., ICML 2019) keeps the residual

    e_i <- u_i - Q(u_i)

for its next upload, so that quantization errors are sent later instead of
lost: the sum of what a client transmitted differs from the sum of its true
updates by its current residual only, instead of by the sum of all its errors.

Which tensors are deltas
------------------------
Exactly the tensors the spec quantizes (``TensorPlan.quantized``): conv and
linear weights by default. Every other tensor (float32 biases, BatchNorm
weights and running statistics, integer counters such as
``num_batches_tracked``) travels as its *value*, as with weight upload --
float32 values are exact, and averaging counters as values keeps them
integers. The payload says which is which without new fields: its metadata
holds ``"kind": "delta"`` (:data:`KIND_KEY`) and, in such a payload, a tensor
is a delta if and only if it is quantized (:attr:`TensorInfo.quantized`).

The server aggregates the payloads with the usual
:func:`~fedquant.fl.aggregation.aggregate_payloads` and :func:`apply_delta`
adds the aggregated deltas to *its* float model (and takes the aggregated
values of the other tensors). With a quantized downlink the clients' start
model is the dequantized broadcast, so the server's model does not absorb the
downlink's quantization error (with weight upload it does).

Memory
------
Error feedback is stateful by nature: one float32 copy of the quantized tensors
per client that has taken part (the paper's CNN: 81,848 weights, 327 KB per
client; 100 clients, 33 MB), kept in
:attr:`fedquant.fl.simulation.RunState.residuals` and in every checkpoint.
Residuals are never reset: a client sampled again after many rounds adds its
old residual.

Every function here is pure (no state, no randomness beyond the given seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedquant.choices import StrChoice
from fedquant.errors import InvalidInputError
from fedquant.quant import codec
from fedquant.quant.codec import EncodeResult, TensorInfo
from fedquant.quant.quantizer import SeedLike
from fedquant.quant.spec import QuantSpec

__all__ = [
    "DELTA",
    "KIND_KEY",
    "WEIGHTS",
    "DeltaUpload",
    "Upload",
    "apply_delta",
    "delta_names",
    "encode_delta",
    "make_delta",
    "payload_delta_names",
    "residual",
]

#: payload metadata key that says what the payload carries
KIND_KEY = "kind"


class Upload(StrChoice):
    """What clients quantize and send: their weights (the paper) or their update."""

    WEIGHTS = "weights"
    DELTA = "delta"


#: ``meta["kind"]`` of an update payload (absent from weight payloads)
DELTA = Upload.DELTA.value
#: what a payload without ``meta["kind"]`` carries
WEIGHTS = Upload.WEIGHTS.value


def delta_names(spec: QuantSpec, tensors: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The tensors of ``tensors`` that ``spec`` quantizes, i.e. travel as deltas, in order."""
    plans = spec.resolve(
        {n: (np.shape(a), np.asarray(a).dtype.kind == "f") for n, a in tensors.items()}
    )
    return tuple(n for n, p in plans.items() if p.quantized)


def make_delta(
    local: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    names: Sequence[str],
    residual: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """What a client encodes: ``local - start (+ residual)`` for ``names``, ``local`` elsewhere.

    Float32 arithmetic; the order of ``local`` is kept. A missing residual entry counts as 0.
    """
    missing = [n for n in names if n not in local or n not in start]
    if missing:
        raise InvalidInputError(f"make_delta: tensors {missing} are missing from local or start")
    delta_set = set(names)
    out: dict[str, np.ndarray] = {}
    for name, w in local.items():
        if name not in delta_set:
            out[name] = np.asarray(w)
            continue
        u = np.asarray(w, dtype=np.float32) - np.asarray(start[name], dtype=np.float32)
        if residual is not None and name in residual:
            u = u + np.asarray(residual[name], dtype=np.float32)
        out[name] = u
    return out


def residual(
    sent: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], names: Sequence[str]
) -> dict[str, np.ndarray]:
    """``sent - received`` (float32) for ``names``: the error feedback ``e = u - Q(u)``."""
    return {
        n: np.asarray(sent[n], dtype=np.float32) - np.asarray(received[n], dtype=np.float32)
        for n in names
    }


def apply_delta(
    global_state: Mapping[str, np.ndarray],
    aggregated: Mapping[str, np.ndarray],
    names: Sequence[str],
) -> dict[str, np.ndarray]:
    """The new global model: ``global + aggregated`` for ``names``, ``aggregated`` elsewhere.

    The sum is taken in float64 and stored in the global tensor's dtype.
    """
    delta_set = set(names)
    unknown = delta_set - set(aggregated)
    if unknown or set(aggregated) != set(global_state):
        raise InvalidInputError(
            f"apply_delta: the aggregate's tensors {sorted(aggregated)} do not match the global "
            f"model's {sorted(global_state)}"
        )
    out: dict[str, np.ndarray] = {}
    for name, g in global_state.items():
        a = aggregated[name]
        if name in delta_set:
            g_arr = np.asarray(g)
            out[name] = (g_arr.astype(np.float64) + np.asarray(a, dtype=np.float64)).astype(
                g_arr.dtype
            )
        else:
            out[name] = np.asarray(a)
    return out


def payload_delta_names(infos: Sequence[Mapping[str, TensorInfo]]) -> tuple[str, ...]:
    """The delta tensors of update payloads (the quantized ones); all payloads must agree."""
    if not infos:
        return ()
    names = tuple(n for n, i in infos[0].items() if i.quantized)
    for j, info in enumerate(infos[1:], start=1):
        other = tuple(n for n, i in info.items() if i.quantized)
        if other != names:
            raise InvalidInputError(
                f"apply_delta: payload #{j} quantizes {list(other)} but payload #0 quantizes "
                f"{list(names)}; every client must use the same spec"
            )
    return names


@dataclass(frozen=True)
class DeltaUpload:
    """A client's encoded update and its error-feedback state after sending it.

    Attributes
    ----------
    result : EncodeResult
        The payload (``meta["kind"] == "delta"``) and its measurements.
    residual : dict of str to np.ndarray
        ``u - Q(u)`` per delta tensor (empty without error feedback).
    names : tuple of str
        The tensors sent as deltas.
    """

    result: EncodeResult
    residual: dict[str, np.ndarray] = field(default_factory=dict)
    names: tuple[str, ...] = ()


def encode_delta(
    local: Mapping[str, np.ndarray],
    start: Mapping[str, np.ndarray],
    spec: QuantSpec,
    *,
    seed: SeedLike,
    meta: Mapping[str, Any] | None = None,
    residual_in: Mapping[str, np.ndarray] | None = None,
    error_feedback: bool = False,
    shared_key: int | None = None,
) -> DeltaUpload:
    """Encode ``local - start (+ residual_in)`` and, with error feedback, the new residual.

    ``Q(u)`` is what the server will decode (:func:`fedquant.quant.codec.decode`
    of the payload itself), so ``residual_in + (local - start)`` equals what
    was received plus the returned residual, up to float32 rounding.
    ``shared_key`` is passed to the codec (specs that rotate need it).
    """
    names = delta_names(spec, local)
    u = make_delta(local, start, names, residual_in if error_feedback else None)
    result = codec.encode_with_stats(
        u, spec, seed=seed, meta={**(meta or {}), KIND_KEY: DELTA}, shared_key=shared_key
    )
    if not error_feedback:
        return DeltaUpload(result=result, names=names)
    received = codec.decode(result.payload, shared_key=shared_key).tensors
    return DeltaUpload(result=result, residual=residual(u, received, names), names=names)
