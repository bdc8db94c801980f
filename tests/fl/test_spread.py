"""Inverse-MSE across bit widths: the clients' spread s^2 added to their MSE."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.fl.aggregation import aggregate_payloads, client_spread, compute_weights
from fedquant.quant.codec import encode
from fedquant.quant.spec import QuantSpec


def test_client_spread_is_the_sample_variance_minus_the_mean_mse() -> None:
    ups = [{"w": np.array([0.0, 0.0])}, {"w": np.array([2.0, 0.0])}, {"w": np.array([4.0, 0.0])}]
    # coordinate 0: sample variance 4, coordinate 1: 0 -> V = 2; mean MSE 0.5 -> s^2 = 1.5
    mse = [{"w": 0.25}, {"w": 0.5}, {"w": 0.75}]
    assert client_spread(ups, mse, ["w"]) == {"w": pytest.approx(1.5)}
    assert client_spread(ups, [{"w": 9.0}] * 3, ["w"]) == {"w": 0.0}  # never negative
    assert client_spread(ups[:1], mse[:1], ["w"]) == {"w": 0.0}


def test_weights_are_inverse_mse_plus_spread() -> None:
    mse = [{"w": 1.0}, {"w": 100.0}]
    plain = compute_weights("inverse-mse", ["w"], mse=mse, mse_floor_rel=0.0)["w"]
    assert plain == pytest.approx([100 / 101, 1 / 101])
    w = compute_weights("inverse-mse", ["w"], mse=mse, mse_floor_rel=0.0, spread={"w": 1000.0})
    inv = np.array([1 / 1001, 1 / 1100])
    assert w["w"] == pytest.approx(inv / inv.sum())


def _payload(x: np.ndarray, bits: int, seed: int) -> bytes:
    return encode({"w": x.reshape(100, 200)}, QuantSpec(default_bits=bits), seed=seed)


def test_two_and_eight_bit_clients() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(0, 0.05, 20_000).astype(np.float32)
    # clients that agree: the 2-bit client keeps a small weight, as with plain inverse-MSE
    same = [_payload(base, 2, 1), _payload(base, 8, 2)]
    w_plain = aggregate_payloads(same, "inverse-mse", mse_floor_rel=0.0).weights["w"]
    w_same = aggregate_payloads(same, "inverse-mse", mse_floor_rel=0.0, spread=True).weights["w"]
    assert w_plain[0] < 1e-3 and w_same[0] < 0.02
    # with the default relative floor (1 % of the median MSE): about [0.005, 0.995]
    floored = aggregate_payloads(same, "inverse-mse").weights["w"]
    assert floored[0] == pytest.approx(0.005, abs=2e-4)
    # clients whose models differ far more than 2-bit quantization perturbs them: near equal
    other = base + rng.normal(0, 0.2, base.size).astype(np.float32)
    apart = [_payload(other, 2, 1), _payload(base, 8, 2)]
    w_apart = aggregate_payloads(apart, "inverse-mse", mse_floor_rel=0.0, spread=True).weights["w"]
    assert 0.3 < w_apart[0] < 0.5
    # fedavg and mean ignore it
    w_mean = aggregate_payloads(apart, "mean", spread=True).weights["w"]
    assert w_mean.tolist() == [0.5, 0.5]
