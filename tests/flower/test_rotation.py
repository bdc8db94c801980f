"""The Flower adapter with --rotation and --entropy: the round key reaches mod and strategy."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord

from fedquant.errors import DecodeError
from fedquant.fl.aggregation import aggregate_payloads
from fedquant.fl.seeding import Purpose, rotation_key, seed_sequence
from fedquant.flower import QuantizedFedAvg, UplinkConfig, payload_from_record
from fedquant.flower.records import record_from_numpy
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

from .conftest import FakeGrid, context, local_update, make_app, model_state

SPEC = QuantSpec.from_strings(bits="3", rotation=True, entropy="rans")
NODES = [101, 102, 103]


def test_the_settings_travel_in_the_config_record() -> None:
    cfg = UplinkConfig(SPEC, seed=3).to_config()
    assert cfg["fedquant.rotation"] is True and cfg["fedquant.entropy"] == "rans"
    back = UplinkConfig.from_config(cfg)
    assert back is not None and back.spec == SPEC


def test_a_rotated_round_equals_the_simulators_round(in_run: None) -> None:
    seed, r = 5, 2
    state = model_state()
    strategy = QuantizedFedAvg(SPEC, aggregation="mean", seed=seed)
    msgs = list(
        strategy.configure_train(r, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    app = make_app()
    order = {node: k for k, node in enumerate(NODES)}
    replies = [app(m, context(order[m.metadata.dst_node_id])) for m in msgs]
    assert not any(rep.has_error() for rep in replies)
    sent = payload_from_record(replies[0].content["arrays"])
    assert codec.describe_payload(sent).info["fc.weight"].transform == 1
    with pytest.raises(DecodeError, match="without the shared key"):
        codec.decode(sent)
    arrays, _ = strategy.aggregate_train(r, replies)
    assert arrays is not None

    key = rotation_key(seed, r)  # what the simulator uses for round r
    payloads = [
        codec.encode(
            local_update(state),
            SPEC,
            seed=seed_sequence(seed, Purpose.UPLINK, r, order[m.metadata.dst_node_id]),
            meta={"round": r, "client": order[m.metadata.dst_node_id]},
            shared_key=key,
        )
        for m in msgs
    ]
    assert payloads[0] == sent  # byte for byte
    expected = aggregate_payloads(payloads, "mean", shared_key=key)
    got = {k: a.numpy() for k, a in arrays.items()}
    for name, t in expected.tensors.items():
        np.testing.assert_array_equal(got[name], t)
    # a reply made for another round is rejected by the strategy's admission
    stale = list(
        strategy.configure_train(r + 1, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    assert stale
    arrays, _ = strategy.aggregate_train(r + 1, replies)
    assert arrays is None  # every reply carries round r's key check
