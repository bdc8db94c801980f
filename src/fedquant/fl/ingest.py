"""Server-side admission of client payloads: every reply is checked before it is aggregated.

Used by the simulator and the Flower strategy alike. A payload is *rejected*
(with a logged, one-line reason; the round goes on without it) when:

* it is larger than ``max_bytes`` (default: 2x the float32 size of the model
  plus 64 KiB -- no honest encoding is bigger);
* it does not decode (:class:`~fedquant.errors.DecodeError`: truncated,
  corrupted, NaN/Inf scales or MSE, non-finite float32 values, ...);
* its tensor names, shapes or dtypes differ from the global model's;
* the same client id was already accepted in this round (duplicates);
* it carries another kind of upload than the server expects (metadata
  ``"kind": "delta"`` -- an update, :mod:`fedquant.fl.updates` -- where
  weights are expected, or the reverse);

A low claimed MSE is not a reason to reject: an honest client whose weights sit
near the quantization grid (a model sent quantized and trained for a few steps,
rounded to nearest) measures far below ``D**2/12``, so no threshold separates a
liar from it. What a low (or zero) claim buys is bounded in the aggregation
instead: :func:`fedquant.fl.aggregation.floored_claims` raises a claim below
:func:`~fedquant.fl.aggregation.plausible_mse` to the median client's claim (or to
that floor), a relative floor follows, and every client's weight is capped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedquant.errors import DecodeError
from fedquant.fl.updates import KIND_KEY, WEIGHTS
from fedquant.quant import codec
from fedquant.quant.codec import DecodedUpdate

log = logging.getLogger("fedquant.server")

_FLOATS = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class Reference:
    """What a valid update must look like: name -> (shape, is_floating), in order."""

    tensors: dict[str, tuple[tuple[int, ...], bool]]
    float32_nbytes: int  # floats as float32, integers at their own size

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray]) -> Reference:
        arrays = {k: np.asarray(v) for k, v in state.items()}
        t = {k: (tuple(int(d) for d in a.shape), a.dtype.kind == "f") for k, a in arrays.items()}
        nbytes = sum(
            a.size * (4 if a.dtype.kind == "f" else a.dtype.itemsize) for a in arrays.values()
        )
        return cls(t, int(nbytes))

    def default_max_bytes(self) -> int:
        return 2 * self.float32_nbytes + (64 << 10)


@dataclass(frozen=True)
class Admission:
    """The outcome for one payload: the inspected update, or the reason it was refused."""

    client: str
    update: DecodedUpdate | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.update is not None


def admit(
    client: str,
    payload: bytes,
    ref: Reference,
    *,
    max_bytes: int | None = None,
    seen: set[str] | None = None,
    kind: str = WEIGHTS,
    shared_key: int | None = None,
) -> Admission:
    """Check one payload against ``ref``; never raises for bad payloads.

    ``kind`` is the upload the server expects: ``"weights"`` (payloads without
    ``meta["kind"]``) or ``"delta"``. ``shared_key`` is the round's rotation
    key: rotated tensors made with another key are rejected.
    """
    limit = ref.default_max_bytes() if max_bytes is None else max_bytes

    def reject(reason: str) -> Admission:
        log.warning("rejected update from client %s: %s", client, reason)
        return Admission(client, None, reason)

    if seen is not None and client in seen:
        return reject("duplicate client id in this round")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        return reject(f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > limit:
        return reject(f"payload of {len(payload)} bytes exceeds the limit of {limit}")
    try:
        upd = codec.describe_payload(payload, shared_key=shared_key)
    except DecodeError as e:
        return reject(str(e))
    got = upd.meta.get(KIND_KEY, WEIGHTS)
    if got != kind:
        return reject(
            f"payload carries {got!r} (metadata {KIND_KEY!r}) but this server aggregates "
            f"{kind!r}; client and server must agree on the upload (--upload {kind})"
        )
    names = list(upd.info)
    if names != list(ref.tensors):
        missing = sorted(set(ref.tensors) - set(names))
        extra = sorted(set(names) - set(ref.tensors))
        return reject(
            f"tensor names differ from the model's (missing {missing}, unexpected {extra})"
        )
    for name, info in upd.info.items():
        shape, floating = ref.tensors[name]
        if info.shape != shape:
            return reject(f"tensor {name!r} has shape {info.shape}; the model's is {shape}")
        if (info.dtype in _FLOATS) != floating:
            return reject(
                f"tensor {name!r} has dtype {info.dtype}, which does not match the model's"
            )
    if seen is not None:
        seen.add(client)
    return Admission(client, upd)
