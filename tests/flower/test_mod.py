"""fedquant_mod: a ClientApp called directly on constructed messages."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedquant.fl.seeding import Purpose, seed_sequence
from fedquant.flower import STYPE, UplinkConfig, fedquant_mod, payload_from_record
from fedquant.flower.mod import MSE_PREFIX, client_id
from fedquant.flower.records import numpy_from_record, payload_record, record_from_numpy
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

from .conftest import NUM_EXAMPLES, context, local_update, make_app, message, model_state

SPEC = QuantSpec.from_strings(bits="3")
SEED = 11
ROUND = 4


def train_message(
    arrays: ArrayRecord, aggregation: str = "inverse-mse", message_type: str = "train"
) -> Message:
    config = UplinkConfig(SPEC, aggregation=aggregation, seed=SEED).to_config()  # type: ignore[arg-type]
    config["server-round"] = ROUND
    return message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), message_type)


def expected_payload(state: Mapping[str, np.ndarray], client: int, **meta: int) -> bytes:
    """What the simulator's client sends for the same model: same stream, same metadata."""
    return codec.encode(
        local_update(state),
        SPEC,
        seed=seed_sequence(SEED, Purpose.UPLINK, ROUND, client),
        meta={"round": ROUND, "client": client, **meta},
    )


# --------------------------------------------------------------------------- uplink


@pytest.mark.parametrize("partition_id", [0, 2])
def test_uplink_is_the_codec_payload_of_the_trained_model(partition_id: int) -> None:
    state = model_state()
    reply = make_app()(train_message(record_from_numpy(state)), context(partition_id))
    assert not reply.has_error()
    (record,) = reply.content.array_records.values()
    (array,) = record.values()
    assert array.stype == STYPE and array.dtype == "uint8"
    # byte for byte: the stream (seed, UPLINK, round, partition id) and the simulator's meta
    assert payload_from_record(record) == expected_payload(state, partition_id)
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        array.numpy()  # Flower's stock aggregation cannot read it by mistake


def test_uplink_values_are_within_one_step_and_integers_exact() -> None:
    state = model_state()
    reply = make_app()(train_message(record_from_numpy(state)), context())
    decoded = codec.decode(payload_from_record(reply.content["arrays"]))
    sent = local_update(state)
    for name, info in decoded.info.items():
        if info.quantized:
            # clipped uniform quantizer: error <= one step 2s/(2^b - 1) inside [-s, s],
            # plus the clipping error |x| - s outside it
            s = float(info.scales[0])
            step = 2 * s / (2**info.bits - 1)
            excess = np.maximum(np.abs(sent[name]) - s, 0)
            assert np.all(np.abs(decoded.tensors[name] - sent[name]) <= step + excess + 1e-6)
        else:
            np.testing.assert_array_equal(decoded.tensors[name], sent[name])


def test_metrics_carry_the_mse_and_hide_the_dataset_size() -> None:
    reply = make_app()(train_message(record_from_numpy(model_state())), context())
    (metrics,) = reply.content.metric_records.values()
    decoded = codec.decode(payload_from_record(reply.content["arrays"]))
    quantized = {n for n, i in decoded.info.items() if i.quantized}
    assert quantized == {"conv.weight", "fc.weight"}
    assert {k for k in metrics if k.startswith(MSE_PREFIX)} == {MSE_PREFIX + n for n in quantized}
    for n in quantized:
        assert metrics[MSE_PREFIX + n] == decoded.info[n].mse > 0
    assert metrics["num-examples"] == 1  # inverse-mse: the real 123 never leaves the node
    assert metrics["train-loss"] == 0.5
    assert "num_examples" not in decoded.meta


def test_mean_also_hides_the_dataset_size() -> None:
    reply = make_app()(train_message(record_from_numpy(model_state()), "mean"), context())
    assert reply.content["metrics"]["num-examples"] == 1


def test_fedavg_discloses_the_dataset_size_in_metrics_and_payload() -> None:
    state = model_state()
    reply = make_app()(train_message(record_from_numpy(state), "fedavg"), context())
    assert reply.content["metrics"]["num-examples"] == NUM_EXAMPLES
    payload = payload_from_record(reply.content["arrays"])
    assert codec.decode(payload).meta["num_examples"] == NUM_EXAMPLES
    assert payload == expected_payload(state, 1, num_examples=NUM_EXAMPLES)


def test_client_id_falls_back_to_the_node_id() -> None:
    assert client_id(context(partition_id=None, node_id=99)) == 99
    assert client_id(context(partition_id=3)) == 3
    state = model_state()
    reply = make_app()(train_message(record_from_numpy(state)), context(None, node_id=99))
    assert payload_from_record(reply.content["arrays"]) == expected_payload(state, 99)


