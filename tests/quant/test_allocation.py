"""Adaptive bit allocation: MSE curves against the real quantizer, optimality, budgets, specs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fedquant.errors import ConfigError, InvalidInputError, NonFiniteError
from fedquant.fl.config import RunConfig
from fedquant.quant import codec
from fedquant.quant.allocation import (
    MAX_SAMPLES,
    allocate,
    allocate_bits,
    budget_of,
    expected_sq_error,
    mse_curve,
    plan_tensors,
    rounding_sq_error,
)
from fedquant.quant.clipping import threshold
from fedquant.quant.grid import QUANT_BITS, noise_coefficient
from fedquant.quant.quantizer import fake_quantize, quantize
from fedquant.quant.spec import QuantSpec, TensorPlan

#: the paper's CNN on 28x28x1 inputs: its four weight tensors (4-2-2-4 applies to them)
CNN_SHAPES = {
    "conv1.weight": (16, 1, 3, 3),
    "conv2.weight": (16, 16, 3, 3),
    "fc1.weight": (100, 784),
    "fc2.weight": (10, 100),
}
CNN_4224_BITS = 144 * 4 + 2304 * 2 + 78400 * 2 + 1000 * 4  # = 165,984 over 81,848 weights


def cnn_state(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights shaped like the paper's CNN (Laplace: heavier tails than the init) plus a bias."""
    rng = np.random.default_rng(seed)
    out = {n: rng.laplace(scale=0.05, size=s).astype(np.float32) for n, s in CNN_SHAPES.items()}
    out["fc2.bias"] = rng.normal(size=10).astype(np.float32)
    out["bn.num_batches_tracked"] = np.array(7, dtype=np.int64)
    return out


# --------------------------------------------------------------------------- curves


@pytest.mark.parametrize("bits", [1, 2, 3, 5, 8])
def test_expected_error_of_nearest_rounding_is_the_real_error(bits: int) -> None:
    rng = np.random.default_rng(bits)
    x = rng.laplace(size=5000).astype(np.float32)
    s = 1.7
    real = (fake_quantize(x, bits, scale=s, rounding="nearest").astype(np.float64) - x) ** 2
    step = 2 * s / (2**bits - 1)
    # the quantizer computes levels in float32: elementwise differences of ~1e-7 relative
    np.testing.assert_allclose(
        expected_sq_error(x, s, bits, "nearest"), real, rtol=1e-4, atol=1e-6 * step**2
    )


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_expected_error_of_stochastic_rounding_matches_seeded_draws(bits: int) -> None:
    rng = np.random.default_rng(10 + bits)
    x = rng.normal(size=4000).astype(np.float32)
    s = float(threshold(x, bits, "stochastic"))
    draws = np.array(
        [quantize(x, bits, scale=s, rounding="stochastic", seed=k).mse for k in range(200)]
    )
    expected = float(np.mean(expected_sq_error(x, s, bits, "stochastic")))
    # 200 independent draws of the MSE: the mean's standard error, 5 of them (p < 1e-6)
    se = draws.std(ddof=1) / math.sqrt(draws.size)
    assert abs(draws.mean() - expected) <= 5 * se
    assert se < 0.01 * expected  # the check is sharp: 5 SE is under 5 % of the value


def test_expected_error_edges() -> None:
    # on the grid: no error; s = 0 sends everything to 0; clipped values pay (|x| - s)^2
    grid = np.array([-1.5, -0.5, 0.5, 1.5])
    assert expected_sq_error(grid, 1.5, 2, "stochastic").tolist() == [0.0] * 4
    assert expected_sq_error(np.array([3.0, -2.0]), 0.0, 3, "nearest").tolist() == [9.0, 4.0]
    assert expected_sq_error(np.array([2.5]), 1.5, 2, "nearest").tolist() == [1.0]
    # per-value scales broadcast
    out = expected_sq_error(np.array([1.0, 1.0]), np.array([1.0, 0.0]), 1, "nearest")
    assert out.tolist() == [0.0, 1.0]


