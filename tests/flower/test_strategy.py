"""QuantizedFedAvg: configure_train / aggregate_train on mock replies, against the simulator's path."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl.aggregation import MSE_FLOOR_ABS, MSE_FLOOR_REL, aggregate_payloads
from fedquant.fl.seeding import Purpose, seed_sequence
from fedquant.flower import QuantizedFedAvg, payload_from_record
from fedquant.flower.records import payload_record, record_from_numpy
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

from .conftest import (
    NUM_EXAMPLES,
    FakeGrid,
    context,
    local_update,
    make_app,
    metadata,
    model_state,
    payload_metrics,
    simulator_broadcast,
)

RULES = ("inverse-mse", "fedavg", "mean")
SPEC = QuantSpec.from_strings(bits="2")
NODES = [101, 102, 103]
SIZES = [50, 300, 120]  # per client; only fedavg sees them


def client_state(j: int) -> dict[str, np.ndarray]:
    """Client j's model: different values and scales, so the clients' MSEs differ."""
    return {
        k: (v * np.float32(1 + j)) if v.dtype.kind == "f" else v for k, v in model_state(j).items()
    }


def client_payload(j: int, rule: str) -> bytes:
    meta = {"round": 1, "client": j}
    if rule == "fedavg":
        meta["num_examples"] = SIZES[j]
    return codec.encode(
        client_state(j), SPEC, seed=seed_sequence(0, Purpose.UPLINK, 1, j), meta=meta
    )


def reply(content: RecordDict | Error, node: int) -> Message:
    """A reply from ``node`` as the SuperLink hands it to the ServerApp."""
    if isinstance(content, Error):
        return Message(error=content, metadata=metadata("train", src=node, dst=0))
    return Message(content=content, metadata=metadata("train", src=node, dst=0))


def payload_reply(
    payload: bytes, node: int, *, num_examples: int = 1, loss: float = 1.0
) -> Message:
    metrics = payload_metrics(payload, **{"train-loss": loss, "num-examples": num_examples})
    return reply(RecordDict({"arrays": payload_record(payload), "metrics": metrics}), node)


def configured(rule: str = "inverse-mse", **kwargs: object) -> QuantizedFedAvg:
    """A strategy that has sent round 1 (so it knows the model replies must match)."""
    strategy = QuantizedFedAvg(SPEC, aggregation=rule, seed=0, **kwargs)  # type: ignore[arg-type]
    strategy.configure_train(1, record_from_numpy(model_state()), ConfigRecord(), FakeGrid(NODES))
    return strategy


def replies_for(rule: str) -> tuple[list[bytes], list[Message]]:
    payloads = [client_payload(j, rule) for j in range(len(NODES))]
    sizes = SIZES if rule == "fedavg" else [1] * len(NODES)
    msgs = [
        payload_reply(p, node, num_examples=n, loss=0.5 + j)
        for j, (p, node, n) in enumerate(zip(payloads, NODES, sizes, strict=True))
    ]
    return payloads, msgs


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def reference_average(payloads: list[bytes], rule: str) -> dict[str, np.ndarray]:
    """np.average with each rule's weights, written from the paper's formulas."""
    decoded = [codec.decode(p) for p in payloads]
    out = {}
    for name in decoded[0].tensors:
        xs = np.stack([d.tensors[name].astype(np.float64) for d in decoded])
        if rule == "fedavg":
            w = np.array(SIZES, dtype=np.float64)
        elif rule == "mean":
            w = np.ones(len(payloads))
        else:  # 1/MSE, with the floor that makes unquantized tensors (MSE 0) a plain mean
            e = np.array([d.info[name].mse for d in decoded])
            w = 1.0 / np.maximum(e, max(MSE_FLOOR_REL * np.median(e), MSE_FLOOR_ABS))
        out[name] = np.average(xs, axis=0, weights=w)
    return out


# --------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("rule", RULES)
def test_aggregate_train_equals_the_simulators_aggregation(rule: str, in_run: None) -> None:
    payloads, msgs = replies_for(rule)
    arrays, metrics = configured(rule).aggregate_train(1, msgs)
    assert arrays is not None and metrics is not None
    expected = aggregate_payloads(
        payloads, rule, num_examples=SIZES if rule == "fedavg" else None
    ).tensors
    got = as_numpy(arrays)
    assert list(got) == list(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype
        np.testing.assert_array_equal(got[name], t)  # the same function: bit for bit


@pytest.mark.parametrize("rule", RULES)
def test_aggregate_train_matches_an_np_average_reference(rule: str, in_run: None) -> None:
    payloads, msgs = replies_for(rule)
    arrays, _ = configured(rule).aggregate_train(1, msgs)
    assert arrays is not None
    got = as_numpy(arrays)
    for name, ref in reference_average(payloads, rule).items():
        if got[name].dtype.kind == "i":
            np.testing.assert_array_equal(got[name], np.rint(ref))
        else:
            # float64 accumulation returned as float32: within float32 rounding of the values
            np.testing.assert_allclose(got[name], ref, rtol=1e-6, atol=1e-7)


def test_inverse_mse_weights_are_not_the_mean(in_run: None) -> None:
    """The clients' MSEs differ by ~(1+j)^2, so inverse-MSE must differ from the mean."""
    payloads, msgs = replies_for("inverse-mse")
    arrays, _ = configured().aggregate_train(1, msgs)
    assert arrays is not None
    mean = reference_average(payloads, "mean")["fc.weight"]
    assert not np.allclose(as_numpy(arrays)["fc.weight"], mean, rtol=1e-3)