# --------------------------------------------------------------------------- downlink


def test_quantized_downlink_is_decoded_before_training() -> None:
    state = model_state()
    down = codec.encode(state, QuantSpec(default_bits=8), seed=5)
    seen: dict[str, dict[str, np.ndarray]] = {}
    reply = make_app(seen)(train_message(payload_record(down)), context())
    assert not reply.has_error()
    expected = codec.decode(down).tensors
    assert list(seen["train"]) == list(state)  # names and order survive the round trip
    for name in state:
        np.testing.assert_array_equal(seen["train"][name], expected[name])
        assert seen["train"][name].dtype == state[name].dtype


def test_evaluate_gets_the_decoded_downlink_and_no_uplink_encoding() -> None:
    state = model_state()
    down = codec.encode(state, QuantSpec(default_bits=4), seed=5)
    seen: dict[str, dict[str, np.ndarray]] = {}
    reply = make_app(seen)(train_message(payload_record(down), message_type="evaluate"), context())
    assert not reply.has_error()
    for name, t in codec.decode(down).tensors.items():
        np.testing.assert_array_equal(seen["evaluate"][name], t)
    assert not reply.content.array_records
    assert reply.content["metrics"]["eval-acc"] == 0.75
    assert reply.content["metrics"]["num-examples"] == 1  # inverse-mse: hidden here too


def test_messages_without_fedquant_settings_pass_through() -> None:
    state = model_state()
    msg = message(RecordDict({"arrays": record_from_numpy(state), "config": ConfigRecord()}))
    reply = make_app()(msg, context())
    assert not reply.has_error()
    out = numpy_from_record(reply.content["arrays"])  # plain NumPy arrays, untouched
    for name, t in local_update(state).items():
        np.testing.assert_array_equal(out[name], t)
    assert reply.content["metrics"]["num-examples"] == NUM_EXAMPLES


# --------------------------------------------------------------------------- errors


def assert_mod_error(reply: Message, match: str) -> None:
    assert reply.has_error()
    assert reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert match in (reply.error.reason or ""), reply.error.reason


def test_corrupted_downlink_is_an_error_reply() -> None:
    down = bytearray(codec.encode(model_state(), QuantSpec(default_bits=8), seed=5))
    down[40] ^= 0xFF
    reply = make_app()(train_message(payload_record(bytes(down))), context())
    assert_mod_error(reply, "cannot read the server's message")
    assert_mod_error(reply, "checksum")


def test_invalid_settings_are_an_error_reply() -> None:
    msg = train_message(record_from_numpy(model_state()))
    msg.content["config"]["fedquant.bits"] = "9"
    assert_mod_error(make_app()(msg, context()), "bits")


def test_missing_server_round_is_an_error_reply() -> None:
    msg = train_message(record_from_numpy(model_state()))
    del msg.content["config"]["server-round"]
    assert_mod_error(make_app()(msg, context()), "server-round")


def test_nan_model_is_an_error_reply() -> None:
    def diverged(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = local_update(state)
        out["fc.weight"] = out["fc.weight"].copy()
        out["fc.weight"][0, 0] = np.nan
        return out

    reply = make_app(update=diverged)(train_message(record_from_numpy(model_state())), context())
    assert_mod_error(reply, "cannot encode the model update")
    assert_mod_error(reply, "learning rate")


def test_fedavg_without_num_examples_is_an_error_reply() -> None:
    app = make_app(metrics={"train-loss": 0.5})
    reply = app(train_message(record_from_numpy(model_state()), "fedavg"), context())
    assert_mod_error(reply, "num-examples")


def test_fedavg_with_a_fractional_size_is_an_error_reply() -> None:
    app = make_app(metrics={"num-examples": 12.5})
    reply = app(train_message(record_from_numpy(model_state()), "fedavg"), context())
    assert_mod_error(reply, "whole number")


def test_reply_without_exactly_one_array_record_is_an_error_reply() -> None:
    app = ClientApp(mods=[fedquant_mod])

    @app.train()
    def train(msg: Message, ctxt: Context) -> Message:
        metrics = MetricRecord({"num-examples": 3})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    reply = app(train_message(record_from_numpy(model_state())), context())
    assert_mod_error(reply, "0 ArrayRecord(s) and 1 MetricRecord(s)")


def test_bad_partition_id_is_an_error_reply() -> None:
    ctxt = context()
    ctxt.node_config["partition-id"] = -1
    reply = make_app()(train_message(record_from_numpy(model_state())), ctxt)
    assert_mod_error(reply, "partition-id")
