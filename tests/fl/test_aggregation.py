"""Aggregation rules against hand-computed NumPy references."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.errors import ConfigError, DecodeError, InvalidInputError
from fedquant.fl.aggregation import (
    MSE_FLOOR_REL,
    aggregate_payloads,
    cap_weights,
    compute_weights,
    parse_rule,
    weighted_average,
)
from fedquant.quant.codec import decode, describe_payload, encode
from fedquant.quant.spec import QuantSpec


def updates(m: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal(3).astype(np.float32),
            "n": np.array(10 * (j + 1), np.int64),
        }
        for j in range(m)
    ]


def test_fedavg_weights_are_n_over_total() -> None:
    ups = updates()
    n = [100, 300, 50, 550]
    w = compute_weights("fedavg", list(ups[0]), num_examples=n)
    ref = np.array(n) / sum(n)
    for name in ups[0]:
        assert np.allclose(w[name], ref)
    out = weighted_average(ups, w)
    assert np.allclose(out["w"], np.average([u["w"] for u in ups], axis=0, weights=n), atol=1e-6)
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64
    assert int(out["n"]) == int(np.rint(np.average([10, 20, 30, 40], weights=n)))


def test_mean() -> None:
    ups = updates(3)
    w = compute_weights("mean", ["w", "b", "n"], num_clients=3)
    out = weighted_average(ups, w)
    assert np.allclose(out["b"], np.mean([u["b"] for u in ups], axis=0), atol=1e-6)


def test_inverse_mse_per_layer() -> None:
    mse = [{"w": 0.1, "b": 0.0}, {"w": 0.2, "b": 0.0}, {"w": 0.4, "b": 0.0}]
    w = compute_weights("inverse-mse", ["w", "b"], mse=mse)
    inv = np.array([10.0, 5.0, 2.5])
    assert np.allclose(w["w"], inv / inv.sum())  # (1/e_j) / sum_k (1/e_k)
    assert np.allclose(w["b"], 1 / 3)  # unquantized tensors: all at the floor -> equal


def test_inverse_mse_floor_bounds_a_zero_claim() -> None:
    # a client claiming MSE 0 gets at most 1/MSE_FLOOR_REL times a median client's weight
    mse = [{"w": 0.0}, {"w": 0.2}, {"w": 0.2}, {"w": 0.2}, {"w": 0.2}]
    w = compute_weights("inverse-mse", ["w"], mse=mse)["w"]
    floor = MSE_FLOOR_REL * 0.2
    ref = np.array([1 / floor] + [1 / 0.2] * 4)
    assert np.allclose(w, ref / ref.sum())
    assert w[0] / w[1] == pytest.approx(1 / MSE_FLOOR_REL)


def test_cap_weights_water_filling() -> None:
    w = cap_weights(np.array([0.9, 0.05, 0.03, 0.02]), 0.4)
    assert w.sum() == pytest.approx(1.0)
    assert w.max() <= 0.4 + 1e-12
    assert w[0] == pytest.approx(0.4)
    # the others keep their proportions
    assert w[1] / w[2] == pytest.approx(0.05 / 0.03)
    # infeasible cap -> equal weights
    assert np.allclose(cap_weights(np.array([5.0, 1.0, 1.0]), 0.2), 1 / 3)
    # no cap -> just normalized
    assert np.allclose(cap_weights(np.array([1.0, 3.0]), None), [0.25, 0.75])
    # two clients above the cap
    w = cap_weights(np.array([0.45, 0.45, 0.05, 0.05]), 0.3)
    assert np.allclose(w, [0.3, 0.3, 0.2, 0.2])


def test_aggregate_payloads_matches_a_numpy_reference() -> None:
    ups = updates(5, seed=3)
    spec = QuantSpec(default_bits=3, rounding="stochastic")
    payloads = [encode(u, spec, seed=j) for j, u in enumerate(ups)]
    res = aggregate_payloads(payloads, "inverse-mse")
    decs = [decode(p) for p in payloads]
    e = np.array([d.info["w"].mse for d in decs])
    assert np.all(e > 0)
    ref = np.average([d.tensors["w"] for d in decs], axis=0, weights=1 / e)
    assert np.allclose(res.tensors["w"], ref, atol=1e-6)
    assert np.allclose(res.tensors["b"], np.mean([u["b"] for u in ups], axis=0), atol=1e-6)
    assert res.nbytes == sum(len(p) for p in payloads)
    # fedavg through the same path
    res = aggregate_payloads(payloads, "fedavg", num_examples=[1, 2, 3, 4, 5])
    ref = np.average([d.tensors["w"] for d in decs], axis=0, weights=[1, 2, 3, 4, 5])
    assert np.allclose(res.tensors["w"], ref, atol=1e-6)


def test_errors() -> None:
    with pytest.raises(
        ConfigError,
        match="aggregation: 'bulyan' is unknown; expected one of: fedavg, inverse-mse, mean, median",
    ):
        parse_rule("bulyan")
    with pytest.raises(InvalidInputError, match="fedavg needs num_examples"):
        compute_weights("fedavg", ["w"], mse=[{"w": 1.0}])
    with pytest.raises(InvalidInputError, match="no client updates"):
        compute_weights("mean", ["w"])
    with pytest.raises(InvalidInputError, match="MSE values for 'w' must be finite"):
        compute_weights("inverse-mse", ["w"], mse=[{"w": float("nan")}])
    with pytest.raises(InvalidInputError, match="reported no MSE for tensor 'w'"):
        compute_weights("inverse-mse", ["w"], mse=[{"b": 1.0}])
    ups = updates(2)
    ups[1]["w"] = ups[1]["w"][:2]
    with pytest.raises(InvalidInputError, match="client #1 sent 'w' with shape"):
        weighted_average(ups, compute_weights("mean", ["w", "b", "n"], num_clients=2))
    a = encode({"w": np.ones(3, np.float32)}, QuantSpec())
    b = encode({"v": np.ones(3, np.float32)}, QuantSpec())
    with pytest.raises(InvalidInputError, match="payload #1 has tensors"):
        aggregate_payloads([a, b], "mean")
    with pytest.raises(DecodeError):
        aggregate_payloads([a, a[:-1]], "mean")


def test_weighted_average_large_small_and_odd_tensors_equal_the_plain_sum() -> None:
    # large float32 (the compiled one-pass path), large non-float32 and strided ones (NumPy),
    # small ones laid end to end, integers and bools: all must equal a plain float64 sum
    rng = np.random.default_rng(3)
    m = 5
    ups = []
    for _ in range(m):
        ups.append(
            {
                "fc.weight": rng.standard_normal((40, 50)).astype(np.float32),
                "wide.weight": rng.standard_normal((3000,)).astype(np.float64),
                "strided": rng.standard_normal((50, 60)).astype(np.float32)[:, ::2],
                "big.count": rng.integers(-1000, 1000, 2000).astype(np.int32),
                "fc.bias": rng.standard_normal(50).astype(np.float32),
                "bn.num_batches_tracked": np.array(int(rng.integers(0, 100)), np.int64),
                "mask": rng.random(7) > 0.5,
            }
        )
    w = {n: rng.dirichlet(np.ones(m)) for n in ups[0]}
    out = weighted_average(ups, w)
    assert list(out) == list(ups[0])
    for name in ups[0]:
        acc = np.zeros(np.shape(ups[0][name]))
        for j, u in enumerate(ups):
            acc += w[name][j] * np.asarray(u[name], dtype=np.float64)
        x0 = ups[0][name]
        if x0.dtype.kind == "f":
            want = acc.astype(np.float32)
        elif x0.dtype.kind == "b":
            want = acc >= 0.5
        else:
            want = np.rint(acc).astype(x0.dtype)
        assert out[name].dtype == want.dtype and out[name].shape == want.shape
        np.testing.assert_array_equal(out[name], want)  # equal, not close: same arithmetic
    # more updates than weights is refused, not an IndexError
    with pytest.raises(InvalidInputError, match="weights for"):
        weighted_average([*ups, ups[0]], w)
    # so are weights of different lengths, and a later client missing a tensor
    short = {**w, "mask": w["mask"][:2]}
    with pytest.raises(InvalidInputError, match="2 weights for 'mask' but at least 3 updates"):
        weighted_average(ups, short)
    partial = [ups[0], {k: v for k, v in ups[1].items() if k != "fc.bias"}]
    with pytest.raises(InvalidInputError, match=r"client #1 has missing tensors \['fc.bias'\]"):
        weighted_average(partial, {n: np.array([0.5, 0.5]) for n in ups[0]})


def test_inverse_mse_names_the_tensor_with_a_bad_claim() -> None:
    mse = [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": -1.0}]
    with pytest.raises(InvalidInputError, match=r"MSE values for 'b' must be finite.*-1\.0"):
        compute_weights("inverse-mse", ["a", "b"], mse=mse)
    ups = updates(2)
    payloads = [encode(u, QuantSpec(), seed=1) for u in ups]
    with pytest.raises(InvalidInputError, match="1 inspected updates for 2 payloads"):
        aggregate_payloads(payloads, "mean", inspected=[describe_payload(payloads[0])])