def test_aggregated_metrics(in_run: None) -> None:
    payloads, msgs = replies_for("inverse-mse")
    _, metrics = configured().aggregate_train(1, msgs)
    assert metrics is not None
    assert metrics["fedquant.uplink-bytes"] == sum(len(p) for p in payloads)
    assert metrics["fedquant.clients"] == 3
    # num-examples is 1 everywhere under inverse-mse: client metrics are plain means
    assert metrics["train-loss"] == pytest.approx(np.mean([0.5, 1.5, 2.5]), rel=1e-12)
    assert "num-examples" not in metrics


def test_fedavg_weights_come_from_the_payload_metadata(in_run: None) -> None:
    """As in the simulator; a MetricRecord that disagrees does not change the weights."""
    payloads, msgs = replies_for("fedavg")
    for m in msgs:
        m.content["metrics"]["num-examples"] = 7
    arrays, _ = configured("fedavg").aggregate_train(1, msgs)
    assert arrays is not None
    expected = aggregate_payloads(payloads, "fedavg", num_examples=SIZES).tensors
    np.testing.assert_array_equal(as_numpy(arrays)["fc.weight"], expected["fc.weight"])


# --------------------------------------------------------------------------- rejections


def test_bad_replies_are_rejected_and_the_round_goes_on(in_run: None) -> None:
    payloads, msgs = replies_for("inverse-mse")
    corrupted = bytearray(payloads[1])
    corrupted[-1] ^= 0xFF
    wrong_shape = codec.encode(
        {**client_state(2), "fc.weight": np.zeros((3, 3), np.float32)}, SPEC, seed=1
    )
    plain = RecordDict(
        {
            "arrays": record_from_numpy(client_state(0)),  # a client without fedquant_mod
            "metrics": MetricRecord({"num-examples": 1, "train-loss": 0.0}),
        }
    )
    bad = [
        payload_reply(bytes(corrupted), 201),
        payload_reply(wrong_shape, 202),
        payload_reply(payloads[0], NODES[0]),  # the same node twice
        reply(Error(code=0, reason="client crashed"), 204),
        reply(plain, 205),  # Flower's own check would refuse the whole round for this one
    ]
    arrays, metrics = configured().aggregate_train(1, [msgs[0], *bad, msgs[2]])
    assert arrays is not None and metrics is not None
    assert metrics["fedquant.clients"] == 2 and metrics["fedquant.rejected"] == len(bad)
    expected = aggregate_payloads([payloads[0], payloads[2]], "inverse-mse").tensors
    np.testing.assert_array_equal(as_numpy(arrays)["fc.weight"], expected["fc.weight"])


def test_no_admissible_reply_keeps_the_model(in_run: None) -> None:
    payloads, _ = replies_for("inverse-mse")
    truncated = payload_reply(payloads[0][:100], NODES[0])
    assert configured().aggregate_train(1, [truncated]) == (None, None)
    assert configured().aggregate_train(1, []) == (None, None)


def test_fedavg_reply_without_size_in_its_payload_is_rejected(in_run: None) -> None:
    _, msgs = replies_for("fedavg")
    no_size = codec.encode(client_state(1), SPEC, seed=3, meta={"round": 1, "client": 1})
    msgs[1] = payload_reply(no_size, NODES[1], num_examples=SIZES[1])
    _, metrics = configured("fedavg").aggregate_train(1, msgs)
    assert metrics is not None and metrics["fedquant.clients"] == 2


def test_aggregate_train_needs_configure_train() -> None:
    _, msgs = replies_for("inverse-mse")
    with pytest.raises(FedquantError, match="configure_train was not called"):
        QuantizedFedAvg(SPEC).aggregate_train(1, msgs)


# --------------------------------------------------------------------------- configure


def test_configure_train_sends_instructions_and_keeps_the_users_config(in_run: None) -> None:
    strategy = QuantizedFedAvg("4-2", aggregation="mean", seed=9, fraction_train=1.0)
    user = ConfigRecord({"lr": 0.1})
    arrays = record_from_numpy(model_state())
    msgs = list(strategy.configure_train(3, arrays, user, FakeGrid(NODES)))
    assert sorted(m.metadata.dst_node_id for m in msgs) == NODES
    config = msgs[0].content["config"]
    assert config["server-round"] == 3 and config["lr"] == 0.1
    assert config["fedquant.bits"] == "4-2"
    assert config["fedquant.aggregation"] == "mean"
    assert config["fedquant.seed"] == 9
    assert dict(user) == {"lr": 0.1}  # the caller's record is not modified
    assert msgs[0].content["arrays"] is arrays  # float32 broadcast: Flower's own arrays


