"""Helpers for the Flower adapter's tests: messages built outside a run, a fake Grid, a ClientApp."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import DEFAULT_TTL, Context, Message, Metadata, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity

from fedquant.errors import DecodeError
from fedquant.fl.seeding import Purpose, seed_sequence
from fedquant.flower import fedquant_mod
from fedquant.flower.mod import MSE_PREFIX
from fedquant.flower.records import numpy_from_record, record_from_numpy
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec


def metadata(
    message_type: str = "train", *, src: int = 0, dst: int = 7, group: str = "1"
) -> Metadata:
    """Explicit metadata: a Message built outside a Flower run has no run/node identity."""
    return Metadata(
        run_id=1,
        message_id=f"msg-{src}-{dst}-{message_type}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id=group,
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=message_type,
    )


def message(
    content: RecordDict, message_type: str = "train", *, src: int = 0, dst: int = 7
) -> Message:
    return Message(content=content, metadata=metadata(message_type, src=src, dst=dst))


def simulator_broadcast(state: Mapping[str, np.ndarray], bits: str, seed: int, r: int) -> bytes:
    """The simulator's quantized broadcast of round ``r``: stream (seed, DOWNLINK, r)."""
    return codec.encode(
        state,
        QuantSpec.from_strings(bits=bits),
        seed=seed_sequence(seed, Purpose.DOWNLINK, r),
        meta={"round": r},
    )


def payload_metrics(payload: bytes, **metrics: float) -> MetricRecord:
    """``metrics`` plus the ``fedquant.mse.*`` entries fedquant_mod adds for ``payload``
    (none for a payload that does not decode)."""
    out = MetricRecord(dict(metrics))
    try:
        info_of = codec.describe_payload(payload).info
    except DecodeError:
        return out
    for name, info in info_of.items():
        if info.quantized:
            out[MSE_PREFIX + name] = float(info.mse)
    return out


def context(partition_id: int | None = 1, node_id: int = 7) -> Context:
    node_config = (
        {} if partition_id is None else {"partition-id": partition_id, "num-partitions": 3}
    )
    return Context(
        run_id=1, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={}
    )


class FakeGrid:
    """The part of :class:`flwr.serverapp.Grid` that FedAvg's sampling uses."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@pytest.fixture
def in_run(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The identity a ServerApp process has in a real run (FedAvg builds Messages with it)."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    yield


def model_state(seed: int = 0) -> dict[str, np.ndarray]:
    """A small state dict with what real models hold: conv/linear weights, a bias, a counter."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(8).astype(np.float32),
        "fc.weight": (0.1 * rng.standard_normal((10, 32))).astype(np.float32),
        "bn.num_batches_tracked": np.array(5 + seed, np.int64),
    }


NUM_EXAMPLES = 123  # what make_app's client reports


def local_update(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A deterministic stand-in for local training."""
    return {
        k: (v * np.float32(0.9) + np.float32(0.01)) if v.dtype.kind == "f" else v + 1
        for k, v in state.items()
    }


def make_app(
    seen: dict[str, dict[str, np.ndarray]] | None = None,
    update: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]] = local_update,
    metrics: Mapping[str, float] | None = None,
) -> ClientApp:
    """A ClientApp with the mod; its train function records what it received."""
    app = ClientApp(mods=[fedquant_mod])
    reply_metrics = (
        {"train-loss": 0.5, "num-examples": NUM_EXAMPLES} if metrics is None else metrics
    )

    @app.train()
    def train(msg: Message, ctxt: Context) -> Message:
        received = numpy_from_record(msg.content["arrays"])
        if seen is not None:
            seen["train"] = received
        content = RecordDict(
            {
                "arrays": record_from_numpy(update(received)),
                "metrics": MetricRecord(dict(reply_metrics)),
            }
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, ctxt: Context) -> Message:
        if seen is not None:
            seen["evaluate"] = numpy_from_record(msg.content["arrays"])
        metrics = MetricRecord({"eval-acc": 0.75, "num-examples": 40})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app
