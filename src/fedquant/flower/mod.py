"""The ClientApp mod: decode a quantized downlink, encode the uplink with the fedquant codec.

Add it to any ClientApp whose train function returns the model as one
ArrayRecord of NumPy arrays and one MetricRecord (Flower's convention)::

    from flwr.clientapp import ClientApp
    from fedquant.flower import fedquant_mod

    app = ClientApp(mods=[fedquant_mod])

What it does, for every message:

1. **Downlink.** Any ArrayRecord of the incoming message that holds a
   ``fedquant/v1`` payload is decoded into a plain ArrayRecord (same key,
   tensors in payload order), so the train/evaluate function never sees the
   codec.
2. **Uplink** (``train`` messages whose ConfigRecord carries the server's
   :class:`~fedquant.flower.records.UplinkConfig`). The reply's ArrayRecord is
   encoded with :func:`fedquant.quant.codec.encode_with_stats` and replaced by
   one ``fedquant/v1`` Array. Stochastic rounding draws from the stream
   ``(seed, UPLINK, server-round, partition-id)`` (the node's ``node_id`` if
   its node config has no ``partition-id``), so any client's upload can be
   replayed. The payload's metadata is the simulator's: ``round``, ``client``
   and, for ``fedavg`` only, ``num_examples`` -- so a Flower client and a
   simulated client with the same model produce the same bytes. The reply's MetricRecord gains ``fedquant.mse.<tensor>`` (the
   quantization MSE of every quantized tensor, also inside the payload).
3. **Dataset size.** Unless the server's weighting reads it (``fedavg``, or
   ``strategy``: the wrapped Flower strategy weights by it), the mod sets
   ``num-examples`` to ``1`` in train *and* evaluate replies: Flower's
   strategies need the key, but inverse-MSE and mean weighting do not use it,
   so the client's real sizes never leave the node (client metrics are then
   averaged with equal weights).
4. **The node's own bit width.** A SuperNode started with
   ``--node-config 'fedquant-bits="2"'`` (:data:`NODE_BITS_KEY`) quantizes its
   uploads with that ``bits`` setting instead of the server's (every other
   setting is the server's); the server aggregates payloads of mixed widths
   as they come, each payload describing its own.

Messages without fedquant instructions (e.g. from a stock FedAvg server) pass
through unchanged. Failures (a corrupted downlink, NaN weights, a reply that
is not one ArrayRecord plus one MetricRecord) come back as an error reply
(``MOD_FAILED_PRECONDITION``) whose reason says how to fix it; the strategy
then aggregates the other clients.
"""

from __future__ import annotations

import math
from logging import ERROR

from flwr.app import Context, Error, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log
from flwr.common.constant import ErrorCode

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl.aggregation import AggregationRule
from fedquant.fl.client import upload_meta
from fedquant.fl.seeding import Purpose, rotation_key, seed_sequence
from fedquant.flower.records import (
    UplinkConfig,
    is_payload_record,
    numpy_from_record,
    payload_from_record,
    payload_record,
    record_from_numpy,
)
from fedquant.quant import codec
from fedquant.quant.allocation import plan_tensors
from fedquant.quant.spec import QuantSpec

__all__ = [
    "MSE_PREFIX",
    "NODE_BITS_KEY",
    "NUM_EXAMPLES_KEY",
    "UNDISCLOSED_NUM_EXAMPLES",
    "client_id",
    "fedquant_mod",
    "node_spec",
]

#: the MetricRecord key Flower's FedAvg weights by
NUM_EXAMPLES_KEY = "num-examples"
#: placeholder reported instead of the real dataset size when the rule does not use it
UNDISCLOSED_NUM_EXAMPLES = 1
#: prefix of the per-tensor MSE entries the mod adds to train replies
MSE_PREFIX = "fedquant.mse."
#: node-config key with which a SuperNode sets its own uplink bits
NODE_BITS_KEY = "fedquant-bits"


def _error_reply(msg: Message, reason: str) -> Message:
    log(ERROR, "fedquant_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)


def node_spec(spec: QuantSpec, ctxt: Context) -> QuantSpec:
    """``spec`` with the node's own ``bits`` (node config :data:`NODE_BITS_KEY`), if it sets one.

    Raises
    ------
    FedquantError
        If the node's value is not a valid bit setting.
    """
    value = ctxt.node_config.get(NODE_BITS_KEY)
    if value is None or str(value).strip() == "":
        return spec
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FedquantError(
            f'node config {NODE_BITS_KEY!r} must be a bit setting such as "2" or '
            f'"4-2-2-4", got {value!r}'
        )
    try:
        return QuantSpec.from_dict({**spec.to_dict(), "bits": str(value).strip()})
    except ConfigError as e:
        raise FedquantError(f"node config {NODE_BITS_KEY}={value!r}: {e}") from None


def _instructions(msg: Message) -> UplinkConfig | None:
    found = [
        cfg
        for c in msg.content.config_records.values()
        if (cfg := UplinkConfig.from_config(c)) is not None
    ]
    if len(found) > 1:
        raise FedquantError(
            f"{len(found)} ConfigRecords carry fedquant settings; the server must send one"
        )
    return found[0] if found else None


def _server_round(msg: Message) -> int:
    for c in msg.content.config_records.values():
        if "server-round" in c:
            value = c["server-round"]
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                return value
            raise FedquantError(f"'server-round' must be a non-negative int, got {value!r}")
    raise FedquantError(
        "the train message has no 'server-round' in its ConfigRecord; wrap the server's "
        "strategy in fedquant.flower.QuantizedStrategy (it adds it)"
    )


def client_id(ctxt: Context) -> int:
    """The client index used for seeding: ``partition-id`` from the node config, else ``node_id``."""
    pid = ctxt.node_config.get("partition-id")
    if pid is None:
        return int(ctxt.node_id)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
        raise FedquantError(
            f"node config 'partition-id' must be a non-negative integer, got {pid!r}"
        )
    return pid


def _is_count(value: object) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
        and value == int(value)
    )


