"""QuantizedStrategy around Flower 1.42's own strategies, on mock replies (as Flower's tests do).

Each strategy is checked against itself: the wrapper must hand it exactly the
inputs it would see in a float run with the dequantized models (``aggregation
="strategy"``), or the fedquant aggregate as its one reply (a fedquant rule).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import (
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Strategy,
)

from fedquant.errors import ConfigError, FedquantError
from fedquant.fl.aggregation import aggregate_payloads
from fedquant.fl.seeding import Purpose, seed_sequence
from fedquant.flower import (
    NODE_BITS_KEY,
    NoAdmittedRepliesError,
    QuantizedStrategy,
    UplinkConfig,
    payload_from_record,
)
from fedquant.flower.mod import MSE_PREFIX, node_spec
from fedquant.flower.records import numpy_from_record, payload_record, record_from_numpy
from fedquant.quant import codec
from fedquant.quant.spec import QuantSpec

from .conftest import (
    FakeGrid,
    context,
    make_app,
    metadata,
    model_state,
    payload_metrics,
    simulator_broadcast,
)

SPEC = QuantSpec.from_strings(bits="2")
NODES = [101, 102, 103]
SIZES = [50, 300, 120]
ROUND = 2

#: the strategies the wrapper is tested with, as a user would build them
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "FedAvg": FedAvg,
    "FedAdam": lambda: FedAdam(eta=0.05),
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.34),  # trims one of three clients per side
    "FedMedian": FedMedian,
    "FedYogi": FedYogi,
    "FedAvgM": lambda: FedAvgM(server_momentum=0.9),
}


def start_state() -> dict[str, np.ndarray]:
    return model_state(0)


def client_state(j: int) -> dict[str, np.ndarray]:
    """Client j's trained model: near the start, each differently."""
    rng = np.random.default_rng(100 + j)
    return {
        k: (v + np.float32(0.05 * (1 + j)) * rng.standard_normal(v.shape).astype(np.float32))
        if v.dtype.kind == "f"
        else v + 1
        for k, v in start_state().items()
    }


def client_payload(j: int, *, fedavg: bool = False, spec: QuantSpec = SPEC) -> bytes:
    meta = {"round": ROUND, "client": j} | ({"num_examples": SIZES[j]} if fedavg else {})
    return codec.encode(
        client_state(j), spec, seed=seed_sequence(0, Purpose.UPLINK, ROUND, j), meta=meta
    )


def reply(content: RecordDict | Error, node: int, kind: str = "train") -> Message:
    if isinstance(content, Error):
        return Message(error=content, metadata=metadata(kind, src=node, dst=0))
    return Message(content=content, metadata=metadata(kind, src=node, dst=0))


def payload_reply(payload: bytes, node: int, num_examples: int, loss: float) -> Message:
    metrics = payload_metrics(payload, **{"train-loss": loss, "num-examples": num_examples})
    return reply(RecordDict({"arrays": payload_record(payload), "metrics": metrics}), node)


def good_replies(*, fedavg: bool = False, sizes: list[int] | None = None) -> list[Message]:
    sizes = SIZES if sizes is None else sizes
    return [
        payload_reply(client_payload(j, fedavg=fedavg), node, sizes[j], 0.5 + j)
        for j, node in enumerate(NODES)
    ]


