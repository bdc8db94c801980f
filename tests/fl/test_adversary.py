"""Hostile and buggy clients: every failure class is rejected or neutralized."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.fl.adversary import MODES, corrupt
from fedquant.fl.aggregation import aggregate_payloads, plausible_mse, relative_cap
from fedquant.fl.config import RunConfig
from fedquant.fl.ingest import Reference, admit
from fedquant.fl.simulation import Simulation, final_accuracy
from fedquant.quant.codec import decode, describe_payload, encode
from fedquant.quant.spec import QuantSpec

STATE = {
    "w": np.random.default_rng(0).standard_normal((8, 9)).astype(np.float32),
    "b": np.zeros(8, np.float32),
    "n": np.array(3, np.int64),
}
REJECTED = {
    "nan-scale",
    "nan-values",
    "negative-mse",
    "nan-mse",
    "wrong-name",
    "wrong-shape",
    "wrong-dtype",
    "oversized",
    "truncated",
}
# admitted, with what they buy bounded: a low MSE claim is floored and capped in the
# aggregation, a huge example count capped, a duplicate counted once
NEUTRALIZED = {"zero-mse", "tiny-mse", "huge-examples", "duplicate"}


def honest(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    st = {**STATE, "w": STATE["w"] + 0.1 * rng.standard_normal(STATE["w"].shape).astype(np.float32)}
    return encode(st, QuantSpec(default_bits=2), seed=seed, meta={"num_examples": 100})


def test_every_mode_is_classified() -> None:
    assert set(MODES) == REJECTED | NEUTRALIZED


@pytest.mark.parametrize("mode", sorted(REJECTED))
def test_malformed_replies_are_rejected_with_a_reason(mode: str) -> None:
    a = admit("c", corrupt(honest(0), mode), Reference.from_state(STATE))
    assert not a.ok and a.reason


@pytest.mark.parametrize("mode", ["zero-mse", "tiny-mse"])
def test_lying_about_mse_is_bounded_even_without_admission(mode: str) -> None:
    good = [honest(s) for s in range(1, 5)]
    liar = corrupt(honest(0), mode)
    assert describe_payload(liar).info["w"].mse <= 1e-30
    m = 5
    res = aggregate_payloads([liar, *good], "inverse-mse", max_weight=relative_cap(3.0, m))
    w = res.weights["w"]
    # a claim below the floor is raised to the median claim: the liar is weighted like
    # the median client, no more than the best honest one and no less than the worst
    assert w[0] <= 3 / m + 1e-12
    assert min(w[1:]) - 1e-12 <= w[0] <= max(w[1:]) + 1e-12
    assert np.isclose(w[1:], w[0]).any()  # exactly the weight of the median claim
    assert all(np.isfinite(v).all() for v in res.tensors.values())
    assert plausible_mse(describe_payload(liar).info["w"]) > 0


def test_honest_clients_near_the_grid_are_admitted() -> None:
    """Weights that already sit on the grid (a model sent quantized, trained a few
    steps) rounded to nearest measure an MSE far below ``D**2/12``: still honest."""
    spec = QuantSpec(default_bits=2, rounding="nearest")
    first = encode(STATE, spec, seed=0, meta={"num_examples": 100})
    on_grid = {k: np.asarray(v) for k, v in decode(first).tensors.items()}
    rng = np.random.default_rng(1)
    moved = dict(on_grid, w=on_grid["w"] + 1e-4 * rng.standard_normal(on_grid["w"].shape))
    moved["w"] = moved["w"].astype(np.float32)
    payload = encode(moved, spec, meta={"num_examples": 100})
    info = describe_payload(payload).info["w"]
    assert info.mse < plausible_mse(info)  # what an MSE screen would have refused
    a = admit("c", payload, Reference.from_state(STATE))
    assert a.ok, a.reason


def test_huge_example_claims_are_capped_in_fedavg() -> None:
    payloads = [corrupt(honest(0), "huge-examples"), *[honest(s) for s in range(1, 5)]]
    n = [int(describe_payload(p).meta["num_examples"]) for p in payloads]
    assert n[0] == 10**12
    res = aggregate_payloads(payloads, "fedavg", num_examples=n, max_weight=relative_cap(3.0, 5))
    assert res.weights["w"][0] == pytest.approx(0.6)
    assert np.allclose(res.weights["w"][1:], 0.1)


def test_duplicate_client_ids_count_once() -> None:
    sim = Simulation(
        RunConfig(num_clients=3, rounds=1, hostile_fraction=0.34, hostile_mode="duplicate")
    )
    state = sim.run()
    row = state.metrics[0]
    assert row["clients_rejected"] == 1 and "duplicate client id" in next(
        iter(row["rejected"].values())
    )
    assert row["clients_aggregated"] == 3


@pytest.mark.slow
def test_thirty_percent_hostile_clients_end_within_two_points() -> None:
    base = RunConfig(num_clients=10, rounds=8, seed=2)
    clean = Simulation(base).run()
    sim = Simulation(base.with_(hostile_fraction=0.3, hostile_mode="mixed"))
    assert len(sim.hostile) == 3
    hostile = sim.run()
    for row in hostile.metrics:
        assert all(np.isfinite(v).all() for v in hostile.global_state.values())
        assert row["clients_rejected"] == 2  # nan-scale and nan-values; zero-mse is floored
    assert abs(final_accuracy(hostile.metrics) - final_accuracy(clean.metrics)) <= 0.02
    assert final_accuracy(hostile.metrics) > 0.85
