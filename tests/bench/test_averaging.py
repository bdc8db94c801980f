"""The averaging benchmark: the error of the server's mean of N uploads of the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedquant.tools.bench import averaging, cli


def _gauss(n: int = 1 << 16, seed: int = 3) -> dict[str, np.ndarray]:
    return {"w": np.random.default_rng(seed).standard_normal((n // 256, 256)).astype(np.float32)}


def test_unbiased_noise_shrinks_as_one_over_n() -> None:
    # max-abs scaling clips nothing, so stochastic rounding is unbiased: E(N) = E(1) / N
    errs = averaging.averaged_errors(
        _gauss(), method="max", rounding="stochastic", bits=4, clients=(1, 10, 30)
    )
    for n in (10, 30):
        assert errs[n] * n == pytest.approx(errs[1], rel=0.05)
    assert averaging.bias_share(errs) == pytest.approx(0.0, abs=0.02)


def test_nearest_rounding_error_does_not_average_away() -> None:
    errs = averaging.averaged_errors(
        _gauss(), method="octav", rounding="nearest", bits=3, clients=(1, 5)
    )
    assert errs[5] == pytest.approx(errs[1], rel=1e-9)
    assert averaging.bias_share(errs) == pytest.approx(1.0)


def test_octav_clipping_bias_stays_in_the_average() -> None:
    x = _gauss()
    one = {
        m: averaging.averaged_errors(x, method=m, rounding="stochastic", bits=2, clients=(1, 30))
        for m in ("octav", "octav-paper", "max")
    }
    # OCTAV minimizes one upload's error ...
    assert one["octav"][1] < one["octav-paper"][1] < one["max"][1]
    # ... but its clipping bias does not shrink: the mean of 30 keeps well over 1/30 of it,
    # and the rules that clip less end lower
    assert one["octav"][30] > 3 * one["octav"][1] / 30
    assert one["octav-paper"][30] < one["octav"][30]
    share = averaging.bias_share(one["octav"])
    assert share is not None and 0.1 < share < 1.0


def test_bias_share_needs_two_sizes_and_arguments_are_checked() -> None:
    assert averaging.bias_share({1: 0.5}) is None
    with pytest.raises(ValueError, match="uploads >= 1"):
        averaging.averaged_errors(_gauss(), method="max", rounding="nearest", bits=2, clients=(0,))
    with pytest.raises(ValueError, match="all zero"):
        averaging.averaged_errors(
            {"w": np.zeros((4, 4), np.float32)}, method="max", rounding="nearest", bits=2
        )


def test_averaging_section_quick(tmp_path: Path) -> None:
    argv = ["--quick", "--out", str(tmp_path), "--only", "averaging", "--models", "mnist"]
    assert cli.main(argv) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    rows = res["sections"]["averaging"]["rows"]
    assert {r["source"] for r in rows} == {"gaussian", "mnist"}
    assert {r["method"] for r in rows} == set(averaging.METHODS)
    md = (tmp_path / "bench.md").read_text()
    assert "## Averaging: one upload vs the server's mean of N uploads" in md
    assert "### Stochastic rounding" in md and "### Nearest rounding" in md
    sweep = res["sections"]["averaging"]["sweep"]
    assert {(r["source"], r["bits"]) for r in sweep} == {
        (s, b) for s in ("gaussian", "mnist") for b in (2, 4)
    }
    assert "the threshold that is best for the mean of 4" in md


def test_threshold_sweep_factor_one_is_octav_and_finds_the_aggregate_optimum() -> None:
    x = _gauss()
    sweep = averaging.threshold_sweep(
        x, rounding="stochastic", bits=2, clients=30, factors=(0.5, 1.0, 1.8, 4.0)
    )
    # factor 1 is OCTAV itself: the same error the encoder's mean of 30 gives (other seeds)
    via_codec = averaging.averaged_errors(
        x, method="octav", rounding="stochastic", bits=2, clients=(30,)
    )[30]
    assert sweep["nmse"]["1"] == pytest.approx(via_codec, rel=0.05)
    # clipping less than OCTAV is better for the mean of 30; far less (4x) is worse again
    assert sweep["best_factor"] == 1.8
    assert sweep["nmse"]["1.8"] < 0.5 * sweep["nmse"]["1"]
    assert sweep["nmse"]["4"] > sweep["nmse"]["1.8"]
    # one upload: OCTAV's threshold is the best of these
    one = averaging.threshold_sweep(
        x, rounding="stochastic", bits=2, clients=1, factors=(0.5, 1.0, 1.8, 4.0)
    )
    assert one["best_factor"] == 1.0
    with pytest.raises(ValueError, match="expected >= 1"):
        averaging.threshold_sweep(x, rounding="stochastic", bits=2, clients=0)
    with pytest.raises(ValueError, match="> 0"):
        averaging.threshold_sweep(x, rounding="stochastic", bits=2, clients=2, factors=(0.0,))
    with pytest.raises(ValueError, match="threshold_sweep: the tensors are all zero"):
        averaging.threshold_sweep(
            {"w": np.zeros((4, 4), np.float32)}, rounding="stochastic", bits=2, clients=2
        )
