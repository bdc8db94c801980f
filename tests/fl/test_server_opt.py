"""Server optimizers against hand-computed steps of Reddi et al. (2021)'s update equations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedquant.errors import ConfigError, InvalidInputError
from fedquant.fl.server_opt import ServerOptimizer

X0 = {"w": np.array([1.0, -2.0], dtype=np.float32), "bn.running_mean": np.array([0.0])}
# two rounds of plain aggregates: pseudo-gradients D1 = (0.5, -0.5), D2 = (-0.25, 0.5)
AGG1 = {"w": np.array([1.5, -2.5], dtype=np.float32), "bn.running_mean": np.array([3.0])}


def two_steps(opt: ServerOptimizer) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    first = opt.step(X0, AGG1, ["w"], {})
    x1 = first.model
    agg2 = {"w": x1["w"] + np.array([-0.25, 0.5], dtype=np.float32), "bn.running_mean": [4.0]}
    second = opt.step(x1, agg2, ["w"], first.state)
    return x1["w"], second.model["w"], second.state


def test_fedavgm_momentum() -> None:
    opt = ServerOptimizer.create("fedavgm", lr=0.5, momentum=0.9)
    x1, x2, state = two_steps(opt)
    # m1 = D1; x1 = x0 + 0.5 m1
    assert x1 == pytest.approx([1.0 + 0.5 * 0.5, -2.0 - 0.5 * 0.5])
    # m2 = 0.9 m1 + D2 (D2 is measured from x1)
    m2 = [0.9 * 0.5 - 0.25, 0.9 * -0.5 + 0.5]
    assert state["m/w"] == pytest.approx(m2)
    assert x2 == pytest.approx([1.25 + 0.5 * m2[0], -2.25 + 0.5 * m2[1]], rel=1e-6)
    assert int(state["step"]) == 2


def test_fedadam() -> None:
    opt = ServerOptimizer.create("fedadam")  # Flower's defaults: lr 0.1, b1 0.9, b2 0.99, tau 1e-9
    assert (opt.lr, opt.momentum, opt.beta2, opt.tau) == (0.1, 0.9, 0.99, 1e-9)
    x1, x2, state = two_steps(opt)
    m1, v1 = 0.1 * 0.5, 0.01 * 0.25  # coordinate 0; coordinate 1 mirrors it
    step1 = 0.1 * m1 / (math.sqrt(v1) + 1e-9)
    assert x1 == pytest.approx([1.0 + step1, -2.0 - step1], rel=1e-6)
    d2 = (-0.25, 0.5)
    m2 = [0.9 * m1 + 0.1 * d2[0], 0.9 * -m1 + 0.1 * d2[1]]
    v2 = [0.99 * v1 + 0.01 * d2[0] ** 2, 0.99 * v1 + 0.01 * d2[1] ** 2]
    assert state["m/w"] == pytest.approx(m2) and state["v/w"] == pytest.approx(v2)
    expect = [float(x1[i]) + 0.1 * m2[i] / (math.sqrt(v2[i]) + 1e-9) for i in range(2)]
    assert x2 == pytest.approx(expect, rel=1e-6)


def test_fedyogi_sign_rule() -> None:
    opt = ServerOptimizer.create("fedyogi", lr=0.01, tau=1e-3)
    x1, x2, state = two_steps(opt)
    # v0 = 0: v1 = 0 - 0.01 * D^2 * sign(0 - D^2) = 0.01 * D^2
    m1, v1 = 0.05, 0.01 * 0.25
    step1 = 0.01 * m1 / (math.sqrt(v1) + 1e-3)
    assert x1 == pytest.approx([1.0 + step1, -2.0 - step1], rel=1e-6)
    d2 = (-0.25, 0.5)
    # round 2: v1 = 0.0025 < D2^2 for both coordinates, so v grows by 0.01 * D2^2
    v2 = [v1 + 0.01 * d2[0] ** 2, v1 + 0.01 * d2[1] ** 2]
    assert state["v/w"] == pytest.approx(v2)
    # and a v larger than D^2 shrinks: v - 0.01 * D^2
    big = {"m/w": np.zeros(2), "v/w": np.array([1.0, 1.0]), "step": np.asarray(5)}
    s = opt.step(X0, AGG1, ["w"], big).state
    assert s["v/w"] == pytest.approx([1.0 - 0.01 * 0.25] * 2)
    m2 = [0.9 * m1 + 0.1 * d2[0], -0.9 * m1 + 0.1 * d2[1]]
    expect = [float(x1[i]) + 0.01 * m2[i] / (math.sqrt(v2[i]) + 1e-3) for i in range(2)]
    assert x2 == pytest.approx(expect, rel=1e-6)


def test_fedadagrad_accumulates() -> None:
    opt = ServerOptimizer.create("fedadagrad")  # lr 0.1, b1 0 (Flower), tau 1e-9
    x1, x2, state = two_steps(opt)
    assert x1 == pytest.approx([1.0 + 0.1 * 0.5 / 0.5, -2.0 - 0.1], rel=1e-6)
    v2 = [0.25 + 0.0625, 0.25 + 0.25]
    assert state["v/w"] == pytest.approx(v2)
    d2 = (-0.25, 0.5)
    expect = [float(x1[i]) + 0.1 * d2[i] / (math.sqrt(v2[i]) + 1e-9) for i in range(2)]
    assert x2 == pytest.approx(expect, rel=1e-6)


def test_buffers_take_the_aggregate_and_none_is_identity() -> None:
    for name in ("fedadam", "fedavgm", "none"):
        x1 = ServerOptimizer.create(name, momentum=0.5).step(X0, AGG1, ["w"], {}).model
        assert x1["bn.running_mean"].tolist() == [3.0]
        assert x1["w"].dtype == np.float32
    same = ServerOptimizer.create("none").step(X0, AGG1, ["w"], {})
    assert np.array_equal(same.model["w"], AGG1["w"]) and same.state == {}
    # FedAvgM at lr 1, momentum 0 is FedAvg
    avg = ServerOptimizer.create("fedavgm").step(X0, AGG1, ["w"], {}).model
    assert np.array_equal(avg["w"], AGG1["w"])


def test_bad_names_and_mismatched_tensors() -> None:
    with pytest.raises(ConfigError, match="server_optimizer: 'fedsgd' is not valid; expected"):
        ServerOptimizer.create("fedsgd")
    with pytest.raises(InvalidInputError, match="aggregate's tensors"):
        ServerOptimizer.create("fedadam").step(X0, {"w": AGG1["w"]}, ["w"], {})