def wrapped(name: str, aggregation: str = "inverse-mse", **kwargs: object) -> QuantizedStrategy:
    strategy = QuantizedStrategy(STRATEGIES[name](), SPEC, aggregation=aggregation, **kwargs)  # type: ignore[arg-type]
    strategy.configure_train(
        ROUND, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
    )
    return strategy


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def model_dtypes(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the wrapper returns: the model's dtypes (integers rounded)."""
    out = {}
    for name, a in arrays.items():
        dtype = start_state()[name].dtype
        out[name] = np.rint(a).astype(dtype) if dtype.kind in "iub" else a.astype(dtype)
    return out


def plain_run(
    name: str, models: list[dict[str, np.ndarray]], sizes: list[int]
) -> dict[str, np.ndarray]:
    """The strategy alone, on plain float replies carrying ``models``."""
    strategy = STRATEGIES[name]()
    strategy.configure_train(
        ROUND, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
    )
    replies = [
        reply(
            RecordDict(
                {
                    "arrays": record_from_numpy(m),
                    "metrics": MetricRecord({"train-loss": 0.5 + j, "num-examples": n}),
                }
            ),
            NODES[j],
        )
        for j, (m, n) in enumerate(zip(models, sizes, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(ROUND, replies)
    assert arrays is not None
    return model_dtypes(as_numpy(arrays))


def assert_same(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert list(got) == list(expected)
    for name, t in expected.items():
        assert got[name].dtype == t.dtype, name
        np.testing.assert_array_equal(got[name], t, err_msg=name)


# --------------------------------------------------------------------------- who aggregates


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_rule_sees_the_dequantized_models(name: str, in_run: None) -> None:
    """aggregation="strategy": the wrapped strategy gets the decoded models, weights as sent."""
    arrays, metrics = wrapped(name, "strategy").aggregate_train(ROUND, good_replies())
    assert arrays is not None and metrics is not None
    decoded = [codec.decode(client_payload(j)).tensors for j in range(len(NODES))]
    assert_same(as_numpy(arrays), plain_run(name, decoded, SIZES))
    assert metrics["fedquant.clients"] == 3


def test_strategy_rule_with_fedavg_is_np_average_by_num_examples(in_run: None) -> None:
    arrays, _ = wrapped("FedAvg", "strategy").aggregate_train(ROUND, good_replies())
    assert arrays is not None
    decoded = [codec.decode(client_payload(j)).tensors for j in range(len(NODES))]
    ref = np.average(np.stack([d["fc.weight"] for d in decoded]), axis=0, weights=SIZES)
    # float32 products summed in float32 (Flower's arithmetic): a few float32 ulps
    np.testing.assert_allclose(as_numpy(arrays)["fc.weight"], ref, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_and_median_differ_from_the_mean(in_run: None) -> None:
    """The wrapped robust rule really runs on the three models (not on one aggregate)."""
    replies = good_replies(sizes=[1, 1, 1])
    mean = wrapped("FedAvg", "strategy").aggregate_train(ROUND, replies)[0]
    trimmed = wrapped("FedTrimmedAvg", "strategy").aggregate_train(ROUND, good_replies())[0]
    assert mean is not None and trimmed is not None
    a, b = as_numpy(mean)["fc.weight"], as_numpy(trimmed)["fc.weight"]
    assert np.abs(a - b).max() > 1e-3


@pytest.mark.parametrize("name", ["FedAvg", "FedProx"])
@pytest.mark.parametrize("rule", ["inverse-mse", "fedavg", "mean"])
def test_fedquant_rule_is_the_simulators_aggregate(name: str, rule: str, in_run: None) -> None:
    """FedAvg/FedProx of one reply is that reply: the aggregate, bit for bit."""
    fedavg = rule == "fedavg"
    arrays, metrics = wrapped(name, rule).aggregate_train(ROUND, good_replies(fedavg=fedavg))
    assert arrays is not None and metrics is not None
    payloads = [client_payload(j, fedavg=fedavg) for j in range(len(NODES))]
    expected = aggregate_payloads(payloads, rule, num_examples=SIZES if fedavg else None)
    assert_same(as_numpy(arrays), expected.tensors)
    assert metrics["fedquant.uplink-bytes"] == sum(len(p) for p in payloads)
    # client metrics: the strategy's own weighted mean over the three replies
    assert metrics["train-loss"] == pytest.approx(np.average([0.5, 1.5, 2.5], weights=SIZES))


@pytest.mark.parametrize("rounds", [1, 2])
def test_fedadam_steps_from_the_inverse_mse_aggregate(rounds: int, in_run: None) -> None:
    """Adam's update (Reddi et al. 2020), written out, from fedquant's aggregate."""
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    strategy = QuantizedStrategy(FedAdam(eta=eta, beta_1=b1, beta_2=b2, tau=tau), SPEC)
    x = {k: v.astype(np.float64) for k, v in start_state().items()}
    m = {k: np.zeros_like(v) for k, v in x.items()}
    v = {k: np.zeros_like(v) for k, v in x.items()}
    for r in range(1, rounds + 1):
        current = model_dtypes(x)
        strategy.configure_train(r, record_from_numpy(current), ConfigRecord(), FakeGrid(NODES))
        payloads = [client_payload(j) for j in range(len(NODES))]
        msgs = [payload_reply(p, n, 1, 1.0) for p, n in zip(payloads, NODES, strict=True)]
        arrays, _ = strategy.aggregate_train(r, msgs)
        assert arrays is not None
        agg = aggregate_payloads(payloads, "inverse-mse").tensors
        eta_r = eta * np.sqrt(1 - b2 ** (r + 1)) / (1 - b1 ** (r + 1))
        for k in x:
            delta = agg[k].astype(np.float64) - current[k].astype(np.float64)
            m[k] = b1 * m[k] + (1 - b1) * delta
            v[k] = b2 * v[k] + (1 - b2) * delta**2
            x[k] = current[k] + eta_r * m[k] / (np.sqrt(v[k]) + tau)
        got = as_numpy(arrays)
        for k, ref in model_dtypes(x).items():
            assert got[k].dtype == ref.dtype  # float32 in, float32 out (Adam computes in float64)
            # FedAdam mixes float32 and float64 steps; the reference is all float64
            np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-6, err_msg=k)
        # the step moved the model towards the aggregate, not onto it
        assert not np.allclose(got["fc.weight"], agg["fc.weight"], atol=1e-4)


@pytest.mark.parametrize("aggregation", ["inverse-mse", "strategy"])
def test_the_strategys_metric_function_runs_once_over_the_clients(
    aggregation: str, in_run: None
) -> None:
    """A custom train_metrics_aggr_fn sees the admitted clients' records, once."""
    calls: list[int] = []

    def count(contents: list[RecordDict], key: str) -> MetricRecord:
        calls.append(len(contents))
        losses = [float(next(iter(c.metric_records.values()))["train-loss"]) for c in contents]
        return MetricRecord({"clients": len(contents), "worst-loss": max(losses)})

    strategy = QuantizedStrategy(
        FedAdam(train_metrics_aggr_fn=count), SPEC, aggregation=aggregation
    )
    strategy.configure_train(
        ROUND, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
    )
    _, metrics = strategy.aggregate_train(ROUND, good_replies())
    assert metrics is not None
    assert metrics["clients"] == 3 and metrics["worst-loss"] == 2.5
    assert 3 in calls


def test_robust_flower_strategy_with_a_fedquant_rule_warns(
    in_run: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        QuantizedStrategy(FedMedian(), SPEC, aggregation="inverse-mse")
    assert "aggregation='strategy'" in caplog.text


# --------------------------------------------------------------------------- bad replies


def hostile_replies() -> dict[str, Message]:
    """One of each kind of reply that Flower's consistency check or fedquant refuses."""
    nan_state = client_state(0)
    nan_state["fc.weight"] = nan_state["fc.weight"].copy()
    nan_state["fc.weight"][0, 0] = np.nan
    payload = client_payload(1)
    no_mse = MetricRecord({"train-loss": 1.0, "num-examples": 1})
    wrong_mse = payload_metrics(payload, **{"train-loss": 1.0, "num-examples": 1})
    wrong_mse[MSE_PREFIX + "fc.weight"] = 1e-9
    other_keys = payload_metrics(payload, **{"accuracy": 1.0, "num-examples": 1})
    no_weight = payload_metrics(payload, **{"train-loss": 1.0})
    zero_weight = payload_metrics(payload, **{"train-loss": 1.0, "num-examples": 0})
    as_list = payload_metrics(payload, **{"train-loss": [1.0, 2.0], "num-examples": 1})
    plain = MetricRecord({"train-loss": 1.0, "num-examples": 1})

    def with_payload(metrics: MetricRecord, node: int) -> Message:
        return reply(RecordDict({"arrays": payload_record(payload), "metrics": metrics}), node)

    return {
        "plain float record with NaN": reply(
            RecordDict({"arrays": record_from_numpy(nan_state), "metrics": plain}), 201
        ),
        "no fedquant metric keys": with_payload(no_mse, 202),
        "altered MSE": with_payload(wrong_mse, 203),
        "other metric keys": with_payload(other_keys, 204),
        "no weight key": with_payload(no_weight, 205),
        "zero weight": with_payload(zero_weight, 208),
        "a list where the others send a number": with_payload(as_list, 209),
        "two ArrayRecords": reply(
            RecordDict(
                {
                    "arrays": payload_record(payload),
                    "more": payload_record(payload),
                    "metrics": payload_metrics(payload, **{"num-examples": 1}),
                }
            ),
            206,
        ),
        "error reply": reply(Error(code=0, reason="client crashed"), 207),
    }


REASONS = {
    "plain float record with NaN": "is fedquant_mod in the ClientApp's mods?",
    "no fedquant metric keys": "fedquant.mse.* entries do not match the payload",
    "altered MSE": "but the payload says",
    "other metric keys": "MetricRecord keys differ from the other replies'",
    "no weight key": "has no 'num-examples'",
    "zero weight": "'num-examples' is 0; expected one number > 0",
    "a list where the others send a number": "entries ['train-loss'] are lists of another length",
    "two ArrayRecords": "2 ArrayRecord(s)",
    "error reply": "client crashed",
}


def test_each_hostile_reply_alone_would_fail_flowers_fedavg(in_run: None) -> None:
    """The premise: without the screening these replies end the round (and the run)."""
    kinds = ("plain float record with NaN", "no fedquant metric keys", "two ArrayRecords")
    for kind in kinds:
        strategy = FedAvg()
        strategy.configure_train(
            ROUND, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
        )
        with pytest.raises(InconsistentMessageReplies):
            strategy.aggregate_train(ROUND, [good_replies()[0], hostile_replies()[kind]])


@pytest.mark.parametrize("name", ["FedAvg", "FedAdam", "FedProx", "FedTrimmedAvg"])
@pytest.mark.parametrize("aggregation", ["inverse-mse", "strategy"])
def test_hostile_replies_are_rejected_with_reasons_and_the_round_goes_on(
    name: str, aggregation: str, in_run: None, caplog: pytest.LogCaptureFixture
) -> None:
    good = good_replies(sizes=[1, 1, 1])
    bad = list(hostile_replies().values())
    with caplog.at_level(logging.WARNING):
        arrays, metrics = wrapped(name, aggregation).aggregate_train(
            ROUND, [good[0], *bad[:4], good[1], *bad[4:], good[2]]
        )
    assert arrays is not None and metrics is not None
    assert metrics["fedquant.clients"] == 3 and metrics["fedquant.rejected"] == len(bad)
    for reason in REASONS.values():
        assert reason in caplog.text, reason
    # the same result as the three good replies alone
    clean, _ = wrapped(name, aggregation).aggregate_train(ROUND, good_replies(sizes=[1, 1, 1]))
    assert clean is not None
    assert_same(as_numpy(arrays), as_numpy(clean))


def test_hostile_evaluate_replies_are_dropped(
    in_run: None, caplog: pytest.LogCaptureFixture
) -> None:
    def ev(metrics: dict[str, float], node: int) -> Message:
        return reply(RecordDict({"metrics": MetricRecord(metrics)}), node, "evaluate")

    replies = [
        ev({"eval-acc": 0.5, "num-examples": 1}, 101),
        ev({"eval-acc": 0.7, "num-examples": 1}, 102),
        ev({"loss": 9.0, "num-examples": 1}, 103),  # other keys
        ev({"eval-acc": 0.0}, 104),  # no weight
        reply(Error(code=0, reason="evaluation crashed"), 105, "evaluate"),
    ]
    with caplog.at_level(logging.WARNING):
        metrics = wrapped("FedAvg").aggregate_evaluate(ROUND, replies)
    assert metrics is not None and metrics["eval-acc"] == pytest.approx(0.6)
    assert "node 103" in caplog.text and "node 104" in caplog.text
    assert "evaluation crashed" in caplog.text


# --------------------------------------------------------------------------- fail fast


def bad_only() -> list[Message]:
    return [hostile_replies()["plain float record with NaN"]]


def test_silent_rounds_stop_the_run_with_the_reasons(in_run: None) -> None:
    strategy = wrapped("FedAdam", max_silent_rounds=2)
    assert strategy.aggregate_train(1, bad_only()) == (None, None)
    with pytest.raises(NoAdmittedRepliesError, match=r"2 consecutive rounds \(rounds 1-2\)") as e:
        strategy.aggregate_train(2, bad_only())
    assert "is fedquant_mod in the ClientApp's mods" in str(e.value)
    assert "node 201" in str(e.value) and "\n" not in str(e.value)


def test_an_admitted_round_resets_the_count(in_run: None) -> None:
    strategy = wrapped("FedAvg", max_silent_rounds=2)
    strategy.aggregate_train(1, bad_only())
    assert strategy.aggregate_train(2, good_replies())[0] is not None
    strategy.aggregate_train(3, bad_only())  # one silent round again: no error
    with pytest.raises(NoAdmittedRepliesError):
        strategy.aggregate_train(4, bad_only())


def test_the_default_is_three_rounds_and_none_disables(in_run: None) -> None:
    strategy = wrapped("FedAvg")
    for r in (1, 2):
        strategy.aggregate_train(r, [])
    with pytest.raises(NoAdmittedRepliesError, match="no replies arrived"):
        strategy.aggregate_train(3, [])
    never = wrapped("FedAvg", max_silent_rounds=None)
    for r in range(1, 10):
        assert never.aggregate_train(r, bad_only()) == (None, None)


def test_rounds_that_sent_nothing_do_not_count(in_run: None) -> None:
    strategy = QuantizedStrategy(FedAvg(fraction_train=0.0), SPEC, max_silent_rounds=1)
    state = record_from_numpy(start_state())
    assert list(strategy.configure_train(1, state, ConfigRecord(), FakeGrid(NODES))) == []
    assert strategy.aggregate_train(1, []) == (None, None)


class NoGrid:
    """A Grid that fails the test if a round starts."""

    def get_node_ids(self) -> list[int]:
        raise AssertionError("a round started")

    def send_and_receive(self, *args: object, **kwargs: object) -> list[Message]:
        raise AssertionError("a round started")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"uplink": "4-2-2-4"}, r"uplink: bits: '4-2-2-4' gives 4 per-layer widths"),
        ({"downlink": "4-2-2-4"}, r"downlink: bits: .* the model has 2 quantizable tensors"),
    ],
)
def test_start_checks_the_spec_before_round_1(kwargs: dict[str, str], match: str) -> None:
    strategy = QuantizedStrategy(FedAvg(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match) as e:
        strategy.start(NoGrid(), record_from_numpy(start_state()), num_rounds=1)  # type: ignore[arg-type]
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "FedAvg"}, "strategy: expected a flwr.serverapp.strategy.Strategy"),
        (
            {"aggregation": "average"},
            "aggregation: 'average' is not valid; expected one of strategy",
        ),
        ({"uplink": "9"}, "uplink: bits"),
        ({"downlink": "x"}, "downlink: bits"),
        ({"max_silent_rounds": 0}, "max_silent_rounds: expected an integer >= 1"),
        ({"aggregation_options": {"trim": 0.1}}, r"unknown option\(s\) \['trim'\]; expected"),
        ({"aggregation_options": {"shared_key": 1}}, r"unknown option\(s\) \['shared_key'\]"),
    ],
)
def test_invalid_settings_raise_config_error(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"strategy": FedAvg(), **kwargs}
    with pytest.raises(ConfigError, match=match):
        QuantizedStrategy(**args)  # type: ignore[arg-type]


