"""End-to-end runs of the simulator on the embedded MNIST subset."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from fedquant.fl.config import RunConfig
from fedquant.fl.simulation import TIMING_KEYS, Simulation, final_accuracy
from fedquant.quant.codec import decode

FAST = dict(num_clients=4, rounds=3, seed=1)


def strip_timings(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in metrics]


@pytest.fixture(scope="module")
def short_run() -> tuple[Simulation, Any, list[bytes]]:
    sim = Simulation(RunConfig(**FAST))
    seen: list[bytes] = []
    original = sim.client_payload

    def spy(*a: Any, **k: Any) -> Any:
        out = original(*a, **k)
        seen.append(out.payload)
        return out

    sim.client_payload = spy  # type: ignore[method-assign]
    state = sim.run()
    return sim, state, seen


def test_learns_far_above_chance(short_run) -> None:  # type: ignore[no-untyped-def]
    _, state, _ = short_run
    # 3 rounds x 4,000 images at 4-2-2-4 bits: chance is 10 %
    assert final_accuracy(state.metrics) > 0.6
    assert [r["round"] for r in state.metrics] == [1, 2, 3]


def test_reported_bytes_are_the_payload_lengths(short_run) -> None:  # type: ignore[no-untyped-def]
    sim, state, seen = short_run
    per_round = [seen[i * 4 : (i + 1) * 4] for i in range(3)]
    for row, payloads in zip(state.metrics, per_round, strict=True):
        assert row["uplink_bytes"] == sum(len(p) for p in payloads)
        assert row["uplink_float32_bytes"] == 4 * sim.reference.float32_nbytes
        assert row["uplink_ratio"] == pytest.approx(
            row["uplink_float32_bytes"] / row["uplink_bytes"]
        )
        assert row["uplink_ratio"] > 12
    # the payloads really carry 4-2-2-4 and inverse-MSE clients do not disclose their size
    d = decode(seen[0])
    assert [i.bits for i in d.info.values() if i.bits <= 8] == [4, 2, 2, 4]
    assert "num_examples" not in d.meta
    assert state.metrics[-1]["cum_uplink_bytes"] == sum(len(p) for p in seen)


def test_same_seed_same_metrics_different_seed_different() -> None:
    cfg = RunConfig(num_clients=3, rounds=2, seed=5, client_fraction=0.67)
    a = Simulation(cfg).run()
    b = Simulation(cfg).run()
    diff = [
        (r, k, ra[k], rb.get(k))
        for r, (ra, rb) in enumerate(
            zip(strip_timings(a.metrics), strip_timings(b.metrics), strict=True)
        )
        for k in ra
        if ra[k] != rb.get(k)
    ]
    assert not diff
    for k in a.global_state:
        assert np.array_equal(a.global_state[k], b.global_state[k])
    c = Simulation(cfg.with_(seed=6)).run()
    assert strip_timings(a.metrics) != strip_timings(c.metrics)


def test_fedavg_discloses_sizes_and_failures_and_downlink() -> None:
    cfg = RunConfig(
        num_clients=4,
        rounds=2,
        aggregation="fedavg",
        failure_rate=0.5,
        downlink_bits="8",
        partition="dirichlet",
        alpha=0.5,
        eval_every=2,
    )
    sim = Simulation(cfg)
    state = sim.run()
    r1, r2 = state.metrics
    assert "test_accuracy" not in r1 and "test_accuracy" in r2
    for r in (r1, r2):
        assert r["clients_failed"] + r["clients_aggregated"] == r["clients_sampled"]
        # the 8-bit broadcast is far smaller than float32
        per_client = r["downlink_bytes"] / max(1, r["clients_sampled"] - r["clients_failed"])
        assert per_client < sim.reference.float32_nbytes / 3.5
    assert sim.label_counts.sum() == sim.dataset.train_y.size


def test_min_clients_skips_round_without_changing_model() -> None:
    cfg = RunConfig(num_clients=3, rounds=1, failure_rate=0.99, min_clients=3)
    sim = Simulation(cfg)
    state = sim.run()
    row = state.metrics[0]
    assert "skipped" in row and "min_clients=3" in row["skipped"]
    for k, v in sim.initial_state.items():
        assert np.array_equal(state.global_state[k], v)
    assert math.isnan(row["train_loss"]) or row["clients_aggregated"] == 0


def test_qat_runs_and_leaves_plain_weights() -> None:
    cfg = RunConfig(num_clients=2, rounds=1, qat=True, bits="2")
    sim = Simulation(cfg)
    state = sim.run()
    assert set(state.global_state) == set(sim.initial_state)  # parametrizations removed
    assert final_accuracy(state.metrics) > 0.3
