"""Smoke test of the batched-clients benchmark (tiny data; no timing thresholds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedquant.errors import ConfigError
from fedquant.fl.config import RunConfig
from fedquant.fl.data import Dataset
from fedquant.tools.bench.batched import batched_speedup, format_table, main


def tiny() -> Dataset:
    rng = np.random.default_rng(2)
    return Dataset(
        name="tiny",
        train_x=rng.integers(0, 256, (90, 8, 8, 1), dtype=np.uint8),
        train_y=rng.integers(0, 3, 90),
        test_x=rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
        test_y=rng.integers(0, 3, 10),
        classes=("a", "b", "c"),
    )


CFG = RunConfig(num_clients=3, batch_size=16, bits="32")


def test_batched_speedup_smoke() -> None:
    res = batched_speedup(CFG, ks=(3, 2), reps=2, dataset=tiny())
    assert [r["variant"] for r in res["rows"]] == ["loop", "batched-3", "batched-2"]
    assert res["clients"] == 3 and res["examples"] == 90 and res["reps"] == 2
    for row in res["rows"]:
        assert len(row["all_s"]) == 2 and row["median_s"] > 0
        if row["k"]:
            assert math.isfinite(row["speedup"]) and row["speedup"] > 0
            # the batched variants trained the same models (float round-off only)
            assert row["max_abs_diff"] < 1e-5
    assert "batched-2" in format_table(res)


def test_batched_speedup_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"^reps: 0 is out of range"):
        batched_speedup(CFG, reps=0, dataset=tiny())
    with pytest.raises(ConfigError, match=r"^ks: \[0\] is not valid"):
        batched_speedup(CFG, ks=(0,), dataset=tiny())
    with pytest.raises(ConfigError, match=r"^qat: .* not batched"):
        batched_speedup(CFG.with_(qat=True, bits="8"), dataset=tiny())
    assert main(["--ks", "x"]) == 2