def test_quantized_broadcast_is_the_simulators_downlink(in_run: None) -> None:
    strategy = QuantizedFedAvg(SPEC, downlink="8", seed=4)
    state = model_state()
    msgs = list(
        strategy.configure_train(2, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    sent = payload_from_record(msgs[0].content["arrays"])
    assert sent == simulator_broadcast(state, "8", seed=4, r=2)
    # evaluation after round r sends exactly what training in round r + 1 will
    ev = list(
        strategy.configure_evaluate(2, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    nxt = list(
        strategy.configure_train(3, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    assert payload_from_record(ev[0].content["arrays"]) == payload_from_record(
        nxt[0].content["arrays"]
    )
    assert ev[0].content["config"]["fedquant.bits"] == SPEC.describe_bits()


def test_no_federated_evaluation_when_fraction_is_zero(in_run: None) -> None:
    strategy = QuantizedFedAvg(SPEC, downlink="8", fraction_evaluate=0.0)
    assert (
        list(
            strategy.configure_evaluate(
                1, record_from_numpy(model_state()), ConfigRecord(), FakeGrid(NODES)
            )
        )
        == []
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"aggregation": "average"}, "average"),
        ({"uplink": "9"}, "bits"),
        ({"downlink": "4-x"}, "bits"),
        ({"seed": -1}, "seed"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        QuantizedFedAvg(**kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- a whole round


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("downlink", [None, "8"])
def test_round_with_the_mod_equals_the_simulators_round(
    rule: str, downlink: str | None, in_run: None
) -> None:
    """configure_train -> ClientApp with fedquant_mod -> aggregate_train, against the
    simulator's path (broadcast, decode, train, encode with (seed, UPLINK, r, k), aggregate)."""
    seed, r = 5, 2
    state = model_state()
    strategy = QuantizedFedAvg(SPEC, aggregation=rule, downlink=downlink, seed=seed)
    msgs = list(
        strategy.configure_train(r, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    app = make_app()
    order = {node: k for k, node in enumerate(NODES)}  # partition id of each node
    replies = [app(m, context(order[m.metadata.dst_node_id])) for m in msgs]
    arrays, _ = strategy.aggregate_train(r, replies)
    assert arrays is not None

    start: Mapping[str, np.ndarray] = state
    if downlink is not None:
        down = codec.encode(
            state,
            QuantSpec.from_strings(bits=downlink),
            seed=seed_sequence(seed, Purpose.DOWNLINK, r),
            meta={"round": r},
        )
        start = codec.decode(down).tensors
    payloads = []
    for m in msgs:  # replies come back in the order the messages went out
        k = order[m.metadata.dst_node_id]
        meta = {"round": r, "client": k}
        if rule == "fedavg":
            meta["num_examples"] = NUM_EXAMPLES  # what make_app's client reports
        payloads.append(
            codec.encode(
                local_update(start), SPEC, seed=seed_sequence(seed, Purpose.UPLINK, r, k), meta=meta
            )
        )
    expected = aggregate_payloads(
        payloads, rule, num_examples=[NUM_EXAMPLES] * 3 if rule == "fedavg" else None
    )
    got = as_numpy(arrays)
    for name, t in expected.tensors.items():
        np.testing.assert_array_equal(got[name], t)


def test_a_scaled_model_is_left_out_as_in_the_simulator(in_run: None) -> None:
    """A finite model x 1e6 (a valid payload) would wreck the average; the norm bound drops it."""
    honest = [model_state(0) for _ in range(4)]
    honest = [
        {k: v + np.float32(0.01 * j) if v.dtype.kind == "f" else v for k, v in s.items()}
        for j, s in enumerate(honest)
    ]
    evil = {k: v * np.float32(1e6) if v.dtype.kind == "f" else v for k, v in model_state().items()}
    payloads = [codec.encode(s, SPEC, seed=j) for j, s in enumerate([*honest, evil])]
    msgs = [payload_reply(p, 300 + j) for j, p in enumerate(payloads)]
    strategy = QuantizedFedAvg(SPEC, aggregation="mean", seed=0)
    strategy.configure_train(
        1, record_from_numpy(model_state()), ConfigRecord(), FakeGrid(list(range(300, 305)))
    )
    arrays, _ = strategy.aggregate_train(1, msgs)
    assert arrays is not None
    got = as_numpy(arrays)
    expected = aggregate_payloads(payloads, "mean", reference=model_state()).tensors
    assert max(float(np.abs(v).max()) for v in got.values()) < 100
    for name, t in expected.items():
        np.testing.assert_array_equal(got[name], t)
    off = QuantizedFedAvg(SPEC, aggregation="mean", seed=0, norm_bound=0)
    off.configure_train(
        1, record_from_numpy(model_state()), ConfigRecord(), FakeGrid(list(range(300, 305)))
    )
    wrecked, _ = off.aggregate_train(1, msgs)
    assert wrecked is not None
    assert max(float(np.abs(a.numpy()).max()) for a in wrecked.values()) > 1e4
