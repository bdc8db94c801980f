"""QuantizedFedAvg: Flower's FedAvg round loop with fedquant's codec and aggregation rules.

The strategy only adapts records: it tells clients how to quantize (train
``ConfigRecord``), optionally quantizes the broadcast, and hands the clients'
payloads to :func:`fedquant.fl.aggregation.aggregate_payloads` -- the function
the simulator uses -- so both runtimes compute the same global model from the
same payloads, bit for bit.

Pair it with :func:`fedquant.flower.fedquant_mod` in the ClientApp.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedquant.errors import DecodeError, FedquantError
from fedquant.fl.aggregation import (
    MSE_FLOOR_REL,
    AggregationRule,
    aggregate_payloads,
    parse_rule,
)
from fedquant.fl.ingest import Admission, Reference, admit
from fedquant.fl.robust import BYZANTINE_FRACTION, NORM_BOUND, TRIM_FRACTION, byzantine_count
from fedquant.fl.seeding import Purpose, rotation_key, seed_sequence
from fedquant.flower.records import (
    UplinkConfig,
    numpy_from_record,
    payload_from_record,
    payload_record,
    record_from_numpy,
)
from fedquant.quant import codec
from fedquant.quant.codec import DecodedUpdate
from fedquant.quant.spec import QuantSpec

__all__ = ["QuantizedFedAvg"]


def _as_spec(spec: QuantSpec | str) -> QuantSpec:
    return spec if isinstance(spec, QuantSpec) else QuantSpec.from_strings(bits=spec)


class QuantizedFedAvg(FedAvg):
    """Federated averaging of clipped, quantized client models (arXiv 2405.13365).

    Parameters
    ----------
    uplink : QuantSpec or str, default "8"
        How clients quantize their upload (a string is the paper's notation,
        e.g. ``"4-2-2-4"`` or ``"2"``; see :class:`~fedquant.quant.spec.QuantSpec`).
    aggregation : {"inverse-mse", "fedavg", "mean", "median", "trimmed-mean", "krum", \
"multi-krum"}, default "inverse-mse"
        How the server combines clients (:mod:`fedquant.fl.aggregation`). Only
        ``fedavg`` uses ``num-examples``; with the other rules clients report
        ``num-examples = 1`` (see :func:`~fedquant.flower.fedquant_mod`) and
        client metrics are plain means.
    downlink : QuantSpec or str, optional
        If given, the global model is broadcast quantized with this spec
        (nearest or stochastic rounding as the spec says). The server keeps
        the float model; clients train from the dequantized one. Default: the
        broadcast is float32.
    seed : int, default 0
        Run seed. The broadcast of the model produced by round ``r`` uses the
        stream ``(seed, DOWNLINK, r + 1)`` -- so the evaluation broadcast after
        round ``r`` is byte-identical to the training broadcast of round
        ``r + 1``; client ``k`` rounds its upload in round ``r`` with
        ``(seed, UPLINK, r, k)``.
    max_weight : float, optional
        Cap on any client's weight for any tensor (``cap_weights``).
    mse_floor_rel : float, default 1e-2
        Relative MSE floor of ``inverse-mse`` (:mod:`fedquant.fl.aggregation`).
    norm_bound : float, default :data:`fedquant.fl.robust.NORM_BOUND`
        A client's update of a tensor (its model minus the model sent to it)
        longer than this many times the median client's is left out of that
        tensor's aggregate; 0 = no bound (:mod:`fedquant.fl.robust`).
    trim_fraction : float, default :data:`fedquant.fl.robust.TRIM_FRACTION`
        ``trimmed-mean``: fraction of clients dropped from each end.
    byzantine_fraction : float, default :data:`fedquant.fl.robust.BYZANTINE_FRACTION`
        ``krum``/``multi-krum``: fraction of the replies assumed Byzantine.
    **fedavg_kwargs
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_available_nodes``, ``train_metrics_aggr_fn``, ...).

    Notes
    -----
    Every reply goes through the simulator's admission check
    (:func:`fedquant.fl.ingest.admit`, against the model sent this round): a
    reply whose ArrayRecord is not one valid fedquant payload of the right
    tensors is rejected (logged, not aggregated) and the round goes on with
    the others. For ``fedavg`` the weight is the ``num_examples`` the client
    wrote into its payload (the mod copies it from ``num-examples``), as in
    the simulator.
    Aggregated train metrics gain ``fedquant.uplink-bytes`` (payload bytes
    aggregated this round), ``fedquant.downlink-bytes`` (bytes of the train
    broadcast, all recipients) and ``fedquant.clients`` (replies aggregated).
    """

    def __init__(
        self,
        uplink: QuantSpec | str = "8",
        *,
        aggregation: AggregationRule | str = AggregationRule.INVERSE_MSE,
        downlink: QuantSpec | str | None = None,
        seed: int = 0,
        max_weight: float | None = None,
        mse_floor_rel: float = MSE_FLOOR_REL,
        norm_bound: float = NORM_BOUND,
        trim_fraction: float = TRIM_FRACTION,
        byzantine_fraction: float = BYZANTINE_FRACTION,
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(**fedavg_kwargs)
        self.norm_bound = norm_bound
        self.trim_fraction = trim_fraction
        self.byzantine_fraction = byzantine_fraction
        self._sent: dict[str, np.ndarray] | None = None  # the model the clients train from
        self.uplink = UplinkConfig(
            spec=_as_spec(uplink), aggregation=parse_rule(aggregation), seed=seed
        )
        self.downlink = None if downlink is None else _as_spec(downlink)
        self.max_weight = max_weight
        self.mse_floor_rel = mse_floor_rel
        self._reference: Reference | None = None
        self._downlink_bytes = 0

    @property
    def aggregation(self) -> AggregationRule:
        return self.uplink.aggregation

    @property
    def seed(self) -> int:
        return self.uplink.seed

    def summary(self) -> None:
        """Log the FedAvg settings and the quantization settings."""
        super().summary()
        log(INFO, "\t└──> fedquant:")
        log(INFO, "\t\t├── Uplink: %s", self.uplink.spec.to_dict())
        down = "float32" if self.downlink is None else self.downlink.to_dict()
        log(INFO, "\t\t├── Downlink: %s", down)
        log(INFO, "\t\t├── Aggregation: %s", self.aggregation.value)
        log(INFO, "\t\t└── Seed: %d", self.seed)

    # ------------------------------------------------------------------ downlink

    def broadcast(self, arrays: ArrayRecord, stream_round: int) -> ArrayRecord:
        """The record sent to clients: ``arrays`` itself, or its downlink payload.

        ``stream_round`` selects the rounding stream ``(seed, DOWNLINK,
        stream_round)``; the payload's metadata is ``{"round": stream_round}``
        (the simulator's broadcast).
        """
        if self.downlink is None:
            return arrays
        payload = codec.encode(
            numpy_from_record(arrays),
            self.downlink,
            seed=seed_sequence(self.seed, Purpose.DOWNLINK, stream_round),
            meta={"round": stream_round},
        )
        return payload_record(payload)

    def _with_instructions(self, config: ConfigRecord) -> ConfigRecord:
        """A copy of ``config`` with the ``fedquant.*`` entries (they overwrite same-named ones)."""
        out = ConfigRecord(dict(config))
        for key, value in self.uplink.to_config().items():
            out[key] = value
        return out

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's sampling, plus fedquant's instructions and the optional quantized broadcast."""
        model = numpy_from_record(arrays)
        self._reference = Reference.from_state(model)
        sent = self.broadcast(arrays, server_round)
        self._sent = (
            model if self.downlink is None else codec.decode(payload_from_record(sent)).tensors
        )
        messages = list(
            super().configure_train(server_round, sent, self._with_instructions(config), grid)
        )
        self._downlink_bytes = sent.count_bytes() * len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """FedAvg's evaluation round with the same broadcast as the next training round."""
        if self.fraction_evaluate == 0.0:
            return []
        return super().configure_evaluate(
            server_round,
            self.broadcast(arrays, server_round + 1),
            self._with_instructions(config),
            grid,
        )

    # ------------------------------------------------------------------ uplink

    def _admit(
        self, msg: Message, seen: set[str], shared_key: int | None = None
    ) -> tuple[bytes, Admission]:
        """The simulator's admission check (:func:`fedquant.fl.ingest.admit`) for one reply."""
        client = str(msg.metadata.src_node_id)
        if self._reference is None:
            raise FedquantError(
                "QuantizedFedAvg.aggregate_train: configure_train was not called, so there "
                "is no model to check replies against"
            )
        (record,) = msg.content.array_records.values()
        try:
            payload = payload_from_record(record)
        except DecodeError as e:
            log(WARNING, "aggregate_train: rejected the reply of node %s: %s", client, e)
            return b"", Admission(client, None, str(e))
        adm = admit(client, payload, self._reference, seen=seen, shared_key=shared_key)
        if not adm.ok:  # admit logs to "fedquant.server"; say it where Flower users look too
            log(WARNING, "aggregate_train: rejected the reply of node %s: %s", client, adm.reason)
        return payload, adm

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Admit the replies' payloads and aggregate them with ``aggregation``.

        Returns ``(None, None)`` if no reply was admitted (FedAvg's convention:
        the global model stays as it was).
        """
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        fedavg = self.aggregation is AggregationRule.FEDAVG
        payloads: list[bytes] = []
        inspected: list[DecodedUpdate] = []
        sizes: list[int] = []
        contents: list[RecordDict] = []
        seen: set[str] = set()
        key = rotation_key(self.seed, server_round)  # the round's uplink rotation (as the mod's)
        for msg in valid:
            payload, adm = self._admit(msg, seen, key)
            if adm.update is None:
                continue
            if fedavg:
                n = adm.update.meta.get("num_examples")
                if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                    log(
                        WARNING,
                        "aggregate_train: rejected the reply of node %s: fedavg needs "
                        "'num_examples' (an int >= 0) in the payload metadata, got %r",
                        adm.client,
                        n,
                    )
                    continue
                sizes.append(n)
            payloads.append(payload)
            inspected.append(adm.update)
            contents.append(msg.content)
        if not payloads:
            return None, None

        result = aggregate_payloads(
            payloads,
            self.aggregation,
            num_examples=sizes if fedavg else None,
            max_weight=self.max_weight,
            mse_floor_rel=self.mse_floor_rel,
            inspected=inspected,
            shared_key=key,
            reference=self._sent,
            norm_bound=self.norm_bound,
            trim_fraction=self.trim_fraction,
            byzantine=byzantine_count(len(payloads), self.byzantine_fraction),
        )
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics["fedquant.uplink-bytes"] = int(result.nbytes)
        metrics["fedquant.downlink-bytes"] = int(self._downlink_bytes)
        metrics["fedquant.clients"] = len(payloads)
        return record_from_numpy(result.tensors), metrics
