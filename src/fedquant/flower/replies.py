"""Screening of the replies a ServerApp receives, before any Flower strategy sees them.

Flower's FedAvg family refuses a whole round (``InconsistentMessageReplies``)
when one reply differs from the others in shape: another number of records,
other ArrayRecord or MetricRecord keys, no weight key. One misbehaving or
outdated client would then end the run. These functions sort the replies
instead: each one is *kept* or *rejected with a reason*, so that what reaches
the wrapped strategy is always consistent.

Everything here reads Messages and returns plain results; logging and
aggregation are the strategy's (:mod:`fedquant.flower.quantized_strategy`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from flwr.app import Message, MetricRecord

from fedquant.quant.codec import DecodedUpdate

__all__ = [
    "Kept",
    "Rejection",
    "ReplyKeys",
    "Triage",
    "common_metric_keys",
    "metric_signature",
    "mse_mismatch",
    "record_keys",
    "split_errors",
    "strip_prefix",
    "weight_problem",
]

#: relative tolerance between an MSE in the MetricRecord and the one in the payload
#: (the mod writes the payload's value; the payload stores it as float32)
MSE_RTOL = 1e-6


@dataclass(frozen=True)
class Rejection:
    """A reply that will not be aggregated, and why (one line)."""

    node: int
    reason: str

    def __str__(self) -> str:
        return f"node {self.node}: {self.reason}"


@dataclass(frozen=True)
class Triage:
    """Replies sorted: those that go on (``kept``) and the ``rejected`` ones."""

    kept: list[Message]
    rejected: list[Rejection]


@dataclass(frozen=True)
class Kept:
    """Which candidates go on (``positions``, in order) and the ``rejected`` ones."""

    positions: list[int]
    rejected: list[Rejection]


@dataclass(frozen=True)
class ReplyKeys:
    """The record keys of a well-formed reply: its ArrayRecord (``None`` for an evaluate
    reply) and its MetricRecord."""

    arrays: str | None
    metrics: str


def node_of(msg: Message) -> int:
    """The id of the SuperNode that sent ``msg``."""
    return int(msg.metadata.src_node_id)


def split_errors(replies: Iterable[Message]) -> Triage:
    """The replies with content (kept) and the rejections of the error replies."""
    kept: list[Message] = []
    rejected: list[Rejection] = []
    for msg in replies:
        if msg.has_error():
            rejected.append(Rejection(node_of(msg), f"error reply: {msg.error.reason}"))
        else:
            kept.append(msg)
    return Triage(kept, rejected)


def record_keys(msg: Message, *, need_arrays: bool) -> ReplyKeys | str:
    """The record keys of a well-formed reply, else the reason it is malformed.

    A train reply (``need_arrays``) must hold exactly one ArrayRecord and one
    MetricRecord; an evaluate reply exactly one MetricRecord.
    """
    arrays = list(msg.content.array_records)
    metrics = list(msg.content.metric_records)
    if len(metrics) != 1 or (need_arrays and len(arrays) != 1):
        what = f"{len(arrays)} ArrayRecord(s) and " if need_arrays else ""
        want = "one ArrayRecord (the model) and one MetricRecord" if need_arrays else "one"
        return f"the reply holds {what}{len(metrics)} MetricRecord(s); expected {want}"
    return ReplyKeys(arrays[0] if need_arrays else None, metrics[0])


def strip_prefix(metrics: MetricRecord, prefix: str) -> MetricRecord:
    """A copy of ``metrics`` without the entries whose key starts with ``prefix``."""
    return MetricRecord({k: v for k, v in metrics.items() if not k.startswith(prefix)})


def mse_mismatch(metrics: MetricRecord, update: DecodedUpdate, prefix: str) -> str | None:
    """Why the MetricRecord's ``<prefix><tensor>`` entries disagree with the payload, or None.

    The mod writes one entry per quantized tensor, equal to the MSE inside the
    payload; a reply without them (or with other values) did not come from
    ``fedquant_mod``, or was altered after it.
    """
    claimed = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    quantized = {name: info.mse for name, info in update.info.items() if info.quantized}
    if set(claimed) != set(quantized):
        missing = sorted(set(quantized) - set(claimed))
        extra = sorted(set(claimed) - set(quantized))
        return (
            f"its MetricRecord's {prefix}* entries do not match the payload (missing "
            f"{missing}, unexpected {extra}): the reply did not come unchanged from "
            "fedquant_mod (does every SuperNode run it, from the same fedquant version?)"
        )
    for name, mse in quantized.items():
        value = claimed[name]
        if (
            isinstance(value, list)
            or not math.isfinite(float(value))
            or not math.isclose(float(value), float(mse), rel_tol=MSE_RTOL, abs_tol=0.0)
        ):
            return (
                f"its MetricRecord says {prefix}{name} = {value!r} but the payload says "
                f"{float(mse)!r}"
            )
    return None


def weight_problem(metrics: Mapping[str, object], key: str) -> str | None:
    """Why ``metrics[key]`` cannot weight a reply, or None.

    It must be one finite number > 0: a weight of 0 adds nothing, and replies
    whose weights are all 0 would make Flower's weighted means divide by zero.
    """
    if key not in metrics:
        return f"its MetricRecord has no {key!r}, which the strategy weights by"
    value = metrics[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        return f"its MetricRecord's {key!r} is {value!r}; expected one number > 0"
    return None


def metric_signature(metrics: Mapping[str, object]) -> frozenset[tuple[str, int | None]]:
    """The keys of a MetricRecord with the length of each list value (None for a number).

    Flower averages metrics key by key, list entries element by element:
    replies must agree on this signature.
    """
    return frozenset((k, len(v) if isinstance(v, list) else None) for k, v in metrics.items())


def common_metric_keys(
    candidates: Sequence[tuple[int, frozenset[tuple[str, int | None]]]],
) -> Kept:
    """Keep the replies whose MetricRecord has the most common :func:`metric_signature`.

    ``candidates`` are ``(node, signature)`` in reply order. Ties go to the
    signature seen first.
    """
    if not candidates:
        return Kept([], [])
    counts = Counter(sig for _, sig in candidates)
    best = max(counts.values())
    reference = next(sig for _, sig in candidates if counts[sig] == best)
    ref_keys = {k for k, _ in reference}
    kept: list[int] = []
    rejected: list[Rejection] = []
    for i, (node, sig) in enumerate(candidates):
        if sig == reference:
            kept.append(i)
            continue
        keys = {k for k, _ in sig}
        if keys != ref_keys:
            reason = (
                f"its MetricRecord keys differ from the other replies' (missing "
                f"{sorted(ref_keys - keys)}, unexpected {sorted(keys - ref_keys)})"
            )
        else:
            odd = sorted(k for k, n in sig - reference)
            reason = f"its MetricRecord entries {odd} are lists of another length than the others'"
        rejected.append(Rejection(node, reason))
    return Kept(kept, rejected)
