"""QuantizedStrategy: fedquant's quantized uplink (and downlink) around any Flower strategy.

Flower's convention for a cross-cutting feature is a wrapper that takes the
strategy as its first argument (its differential-privacy wrappers do so);
this one adds clipped uniform quantization (arXiv 2405.13365)::

    strategy = QuantizedStrategy(FedAdam(eta=1e-2), uplink="4-2-2-4", aggregation="inverse-mse")

Who does what in a round:

``configure_train`` / ``configure_evaluate``
    The wrapped strategy samples the nodes and builds the messages from the
    float model (so its own state -- FedOpt's ``current_arrays``, FedAvgM's
    momentum -- sees the float model). The wrapper then adds its instructions
    to the ConfigRecord (``fedquant.*`` and ``server-round``) and, with a
    ``downlink`` spec, swaps the model record for a quantized broadcast.
``aggregate_train``
    The wrapper screens every reply first (:mod:`fedquant.flower.replies`):
    error replies, replies of the wrong shape, records that are not one
    fedquant payload, payloads that fail the simulator's admission check
    (:func:`fedquant.fl.ingest.admit`), MetricRecords whose ``fedquant.mse.*``
    entries disagree with the payload or whose keys differ from the others'.
    Each rejected reply is logged with its reason; none reaches a Flower
    consistency check, so a bad reply never ends the run. Then:

    * ``aggregation="strategy"``: the wrapper dequantizes every admitted
      payload and hands the wrapped strategy one plain reply per client (the
      decoded model and the client's MetricRecord); the wrapped strategy
      aggregates with its own rule -- FedAvg's ``num-examples`` weighting,
      FedTrimmedAvg's trimmed mean, FedMedian's median -- and applies its own
      optimizer step (FedAdam, FedYogi, FedAvgM).
    * a fedquant rule (``"inverse-mse"``, ``"fedavg"``, ``"mean"``, and any
      other rule :func:`fedquant.fl.aggregation.aggregate_payloads` knows):
      the aggregate is the simulator's, computed by ``aggregate_payloads`` from
      the payloads. The wrapped strategy receives that aggregate as a single
      reply (weight: the sum of the clients' weights; metrics: the clients'
      weighted means). Its weighted average of one reply is the aggregate
      itself, so FedAvg and FedProx return it unchanged, and FedAdam, FedYogi,
      FedAdagrad and FedAvgM take their optimizer step from it (``delta =
      aggregate - current model``). The train metrics reported are the
      strategy's own ``train_metrics_aggr_fn`` applied once to the admitted
      clients' MetricRecords.

    The result keeps the model's dtypes (FedOpt's arithmetic returns float64;
    integer tensors such as BatchNorm counters come back rounded).
``aggregate_evaluate``
    Error replies and replies whose MetricRecord is malformed or differs from
    the others' are dropped (logged); the wrapped strategy aggregates the rest.

Fail fast: :meth:`QuantizedStrategy.start` resolves the uplink and downlink
specs against the initial model before round 1 (a per-layer width list that
does not fit the model stops the run with a one-line
:class:`~fedquant.errors.ConfigError`), and a run in which no reply has been
admitted for ``max_silent_rounds`` consecutive rounds stops with
:class:`NoAdmittedRepliesError`, which quotes the last reasons.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Result,
    Strategy,
)
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedquant.errors import ConfigError, DecodeError, FedquantError
from fedquant.fl.aggregation import AggregationRule, aggregate_payloads
from fedquant.fl.ingest import Reference, admit
from fedquant.fl.seeding import Purpose, rotation_key, seed_sequence
from fedquant.flower.mod import MSE_PREFIX
from fedquant.flower.records import (
    UplinkConfig,
    numpy_from_record,
    payload_from_record,
    payload_record,
    record_from_numpy,
)
from fedquant.flower.replies import (
    Rejection,
    common_metric_keys,
    metric_signature,
    mse_mismatch,
    node_of,
    record_keys,
    split_errors,
    strip_prefix,
    weight_problem,
)
from fedquant.quant import codec
from fedquant.quant.allocation import plan_tensors
from fedquant.quant.codec import DecodedUpdate
from fedquant.quant.spec import QuantSpec

__all__ = ["NoAdmittedRepliesError", "QuantizedStrategy"]

#: Flower strategies whose rule only makes sense over many models: with a fedquant
#: rule they would see one aggregate (use ``aggregation="strategy"``)
ROBUST_STRATEGIES = (Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum)
#: arguments of ``aggregate_payloads`` the wrapper sets itself
_WRAPPER_SETS = frozenset(
    {"payloads", "rule", "num_examples", "inspected", "shared_key", "reference"}
)
#: how many rejection reasons the silent-rounds error quotes
_QUOTED_REASONS = 3


class NoAdmittedRepliesError(FedquantError):
    """No reply was admitted for too many consecutive rounds: the run cannot learn."""


def as_spec(spec: QuantSpec | str, option: str) -> QuantSpec:
    """A :class:`QuantSpec` from a spec or a bits string (``"4-2-2-4"``, ``"2"``)."""
    if isinstance(spec, QuantSpec):
        return spec
    try:
        return QuantSpec.from_strings(bits=spec)
    except ConfigError as e:
        raise ConfigError(option, str(e)) from None


def check_aggregation_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``options`` against the keyword arguments of ``aggregate_payloads``."""
    options = dict(options or {})
    params = inspect.signature(aggregate_payloads).parameters
    allowed = sorted(
        n for n, p in params.items() if p.kind is p.KEYWORD_ONLY and n not in _WRAPPER_SETS
    )
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ConfigError(
            "aggregation_options", f"unknown option(s) {unknown}; expected some of {allowed}"
        )
    return options


