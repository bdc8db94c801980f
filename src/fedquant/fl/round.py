"""What one simulated round produces, step by step, as named records.

:meth:`fedquant.fl.simulation.Simulation.run_round` runs a round as six steps
(sample, broadcast, local work, admit, aggregate, evaluate); each hands the next
one of the records below, and the round ends in a :class:`RoundRecord`. Its
:meth:`RoundRecord.to_row` is the row of the results directory's
``metrics.jsonl`` (and of :attr:`fedquant.fl.simulation.RunState.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedquant.fl.task import TrainStats
from fedquant.quant.codec import DecodedUpdate

__all__ = [
    "Admitted",
    "AggregateSummary",
    "Broadcast",
    "ClientUpload",
    "LocalWork",
    "Reply",
    "RoundRecord",
    "Sample",
    "TrainedClient",
]


@dataclass(frozen=True)
class Sample:
    """Step 1: the round's sampled clients (sorted ids) and those among them that fail."""

    clients: np.ndarray
    failed: np.ndarray

    @property
    def working(self) -> list[int]:
        """The sampled clients that do not fail, in order: those that train and upload."""
        failed = set(self.failed.tolist())
        return [int(c) for c in self.clients if int(c) not in failed]


@dataclass(frozen=True)
class Broadcast:
    """Step 2: what the server sends in round ``round`` and what the later steps share.

    Attributes
    ----------
    round : int
        The round (1-based).
    payload : bytes
        The downlink payload.
    start : mapping of str to numpy.ndarray
        The model the clients start from: the payload decoded (the global model
        itself when the broadcast is float32).
    shared_key : int or None
        The round's rotation key, which rotated uplink tensors must carry.
    """

    round: int
    payload: bytes
    start: Mapping[str, np.ndarray]
    shared_key: int | None = None


@dataclass(frozen=True)
class TrainedClient:
    """A client trained ahead of its upload (several at once, :mod:`fedquant.fl.batched`)."""

    state: dict[str, np.ndarray]
    stats: TrainStats


@dataclass(frozen=True)
class ClientUpload:
    """Step 3, per client: what its local work produced.

    Attributes
    ----------
    client : int
        The client's id.
    payload : bytes
        Its honest uplink payload.
    loss : float
        Its mean training loss.
    train_seconds : float
        Time spent training it here (0 when it was trained ahead, see
        :class:`TrainedClient`).
    """

    client: int
    payload: bytes
    loss: float
    train_seconds: float


@dataclass(frozen=True)
class LocalWork:
    """Step 3: the round's uploads in client order, the seconds spent training, and those
    spent outside training (loading states and encoding)."""

    uploads: list[ClientUpload]
    train_seconds: float
    codec_seconds: float


@dataclass(frozen=True)
class Reply:
    """What reaches the server from one client: its honest payload, or a hostile client's
    corruption or poisoned model (a duplicating client sends two)."""

    client: int
    client_id: str
    payload: bytes
    loss: float


@dataclass
class Admitted:
    """Step 4: the replies the server admitted, and why it refused the others."""

    payloads: list[bytes] = field(default_factory=list)
    updates: list[DecodedUpdate] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    #: per admitted payload, the examples its client disclosed (FedAvg only; else empty)
    num_examples: list[int] = field(default_factory=list)
    #: client id -> why its reply was refused
    rejected: dict[str, str] = field(default_factory=dict)
    #: bytes of every reply, admitted or not
    received_bytes: int = 0
    replies: int = 0


@dataclass(frozen=True)
class AggregateSummary:
    """Step 5: what the aggregation of a round that updated the model reports.

    Attributes
    ----------
    clients : int
        Payloads aggregated.
    norm_outliers : int
        Clients the norm bound left out of some tensor.
    bits : dict of str to float, optional
        Per quantized tensor, the clients' mean width (set only under a bit budget).
    mse : dict of str to float
        Per quantized tensor, the clients' mean quantization MSE.
    max_weight_used : float
        The largest aggregation weight any client got for any tensor.
    """

    clients: int
    norm_outliers: int
    bits: dict[str, float] | None
    mse: dict[str, float]
    max_weight_used: float


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One round's outcome: traffic, admission, aggregation, test scores and timings.

    ``aggregate`` is ``None`` when fewer than ``min_clients`` replies were admitted
    (``skipped`` then says so and the global model is unchanged); ``test`` is empty
    in rounds that are not evaluated.
    """

    round: int
    clients_sampled: int
    clients_failed: int
    #: client id -> why its reply was refused
    rejected: dict[str, str]
    uplink_bytes: int
    downlink_bytes: int
    uplink_float32_bytes: int
    train_loss: float
    aggregate: AggregateSummary | None
    skipped: str | None
    #: the task's test metrics (``{"loss": ..., "accuracy": ...}``)
    test: dict[str, float]
    cum_uplink_bytes: int
    cum_downlink_bytes: int
    seconds_train: float
    seconds_codec: float
    seconds_eval: float
    seconds_round: float

    @property
    def clients_rejected(self) -> int:
        return len(self.rejected)

    @property
    def clients_aggregated(self) -> int:
        return 0 if self.aggregate is None else self.aggregate.clients

    @property
    def uplink_ratio(self) -> float:
        """Float32 bytes of the replies over the bytes sent (NaN when nothing was sent)."""
        return self.uplink_float32_bytes / self.uplink_bytes if self.uplink_bytes else math.nan

    def to_row(self) -> dict[str, Any]:
        """The row of ``metrics.jsonl``: flat keys, optional ones only when they apply."""
        row: dict[str, Any] = {
            "round": self.round,
            "clients_sampled": self.clients_sampled,
            "clients_failed": self.clients_failed,
            "clients_rejected": self.clients_rejected,
            "clients_aggregated": self.clients_aggregated,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "uplink_float32_bytes": self.uplink_float32_bytes,
            "train_loss": self.train_loss,
        }
        if self.rejected:
            row["rejected"] = dict(self.rejected)
        agg = self.aggregate
        if agg is not None:
            if agg.norm_outliers:
                row["norm_outliers"] = agg.norm_outliers
            if agg.bits is not None:
                row["bits"] = agg.bits
            row["mse"] = agg.mse
            row["max_weight_used"] = agg.max_weight_used
        else:
            row["skipped"] = self.skipped
        row["uplink_ratio"] = self.uplink_ratio
        for metric, value in self.test.items():
            row[f"test_{metric}"] = value
        row["cum_uplink_bytes"] = self.cum_uplink_bytes
        row["cum_downlink_bytes"] = self.cum_downlink_bytes
        row["seconds_train"] = self.seconds_train
        row["seconds_codec"] = self.seconds_codec
        row["seconds_eval"] = self.seconds_eval
        row["seconds_round"] = self.seconds_round
        return row