def test_aggregation_options_reach_aggregate_payloads(in_run: None) -> None:
    capped = wrapped("FedAvg", aggregation_options={"max_weight": 0.4})
    arrays, _ = capped.aggregate_train(ROUND, good_replies())
    assert arrays is not None
    payloads = [client_payload(j) for j in range(len(NODES))]
    expected = aggregate_payloads(payloads, "inverse-mse", max_weight=0.4).tensors
    assert_same(as_numpy(arrays), expected)
    uncapped = aggregate_payloads(payloads, "inverse-mse").tensors
    assert not np.array_equal(expected["fc.weight"], uncapped["fc.weight"])


# --------------------------------------------------------------------------- messages


@pytest.mark.parametrize("name", ["FedAvg", "FedAdam", "FedProx", "FedAvgM"])
def test_configure_train_keeps_the_strategys_messages_and_state(name: str, in_run: None) -> None:
    strategy = QuantizedStrategy(STRATEGIES[name](), SPEC, downlink="8", seed=3)
    state = start_state()
    msgs = list(
        strategy.configure_train(4, record_from_numpy(state), ConfigRecord(), FakeGrid(NODES))
    )
    assert sorted(m.metadata.dst_node_id for m in msgs) == NODES
    config = msgs[0].content["config"]
    assert config["server-round"] == 4 and config["fedquant.bits"] == "2"
    if name == "FedProx":
        assert config["proximal-mu"] == 0.1  # the wrapped strategy's own entries stay
    sent = payload_from_record(msgs[0].content["arrays"])
    assert sent == simulator_broadcast(state, "8", seed=3, r=4)
    # FedOpt/FedAvgM remember the float model they sent, not the payload
    current = getattr(strategy.strategy, "current_arrays", None)
    if current is not None:
        got = current if isinstance(current, dict) else numpy_from_record(current)
        np.testing.assert_array_equal(got["fc.weight"], state["fc.weight"])