@dataclass(frozen=True)
class _Sent:
    """A round's messages as sent, and the bytes of the model they carry in all."""

    messages: list[Message]
    nbytes: int


@dataclass(frozen=True)
class _Admitted:
    """One admitted train reply."""

    msg: Message
    array_key: str
    metric_key: str
    metrics: MetricRecord  # without the fedquant.mse.* entries
    payload: bytes
    update: DecodedUpdate


class QuantizedStrategy(Strategy):
    """Any Flower strategy, with fedquant's quantized uplink and optional downlink.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The strategy to wrap (FedAvg, FedAdam, FedProx, FedTrimmedAvg, ...):
        it samples nodes and, with ``aggregation="strategy"``, aggregates.
    uplink : QuantSpec or str, default "8"
        How clients quantize their upload (``"4-2-2-4"``, ``"2"``, a
        :class:`~fedquant.quant.spec.QuantSpec`). A SuperNode may override the
        bits with ``--node-config 'fedquant-bits="2"'``.
    aggregation : str, default "inverse-mse"
        ``"strategy"``: the wrapped strategy aggregates the dequantized models
        with its own rule; any fedquant rule (``"inverse-mse"``, ``"fedavg"``,
        ``"mean"``, ...): :func:`fedquant.fl.aggregation.aggregate_payloads`
        computes the aggregate, which the wrapped strategy receives as its
        only reply (see the module docstring). Clients disclose their number
        of examples only for ``"fedavg"`` and ``"strategy"``.
    downlink : QuantSpec or str, optional
        If given, the model is broadcast quantized with this spec; the server
        keeps the float model. Default: float32 broadcast.
    seed : int, default 0
        Run seed: client ``k`` rounds its round-``r`` upload with the stream
        ``(seed, UPLINK, r, k)``; the broadcast of round ``r`` uses
        ``(seed, DOWNLINK, r)`` (the evaluation after round ``r`` sends the
        same bytes as training in round ``r + 1``).
    max_silent_rounds : int or None, default 3
        Stop the run (:class:`NoAdmittedRepliesError`) after this many
        consecutive rounds that sent messages but admitted no reply; ``None``
        never stops.
    aggregation_options : mapping, optional
        Keyword arguments passed on to ``aggregate_payloads`` with a fedquant
        rule (e.g. ``{"max_weight": 0.5}``); unknown names are refused.

    Notes
    -----
    With a fedquant rule, a Flower strategy whose rule needs many models
    (FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) would receive one;
    the constructor warns: use ``aggregation="strategy"`` with them.
    Aggregated train metrics gain ``fedquant.uplink-bytes`` (payload bytes
    admitted this round), ``fedquant.downlink-bytes`` (bytes of this round's
    train broadcast, all recipients), ``fedquant.clients`` (replies admitted),
    ``fedquant.rejected`` (replies refused) and ``fedquant.bits-min`` /
    ``fedquant.bits-max`` (narrowest and widest quantized tensor admitted).
    """

    def __init__(
        self,
        strategy: Strategy,
        uplink: QuantSpec | str = "8",
        *,
        aggregation: AggregationRule | str = AggregationRule.INVERSE_MSE,
        downlink: QuantSpec | str | None = None,
        seed: int = 0,
        max_silent_rounds: int | None = 3,
        aggregation_options: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise ConfigError(
                "strategy",
                f"expected a flwr.serverapp.strategy.Strategy such as FedAvg(), got "
                f"{type(strategy).__name__}",
            )
        if max_silent_rounds is not None and (
            isinstance(max_silent_rounds, bool)
            or not isinstance(max_silent_rounds, int)
            or max_silent_rounds < 1
        ):
            raise ConfigError(
                "max_silent_rounds", f"expected an integer >= 1 or None, got {max_silent_rounds!r}"
            )
        self.strategy = strategy
        self.uplink = UplinkConfig(
            spec=as_spec(uplink, "uplink"), aggregation=aggregation, seed=seed
        )
        self.downlink = None if downlink is None else as_spec(downlink, "downlink")
        self.max_silent_rounds = max_silent_rounds
        self.aggregation_options = check_aggregation_options(aggregation_options)
        if self.uplink.rule is not None and isinstance(strategy, ROBUST_STRATEGIES):
            log(
                WARNING,
                "QuantizedStrategy: %s with aggregation=%r sees one aggregate per round, so "
                "its own rule does nothing; pass aggregation='strategy' to apply it to the "
                "clients' models",
                type(strategy).__name__,
                self.aggregation,
            )
        self._reference: Reference | None = None
        self._start: dict[str, np.ndarray] | None = None  # the model the clients train from
        self._dtypes: dict[str, np.dtype] = {}
        self._downlink_bytes = 0
        self._sent = 0
        self._silent = 0
        self._last_rejections: list[Rejection] = []

    @property
    def aggregation(self) -> str:
        """``"strategy"`` or the fedquant rule's name."""
        return self.uplink.aggregation

    @property
    def seed(self) -> int:
        return self.uplink.seed

    # ------------------------------------------------------------------ the run

    def check_model(self, arrays: ArrayRecord) -> None:
        """Resolve the uplink and downlink specs against ``arrays`` (the model).

        Raises
        ------
        ConfigError
            If a spec does not fit the model, e.g. ``"4-2-2-4"`` on a model
            with two quantizable tensors (one line, naming the tensors).
        FedquantError
            If ``arrays`` cannot be read as NumPy arrays.
        """
        state = numpy_from_record(arrays)
        for option, spec in (("uplink", self.uplink.spec), ("downlink", self.downlink)):
            if spec is None:
                continue
            try:
                plan_tensors(state, spec)
            except ConfigError as e:
                raise ConfigError(
                    option, f"{e} (QuantizedStrategy, checked before round 1)"
                ) from None

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Any = None,
    ) -> Result:
        """Check the specs against ``initial_arrays``, then run Flower's round loop."""
        self.check_model(initial_arrays)
        self._silent = 0
        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_fn,
        )

    def summary(self) -> None:
        """Log the wrapped strategy's settings and the quantization settings."""
        log(INFO, "\t├──> Wrapped strategy: %s", type(self.strategy).__name__)
        self.strategy.summary()
        log(INFO, "\t└──> fedquant:")
        log(INFO, "\t\t├── Uplink: %s", self.uplink.spec.to_dict())
        down = "float32" if self.downlink is None else self.downlink.to_dict()
        log(INFO, "\t\t├── Downlink: %s", down)
        log(INFO, "\t\t├── Aggregation: %s %s", self.aggregation, self.aggregation_options or "")
        log(INFO, "\t\t├── Max silent rounds: %s", self.max_silent_rounds)
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

    def _with_instructions(self, config: ConfigRecord, server_round: int) -> ConfigRecord:
        """A copy of ``config`` with ``server-round`` and the ``fedquant.*`` entries."""
        out = ConfigRecord(dict(config))
        out["server-round"] = server_round
        for key, value in self.uplink.to_config().items():
            out[key] = value
        return out

    def _send(self, messages: Iterable[Message], arrays: ArrayRecord, stream_round: int) -> _Sent:
        """The messages with the model record replaced by the broadcast, and its bytes."""
        out = list(messages)
        if self.downlink is None or not out:
            return _Sent(out, arrays.count_bytes() * len(out))
        sent = self.broadcast(arrays, stream_round)
        names = set(arrays)
        done: set[int] = set()
        for msg in out:  # FedAvg's messages share one RecordDict
            content = msg.content
            if id(content) in done:
                continue
            done.add(id(content))
            for key, record in list(content.array_records.items()):
                if record is arrays or set(record) == names:
                    content[key] = sent
        return _Sent(out, sent.count_bytes() * len(out))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages, with fedquant's instructions (and broadcast)."""
        state = numpy_from_record(arrays)
        self._reference = Reference.from_state(state)
        self._dtypes = {k: v.dtype for k, v in state.items()}
        inner = self.strategy.configure_train(
            server_round, arrays, self._with_instructions(config, server_round), grid
        )
        sent = self._send(inner, arrays, server_round)
        messages, self._downlink_bytes = sent.messages, sent.nbytes
        # what the clients train from (the norm bound measures updates from it)
        self._start = (
            state
            if self.downlink is None
            else codec.decode(payload_from_record(self.broadcast(arrays, server_round))).tensors
        )
        self._sent = len(messages)
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's evaluation messages, with the next round's broadcast."""
        inner = self.strategy.configure_evaluate(
            server_round, arrays, self._with_instructions(config, server_round), grid
        )
        return self._send(inner, arrays, server_round + 1).messages

    # ------------------------------------------------------------------ uplink

    @property
    def _weight_key(self) -> str:
        return str(getattr(self.strategy, "weighted_by_key", "num-examples"))

    def _admit(self, msg: Message, ref: Reference, seen: set[str], key: int) -> _Admitted | str:
        """One train reply: admitted, or the reason it is not."""
        keys = record_keys(msg, need_arrays=True)
        if isinstance(keys, str):
            return keys
        array_key, metric_key = keys.arrays, keys.metrics
        if array_key is None:  # record_keys always names the ArrayRecord of a train reply
            return "the reply holds no ArrayRecord"
        try:
            payload = payload_from_record(msg.content.array_records[array_key])
        except DecodeError as e:
            return str(e)
        adm = admit(str(node_of(msg)), payload, ref, seen=seen, shared_key=key)
        if adm.update is None:
            return adm.reason
        if self.uplink.rule is AggregationRule.FEDAVG:
            n = adm.update.meta.get("num_examples")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                return (
                    f"fedavg needs 'num_examples' (an int > 0) in the payload metadata, got {n!r}"
                )
        metrics = msg.content.metric_records[metric_key]
        reason = mse_mismatch(metrics, adm.update, MSE_PREFIX) or weight_problem(
            metrics, self._weight_key
        )
        if reason is not None:
            return reason
        return _Admitted(
            msg, array_key, metric_key, strip_prefix(metrics, MSE_PREFIX), payload, adm.update
        )

    def _reject(self, stage: str, rejections: list[Rejection]) -> None:
        for r in rejections:
            log(WARNING, "%s: rejected the reply of %s", stage, r)

    def _screen_train(self, server_round: int, replies: Iterable[Message]) -> list[_Admitted]:
        if self._reference is None:
            raise FedquantError(
                "QuantizedStrategy.aggregate_train: configure_train was not called, so there "
                "is no model to check replies against"
            )
        triage = split_errors(replies)
        content, rejected = triage.kept, triage.rejected
        key = rotation_key(self.seed, server_round)  # the round's uplink rotation (as the mod's)
        seen: set[str] = set()
        admitted: list[_Admitted] = []
        for msg in content:
            outcome = self._admit(msg, self._reference, seen, key)
            if isinstance(outcome, str):
                rejected.append(Rejection(node_of(msg), outcome))
            else:
                admitted.append(outcome)
        agree = common_metric_keys(
            [(node_of(a.msg), metric_signature(a.metrics)) for a in admitted]
        )
        rejected.extend(agree.rejected)
        self._reject("aggregate_train", rejected)
        self._last_rejections = rejected
        return [admitted[i] for i in agree.positions]

    def _silent_round(self, server_round: int) -> None:
        """Count a round without admitted replies; stop the run after too many."""
        if self._sent == 0:  # nothing was asked: nothing to judge
            return
        self._silent += 1
        log(
            WARNING,
            "aggregate_train: no reply admitted in round %d (%d in a row); the model is unchanged",
            server_round,
            self._silent,
        )
        if self.max_silent_rounds is None or self._silent < self.max_silent_rounds:
            return
        reasons = "; ".join(str(r) for r in self._last_rejections[:_QUOTED_REASONS])
        raise NoAdmittedRepliesError(
            f"QuantizedStrategy: no reply was admitted in {self._silent} consecutive rounds "
            f"(rounds {server_round - self._silent + 1}-{server_round}); last reasons: "
            f"{reasons or 'no replies arrived'}. Is fedquant_mod in the ClientApp's mods, "
            "and do the SuperNodes run the server's fedquant version?"
        )

    def _to_model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """``arrays`` cast back to the model's dtypes (integers rounded)."""
        out: dict[str, np.ndarray] = {}
        changed = False
        for name, array in arrays.items():
            a = array.numpy()
            dtype = self._dtypes.get(name)
            if dtype is not None and a.dtype != dtype:
                changed = True
                a = np.rint(a).astype(dtype) if dtype.kind in "iub" else a.astype(dtype)
            out[name] = a
        return record_from_numpy(out) if changed else arrays

    def _inner_replies(self, server_round: int, admitted: list[_Admitted]) -> list[Message]:
        """What the wrapped strategy aggregates (see the module docstring)."""
        key = rotation_key(self.seed, server_round)
        if self.uplink.rule is None:  # the wrapped strategy weights the decoded models
            for a in admitted:
                decoded = codec.decode_inspected(a.update, shared_key=key).tensors
                a.msg.content = RecordDict(
                    {a.array_key: record_from_numpy(decoded), a.metric_key: a.metrics}
                )
            return [a.msg for a in admitted]
        fedavg = self.uplink.rule is AggregationRule.FEDAVG
        result = aggregate_payloads(
            [a.payload for a in admitted],
            self.uplink.rule,
            num_examples=[int(a.update.meta["num_examples"]) for a in admitted] if fedavg else None,
            inspected=[a.update for a in admitted],
            shared_key=key,
            reference=self._start,
            **self.aggregation_options,
        )
        weight_key = self._weight_key
        contents = [RecordDict({a.metric_key: a.metrics}) for a in admitted]
        # the one reply's metrics: the clients' weighted means, with the clients' keys, so
        # that the strategy's own metric function accepts them (its result is not reported:
        # aggregate_train reports that function applied once to the clients' records)
        metrics = aggregate_metricrecords(contents, weight_key)
        total = 0.0  # screened: every weight is one finite number > 0
        for a in admitted:
            total += float(cast(float, a.metrics[weight_key]))
        metrics[weight_key] = total
        first = admitted[0]
        first.msg.content = RecordDict(
            {first.array_key: record_from_numpy(result.tensors), first.metric_key: metrics}
        )
        return [first.msg]

    def _client_metrics(self, admitted: list[_Admitted]) -> MetricRecord:
        """The strategy's train-metric function (Flower's weighted mean if it has none),
        applied once to the admitted clients' MetricRecords."""
        aggr = getattr(self.strategy, "train_metrics_aggr_fn", None) or aggregate_metricrecords
        contents = [RecordDict({a.metric_key: a.metrics}) for a in admitted]
        return MetricRecord(dict(aggr(contents, self._weight_key)))

    def aggregate_train(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen and admit the replies, then aggregate (see the module docstring).

        Returns ``(None, None)`` if no reply was admitted (the model stays as
        it was), and raises :class:`NoAdmittedRepliesError` when that happened
        ``max_silent_rounds`` rounds in a row.
        """
        admitted = self._screen_train(server_round, replies)
        if not admitted:
            self._silent_round(server_round)
            return None, None
        self._silent = 0
        uplink_bytes = sum(len(a.payload) for a in admitted)
        client_metrics = None if self.uplink.rule is None else self._client_metrics(admitted)
        inner = self._inner_replies(server_round, admitted)
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, inner)
        except InconsistentMessageReplies as e:  # screened above; kept as a last guard
            log(
                WARNING,
                "aggregate_train: %s refused the round: %s",
                type(self.strategy).__name__,
                e,
            )
            return None, None
        if arrays is not None:
            arrays = self._to_model_dtypes(arrays)
        if client_metrics is not None:  # the strategy saw one reply: report the clients'
            metrics = client_metrics
        out = MetricRecord() if metrics is None else MetricRecord(dict(metrics))
        out["fedquant.uplink-bytes"] = int(uplink_bytes)
        out["fedquant.downlink-bytes"] = int(self._downlink_bytes)
        out["fedquant.clients"] = len(admitted)
        out["fedquant.rejected"] = len(self._last_rejections)
        widths = [i.bits for a in admitted for i in a.update.info.values() if i.quantized]
        if widths:
            out["fedquant.bits-min"] = min(widths)
            out["fedquant.bits-max"] = max(widths)
        return arrays, out

    def aggregate_evaluate(
        self,
        server_round: int,
        replies: Iterable[Message],
    ) -> MetricRecord | None:
        """Drop malformed evaluation replies (logged), then the wrapped strategy aggregates."""
        triage = split_errors(replies)
        content, rejected = triage.kept, triage.rejected
        candidates: list[Message] = []
        for msg in content:
            keys = record_keys(msg, need_arrays=False)
            reason = (
                keys
                if isinstance(keys, str)
                else weight_problem(msg.content.metric_records[keys.metrics], self._weight_key)
            )
            if reason is None:
                candidates.append(msg)
            else:
                rejected.append(Rejection(node_of(msg), reason))
        agree = common_metric_keys(
            [
                (node_of(m), metric_signature(next(iter(m.content.metric_records.values()))))
                for m in candidates
            ]
        )
        self._reject("aggregate_evaluate", rejected + agree.rejected)
        try:
            return self.strategy.aggregate_evaluate(
                server_round, [candidates[i] for i in agree.positions]
            )
        except InconsistentMessageReplies as e:
            log(
                WARNING,
                "aggregate_evaluate: %s refused the round: %s",
                type(self.strategy).__name__,
                e,
            )
            return None