def _decode_downlink(msg: Message) -> None:
    """Replace every fedquant payload record of ``msg`` by the decoded tensors, in place."""
    for key, record in list(msg.content.array_records.items()):
        if is_payload_record(record):
            decoded = codec.decode(payload_from_record(record))
            msg.content[key] = record_from_numpy(decoded.tensors)


def fedquant_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: decode a quantized downlink, quantize the uplink (see the module docstring).

    Parameters
    ----------
    msg : Message
        The incoming message.
    ctxt : Context
        The ClientApp's context (``node_config["partition-id"]`` seeds the rounding).
    call_next : callable
        The next mod or the ClientApp's function.

    Returns
    -------
    Message
        The reply, with its ArrayRecord encoded for ``train`` messages, or an
        error reply that says what went wrong.
    """
    if not msg.has_content():
        return call_next(msg, ctxt)
    try:
        _decode_downlink(msg)
        instructions = _instructions(msg)
        is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
        server_round = _server_round(msg) if instructions is not None and is_train else 0
    except FedquantError as e:
        return _error_reply(
            msg,
            f"cannot read the server's message: {e}. Server and client must run "
            "compatible fedquant versions (QuantizedStrategy on the server).",
        )

    reply = call_next(msg, ctxt)
    if instructions is None or reply.has_error():
        return reply
    content = reply.content
    if len(content.metric_records) != 1 or (is_train and len(content.array_records) != 1):
        if not is_train:
            return reply  # nothing fedquant must change; the strategy will judge it
        return _error_reply(
            msg,
            f"the train reply has {len(content.array_records)} ArrayRecord(s) and "
            f"{len(content.metric_records)} MetricRecord(s); return exactly one of each "
            f"(the model and its metrics, with '{NUM_EXAMPLES_KEY}')",
        )
    metric_key, metrics = next(iter(content.metric_records.items()))
    out = MetricRecord(dict(metrics))
    num_examples = out.get(NUM_EXAMPLES_KEY)
    if not instructions.discloses_num_examples:
        out[NUM_EXAMPLES_KEY] = UNDISCLOSED_NUM_EXAMPLES
    elif not _is_count(num_examples):
        return _error_reply(
            msg,
            f"the server aggregates with {instructions.aggregation}, which weights by "
            f"'{NUM_EXAMPLES_KEY}'; put "
            f"the number of training examples (a whole number >= 0) in the reply's "
            f"MetricRecord (got {num_examples!r})",
        )
    if not is_train:
        content[metric_key] = out
        return reply

    array_key, record = next(iter(content.array_records.items()))
    try:
        tensors = numpy_from_record(record)
        client = client_id(ctxt)
    except FedquantError as e:
        return _error_reply(msg, f"cannot read the model update: {e}")
    try:
        spec = node_spec(instructions.spec, ctxt)
        plan_tensors(tensors, spec)  # a width list that does not fit the model fails here
    except FedquantError as e:
        return _error_reply(
            msg,
            f"this node's uplink setting does not fit the model: {e}. Fix the server's "
            f"uplink bits or this SuperNode's --node-config {NODE_BITS_KEY}=...",
        )
    try:
        # the simulator's metadata, so that both runtimes produce the same bytes
        meta = upload_meta(
            server_round,
            client,
            disclose_num_examples=int(num_examples)  # type: ignore[arg-type]
            if instructions.rule is AggregationRule.FEDAVG
            else None,
        )
        result = codec.encode_with_stats(
            tensors,
            spec,
            seed=seed_sequence(instructions.seed, Purpose.UPLINK, server_round, client),
            meta=meta,
            shared_key=rotation_key(instructions.seed, server_round),
        )
    except FedquantError as e:
        return _error_reply(
            msg,
            f"cannot encode the model update: {e}. Return the model as an ArrayRecord of "
            "finite NumPy/torch tensors (a NaN model usually means the learning rate is "
            "too high).",
        )
    for name, info in result.tensors.items():
        if info.quantized:
            out[MSE_PREFIX + name] = float(info.mse)

    content[array_key] = payload_record(result.payload)
    content[metric_key] = out
    return reply