def test_strategy_aggregation_keeps_num_examples_on_the_client(in_run: None) -> None:
    strategy = QuantizedStrategy(FedAvg(), SPEC, aggregation="strategy")
    (msg, *_) = strategy.configure_train(
        1, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
    )
    reply_ = make_app()(msg, context())
    assert reply_.content["metrics"]["num-examples"] == 123  # disclosed: FedAvg weights by it
    hidden = QuantizedStrategy(FedAvg(), SPEC, aggregation="mean")
    (msg, *_) = hidden.configure_train(
        1, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
    )
    assert make_app()(msg, context()).content["metrics"]["num-examples"] == 1


# --------------------------------------------------------------------------- per-node bits


def test_a_node_sets_its_own_bits_and_the_server_aggregates_mixed_widths(in_run: None) -> None:
    strategy = QuantizedStrategy(FedAvg(), "2", seed=1)
    msgs = list(
        strategy.configure_train(
            1, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
        )
    )
    app = make_app()
    widths = {NODES[0]: None, NODES[1]: "4", NODES[2]: 8}  # str or int, as TOML gives them
    replies = []
    for k, m in enumerate(msgs):
        ctxt = context(k)
        node = m.metadata.dst_node_id
        if widths[node] is not None:
            ctxt.node_config[NODE_BITS_KEY] = widths[node]
        replies.append(app(m, ctxt))
    payloads = [payload_from_record(r.content["arrays"]) for r in replies]
    bits = [codec.describe_payload(p).info["fc.weight"].bits for p in payloads]
    assert sorted(bits) == [2, 4, 8]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["fedquant.clients"] == 3
    assert (metrics["fedquant.bits-min"], metrics["fedquant.bits-max"]) == (2, 8)
    assert_same(as_numpy(arrays), aggregate_payloads(payloads, "inverse-mse").tensors)


