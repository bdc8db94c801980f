"""The Flower adapter and issue 8's options: bit budgets travel, delta uploads are refused clearly."""

from __future__ import annotations

import logging

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, RecordDict

from fedquant.fl.updates import encode_delta
from fedquant.flower import QuantizedFedAvg
from fedquant.flower.records import UplinkConfig, payload_record, record_from_numpy
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

from .conftest import FakeGrid, local_update, metadata, model_state, payload_metrics

NODES = [101, 102]


def reply(payload: bytes, node: int) -> Message:
    content = RecordDict(
        {
            "arrays": payload_record(payload),
            "metrics": payload_metrics(payload, **{"train-loss": 1.0, "num-examples": 1}),
        }
    )
    return Message(content=content, metadata=metadata("train", src=node, dst=0))


def test_a_bit_budget_travels_in_the_uplink_instructions() -> None:
    spec = QuantSpec.from_strings(bits="auto:2.5", rounding="nearest")
    back = UplinkConfig.from_config(ConfigRecord(UplinkConfig(spec=spec).to_config()))
    assert back is not None and back.spec == spec


def test_the_strategy_refuses_delta_uploads_with_a_clear_reason(
    in_run: None, caplog: pytest.LogCaptureFixture
) -> None:
    spec = QuantSpec.from_strings(bits="2")
    start = model_state()
    strategy = QuantizedFedAvg(spec, seed=0)
    strategy.configure_train(1, record_from_numpy(start), ConfigRecord(), FakeGrid(NODES))
    weights = codec.encode(local_update(start), spec, seed=1, meta={"round": 1, "client": 0})
    delta = encode_delta(local_update(start), start, spec, seed=2, meta={"round": 1, "client": 1})
    with caplog.at_level(logging.WARNING):
        arrays, metrics = strategy.aggregate_train(
            1, [reply(weights, NODES[0]), reply(delta.result.payload, NODES[1])]
        )
    assert arrays is not None and metrics is not None
    assert metrics["fedquant.clients"] == 1  # the weights; the delta was not averaged in
    assert "payload carries 'delta'" in caplog.text and "--upload weights" in caplog.text
    got = arrays["conv.bias"].numpy()
    np.testing.assert_array_equal(got, codec.decode(weights).tensors["conv.bias"])