@pytest.mark.parametrize(
    ("method", "granularity"),
    [("octav", "tensor"), ("octav", "channel"), ("max", "tensor"), ("aciq-laplace", "tensor")],
)
def test_curve_is_the_encoders_mse_for_small_tensors(method: str, granularity: str) -> None:
    """<= MAX_SAMPLES values, nearest rounding: the curve is the MSE the encoder measures."""
    x = np.random.default_rng(1).laplace(size=(40, 300)).astype(np.float32)
    x[3] *= 4  # rows of different spread, so per-channel thresholds differ
    plan = TensorPlan(bits=8, method=method, rounding="nearest", granularity=granularity)  # type: ignore[arg-type]
    curve = mse_curve(x, plan)
    measured = [
        quantize(x, b, method=method, rounding="nearest", granularity=granularity).mse
        for b in QUANT_BITS
    ]
    # float32 accumulation in the kernel against float64 here
    np.testing.assert_allclose(curve, measured, rtol=1e-4)
    assert np.all(np.diff(curve) < 0)  # more bits, less error


def test_curve_of_a_large_tensor_is_within_sampling_error_of_the_real_mse() -> None:
    """Above MAX_SAMPLES the rounding error comes from a strided subsample: only its
    sampling error remains (the clipping error is summed over every value)."""
    x = np.random.default_rng(2).laplace(size=7 * MAX_SAMPLES + 5).astype(np.float32)
    plan = TensorPlan(bits=8, rounding="nearest")  # type: ignore[arg-type]
    curve = mse_curve(x, plan)
    stride = -(-x.size // MAX_SAMPLES)
    for i, b in enumerate(QUANT_BITS):
        s = threshold(x, b, "nearest")
        real = quantize(x, b, scale=s, rounding="nearest").mse
        sample = rounding_sq_error(x[::stride], s, b, "nearest")
        # the subsample mean's standard error, 5 of them (p < 1e-6 for i.i.d. values)
        se = sample.std(ddof=1) / math.sqrt(sample.size)
        assert abs(curve[i] - real) <= 5 * se, (b, curve[i], real, se)
        assert se < 0.005 * real  # the check is sharp: 5 SE is under 2.5 %
    # with every value sampled the curve is the real MSE (float32 kernel vs float64)
    full = mse_curve(x, plan, max_samples=x.size)
    real = [quantize(x, b, rounding="nearest").mse for b in QUANT_BITS]
    np.testing.assert_allclose(full, real, rtol=1e-5)


def test_curve_beats_octavs_uniform_noise_model_where_allocation_decides() -> None:
    """Why the curve is not OCTAV's modelled MSE: that model is >5 % off at 1 bit (Laplace)."""
    x = np.random.default_rng(3).laplace(size=20000).astype(np.float32)
    s = threshold(x, 1, "nearest")
    a = np.abs(x.astype(np.float64))
    modelled = (
        np.sum((a[a > s] - s) ** 2) + noise_coefficient(1, "nearest") * s * s * np.sum(a <= s)
    ) / a.size
    real = quantize(x, 1, scale=s, rounding="nearest").mse
    ours = mse_curve(x, TensorPlan(bits=1, rounding="nearest"), bits=[1])[0]  # type: ignore[arg-type]
    assert abs(modelled - real) > 0.05 * real
    assert abs(ours - real) < 1e-4 * real


def test_curve_edges() -> None:
    plan = TensorPlan(bits=8)
    assert mse_curve(np.zeros((0, 3), np.float32), plan).tolist() == [0.0] * 8
    assert mse_curve(np.zeros((4, 4), np.float32), plan).tolist() == [0.0] * 8
    with pytest.raises(NonFiniteError, match="mse_curve: input holds 1 NaN/Inf"):
        mse_curve(np.array([[1.0, np.nan]], np.float32), plan)
    with pytest.raises(InvalidInputError, match="max_samples=0"):
        mse_curve(np.ones((2, 2), np.float32), plan, max_samples=0)


# --------------------------------------------------------------------------- optimality


def brute_force(sizes: list[int], curves: np.ndarray, budget: float) -> float:
    limit = math.floor(budget * sum(sizes) + 1e-6)
    best = math.inf
    for combo in itertools.product(range(8), repeat=len(sizes)):
        if sum(n * (k + 1) for n, k in zip(sizes, combo, strict=True)) <= limit:
            best = min(
                best,
                sum(n * curves[i, k] for i, (n, k) in enumerate(zip(sizes, combo, strict=True))),
            )
    return best


@pytest.mark.parametrize("case", range(40))
def test_allocation_is_optimal_against_brute_force(case: int) -> None:
    rng = np.random.default_rng(case)
    layers = int(rng.integers(1, 5))
    sizes = [int(v) for v in rng.integers(1, 60, size=layers)]
    if case % 2:  # realistic: decreasing, roughly 4^-b with random spreads
        curves = (
            rng.uniform(0.1, 10, size=(layers, 1))
            * 4.0 ** -np.arange(8)
            * rng.uniform(0.7, 1.3, size=(layers, 8))
        )
    else:  # anything goes: non-monotone, non-convex
        curves = rng.uniform(0, 1, size=(layers, 8))
    budget = float(rng.uniform(1, 8))
    a = allocate_bits(sizes, curves, budget)
    assert a.exact
    assert a.total_bits <= budget * sum(sizes) + 1e-6
    assert a.total_bits == sum(n * b for n, b in zip(sizes, a.bits, strict=True))
    assert a.error == pytest.approx(
        sum(n * curves[i, b - 1] for i, (n, b) in enumerate(zip(sizes, a.bits, strict=True)))
    )
    assert a.error == pytest.approx(brute_force(sizes, curves, budget), rel=1e-12)


def test_budget_is_respected_exactly_at_its_edges() -> None:
    sizes = list(math.prod(s) for s in CNN_SHAPES.values())
    curves = 4.0 ** -np.arange(8)[None, :] * np.array([[3.0], [1.0], [0.5], [2.0]])
    assert allocate_bits(sizes, curves, 1.0).bits == (1, 1, 1, 1)
    assert allocate_bits(sizes, curves, 8.0).bits == (8, 8, 8, 8)
    assert allocate_bits(sizes, curves, 100.0).bits == (8, 8, 8, 8)
    # the exact average of 4-2-2-4 is not a float: the budget still allows its 165,984 bits
    budget = CNN_4224_BITS / sum(sizes)
    a = allocate_bits(sizes, curves, budget)
    assert a.budget_bits == CNN_4224_BITS
    assert a.total_bits <= CNN_4224_BITS
    # one bit less is one bit less
    assert (
        allocate_bits(sizes, curves, (CNN_4224_BITS - 1) / sum(sizes)).budget_bits
        == CNN_4224_BITS - 1
    )


def test_many_tensors_of_mixed_sizes_stay_exact_and_fast() -> None:
    """30 tensors from 100 to 2M weights: the default frontier cap is never reached."""
    rng = np.random.default_rng(8)
    sizes = [int(v) for v in rng.integers(100, 2_000_000, size=30)]
    curves = rng.uniform(0.1, 10, size=(30, 1)) * 4.0 ** -np.arange(8)
    curves = curves * rng.uniform(0.8, 1.2, size=(30, 8))
    for budget in (1.5, 3.1, 6.5):
        a = allocate_bits(sizes, curves, budget)
        b = allocate_bits(sizes, curves, budget, max_frontier=1 << 20)
        assert a.exact and a.bits == b.bits
        assert a.total_bits <= budget * sum(sizes) + 1e-6
        # no single width change that fits the budget lowers the error
        for i in range(30):
            for k in range(1, 9):
                cost = a.total_bits + sizes[i] * (k - a.bits[i])
                if cost <= a.budget_bits:
                    assert (
                        sizes[i] * (curves[i, k - 1] - curves[i, a.bits[i] - 1]) >= -1e-9 * a.error
                    )


def test_thinned_frontier_still_respects_the_budget() -> None:
    rng = np.random.default_rng(7)
    sizes = [int(v) for v in rng.integers(1, 1000, size=12)]
    curves = rng.uniform(0.5, 2, size=(12, 1)) * 4.0 ** -np.arange(8)
    exact = allocate_bits(sizes, curves, 3.3)
    thin = allocate_bits(sizes, curves, 3.3, max_frontier=4)
    assert exact.exact and not thin.exact
    assert thin.total_bits <= math.floor(3.3 * sum(sizes) + 1e-6)
    assert thin.error >= exact.error * (1 - 1e-12)


def test_more_bits_go_to_the_tensor_with_the_larger_spread() -> None:
    rng = np.random.default_rng(4)
    tensors = {
        "narrow": rng.normal(scale=0.01, size=(64, 64)).astype(np.float32),
        "mid": rng.normal(scale=0.1, size=(64, 64)).astype(np.float32),
        "wide": rng.normal(scale=1.0, size=(64, 64)).astype(np.float32),
    }
    result = allocate(tensors, QuantSpec.from_strings(bits="auto:3"))
    bits = result.bits
    # a 10x spread is a 100x error at the same width: ~3.3 more bits to equalize marginal gains
    assert bits["narrow"] < bits["mid"] < bits["wide"]
    assert result.allocation.total_bits <= 3 * 3 * 64 * 64
    # the choice is the argmin of the objective: moving a bit anywhere costs error
    c = result.curves
    err = result.allocation.error
    names = list(result.names)
    for i, j in itertools.permutations(range(3), 2):
        b = [bits[n] for n in names]
        if b[i] < 8 and b[j] > 1:
            b[i] += 1
            b[j] -= 1
            assert sum(4096 * c[k, b[k] - 1] for k in range(3)) >= err


def test_allocate_bits_errors() -> None:
    with pytest.raises(InvalidInputError, match=r"curves have shape \(1, 8\); expected \(2, 8\)"):
        allocate_bits([1, 2], np.ones((1, 8)), 2.0)
    with pytest.raises(InvalidInputError, match="sizes must be >= 0"):
        allocate_bits([-1], np.ones((1, 8)), 2.0)
    with pytest.raises(InvalidInputError, match="curves must be finite"):
        allocate_bits([1], np.full((1, 8), np.nan), 2.0)
    with pytest.raises(
        InvalidInputError, match=r"budget=0.5 bits per weight; expected a number >= 1"
    ):
        allocate_bits([1], np.ones((1, 8)), 0.5)
    with pytest.raises(InvalidInputError, match="max_frontier=0"):
        allocate_bits([1], np.ones((1, 8)), 2.0, max_frontier=0)
    assert allocate_bits([], np.zeros((0, 8)), 2.0).bits == ()


# --------------------------------------------------------------------------- spec and codec


def test_auto_spec_round_trips() -> None:
    spec = QuantSpec.from_strings(bits="auto:2.03", rules="fc2.*=8")
    assert spec.bit_budget == 2.03 and spec.layer_bits == ()
    assert spec.describe_bits() == "auto:2.03"
    assert spec.to_dict()["bits"] == "auto:2.03"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    exact = CNN_4224_BITS / 81848
    assert QuantSpec.from_strings(bits=f"auto:{exact!r}").bit_budget == exact  # repr round-trips
    assert QuantSpec.from_strings(bits="AUTO:3").describe_bits() == "auto:3.0"
    assert RunConfig(bits="auto:2.03").uplink_spec().bit_budget == 2.03


@pytest.mark.parametrize("bad", ["auto:", "auto:x", "auto:0.5", "auto:8.5", "auto:nan", "auto:inf"])
def test_auto_spec_errors(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"bits: .* is not a bit budget; expected 'auto:BITS'"):
        QuantSpec.from_strings(bits=bad)
    with pytest.raises(ConfigError, match=r"^bits: .*expected 'auto:BITS'"):
        RunConfig(bits=bad)


def test_auto_spec_excludes_per_layer_widths() -> None:
    with pytest.raises(ConfigError, match="bits: a bit budget .* and per-layer widths exclude"):
        QuantSpec(layer_bits=(4, 2), bit_budget=2.0)
    with pytest.raises(ConfigError, match="bits: bit budget '2' is not a number"):
        QuantSpec(bit_budget="2")  # type: ignore[arg-type]


def test_codec_allocates_per_encode_and_the_server_needs_nothing_new() -> None:
    state = cnn_state()
    budget = budget_of("4-2-2-4", {n: a.shape for n, a in state.items() if a.dtype.kind == "f"})
    assert budget == CNN_4224_BITS / 81848
    spec = QuantSpec.from_strings(bits=f"auto:{budget!r}")
    auto = codec.encode_with_stats(state, spec, seed=1)
    fixed = codec.encode_with_stats(state, QuantSpec.from_strings(bits="4-2-2-4"), seed=1)
    chosen = allocate(state, spec)
    assert {n: i.bits for n, i in auto.tensors.items() if i.bits <= 8} == chosen.bits
    assert sum(auto.tensors[n].numel * auto.tensors[n].bits for n in CNN_SHAPES) <= CNN_4224_BITS
    # same tensors and scales: bytes differ only by the rounding up of each tensor's codes
    assert auto.nbytes <= fixed.nbytes + len(CNN_SHAPES) - 1
    # the prediction is what was paid (stochastic rounding: a few % of draw noise)
    paid = sum(auto.tensors[n].numel * auto.tensors[n].mse for n in CNN_SHAPES)
    assert paid == pytest.approx(chosen.allocation.error, rel=0.05)
    assert chosen.allocation.error <= sum(
        math.prod(CNN_SHAPES[n]) * chosen.curves[i, b - 1]
        for i, (n, b) in enumerate(zip(CNN_SHAPES, (4, 2, 2, 4), strict=True))
    )
    decoded = codec.decode(auto.payload)
    assert decoded.tensors["fc2.bias"].tolist() == state["fc2.bias"].tolist()
    # another update, other widths: scaling conv1 up makes its error dominate
    louder = dict(state, **{"conv1.weight": state["conv1.weight"] * 1000})
    again = codec.encode_with_stats(louder, spec, seed=1)
    assert again.tensors["conv1.weight"].bits > auto.tensors["conv1.weight"].bits


def test_rules_fix_their_tensors_outside_the_budget() -> None:
    state = cnn_state()
    spec = QuantSpec.from_strings(bits="auto:2", rules="fc1.*=8,fc2.bias=4")
    result = allocate(state, spec)
    assert result.names == ("conv1.weight", "conv2.weight", "fc2.weight")
    assert result.plans["fc1.weight"].bits == 8 and result.plans["fc2.bias"].bits == 4
    assert result.allocation.total_bits <= 2 * (144 + 2304 + 1000)
    assert not result.plans["bn.num_batches_tracked"].quantized
    enc = codec.encode_with_stats(state, spec, seed=0)
    assert enc.tensors["fc1.weight"].bits == 8
    assert budget_of(QuantSpec.from_strings(bits="4", rules="fc1.*=8"), CNN_SHAPES) == 4.0
    assert budget_of(spec, CNN_SHAPES) == 2.0


def test_plan_tensors_and_errors() -> None:
    state = cnn_state()
    fixed = QuantSpec.from_strings(bits="4-2-2-4")
    assert plan_tensors(state, fixed) == fixed.resolve(
        {n: (a.shape, a.dtype.kind == "f") for n, a in state.items()}
    )
    with pytest.raises(InvalidInputError, match="has no bit budget; expected 'auto:BITS'"):
        allocate(state, fixed)
    bad = dict(state, **{"fc2.weight": np.full((10, 100), np.inf, np.float32)})
    with pytest.raises(NonFiniteError, match="allocate: tensor 'fc2.weight'"):
        codec.encode(bad, QuantSpec.from_strings(bits="auto:2"), seed=0)
    with pytest.raises(InvalidInputError, match="budget_of: the tensors have no quantizable"):
        budget_of("4", {"b": (3,)})


def test_qat_fake_quantizes_at_the_allocated_widths() -> None:
    import torch

    from fedquant.fl.client import _attach_qat, state_numpy
    from fedquant.fl.models import PaperCNN

    torch.manual_seed(0)
    model = PaperCNN()
    spec = QuantSpec.from_strings(bits="auto:2.5")
    want = allocate(state_numpy(model), spec).bits
    attached = _attach_qat(model, spec, np.random.default_rng(0))
    got = {
        f"{name}.weight": module.parametrizations["weight"][0].plan.bits  # type: ignore[index]
        for name, module in model.named_modules()
        if hasattr(module, "parametrizations")
    }
    assert got == want and len(attached) == 4