@pytest.mark.parametrize("value, match", [("4-2-2-4", "gives 4 per-layer widths"), ("9", "bits")])
def test_a_bad_node_bits_setting_is_an_error_reply(value: str, match: str, in_run: None) -> None:
    strategy = QuantizedStrategy(FedAvg(), "2")
    (msg, *_) = strategy.configure_train(
        1, record_from_numpy(start_state()), ConfigRecord(), FakeGrid(NODES)
    )
    ctxt = context(0)
    ctxt.node_config[NODE_BITS_KEY] = value
    r = make_app()(msg, ctxt)
    assert r.has_error()
    assert match in r.error.reason and NODE_BITS_KEY in r.error.reason


def test_node_spec_keeps_the_servers_other_settings() -> None:
    server = QuantSpec.from_strings(bits="4-2", rounding="nearest", rules="fc.*=8")
    ctxt = context(0)
    assert node_spec(server, ctxt) == server
    ctxt.node_config[NODE_BITS_KEY] = "3"
    mine = node_spec(server, ctxt)
    assert mine.describe_bits() == "3" and mine.rounding == server.rounding
    assert mine.rules == server.rules
    assert UplinkConfig(mine).spec == mine
    with pytest.raises(FedquantError, match="fedquant-bits"):
        ctxt.node_config[NODE_BITS_KEY] = 2.5
        node_spec(server, ctxt)


# --------------------------------------------------------------------------- the pin


def test_the_installed_flower_is_in_the_supported_range() -> None:
    """The tests run against a Flower inside the range pyproject.toml declares."""
    import sys
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    (req,) = [Requirement(r) for r in extras["flower"] if Requirement(r).name == "flwr"]
    assert req.specifier.contains(version("flwr")), (str(req), version("flwr"))
    assert not req.specifier.contains("2.0"), "the range must end before an untested release"
