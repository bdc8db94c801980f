"""The issue-8 measurements (fedquant.tools.bench.allocation) at the smallest scale."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.fl.client import state_numpy
from fedquant.fl.models import PaperCNN
from fedquant.tools.bench.allocation import (
    VARIANTS,
    codec_comparison,
    federated_comparison,
    markdown,
)


def test_codec_comparison_pairs_each_fixed_setting_with_auto_at_its_budget() -> None:
    import torch

    torch.manual_seed(0)
    state = state_numpy(PaperCNN())
    rows = codec_comparison(state, ("4-2-2-4", "3"), repeats=1)
    assert [r["spec"] for r in rows][0::2] == ["4-2-2-4", "3"]
    assert rows[1]["spec"] == "auto:2.027954256670902" and rows[3]["spec"] == "auto:3.0"
    for fixed, auto in (rows[0:2], rows[2:4]):
        assert auto["budget_of"] == fixed["spec"]
        assert auto["bits_per_weight"] <= fixed["bits_per_weight"] + 1e-12
        # same tensors and scales: bytes differ only by rounding each tensor's codes up
        assert auto["bytes"] <= fixed["bytes"] + 3
        # the allocation minimizes the predicted error; stochastic draws add a few %
        assert auto["sq_error_ratio"] < 1.05
        assert auto["predicted_sq_error"] == pytest.approx(auto["sq_error"], rel=0.05)
        assert fixed["encode_ratio"] == 1.0 and auto["encode_ratio"] > 0
    table = markdown(rows, ["spec", "bits_per_weight", "bytes"])
    assert table.splitlines()[0] == "| spec | bits_per_weight | bytes |"
    assert "| 4-2-2-4 | 2.028 | " in table


@pytest.mark.slow
def test_federated_comparison_runs_the_variants() -> None:
    labels = ["auto at 4-2-2-4's budget", "2-bit delta + error feedback"]
    assert set(labels) <= set(VARIANTS)
    rows, states = federated_comparison(1, 2, seed=1, variants=labels)
    assert [r["label"] for r in rows] == labels
    auto, ef = rows
    assert auto["bits"] == "auto:2.027954256670902" and len(auto["bits_per_round"]) == 1
    assert ef["upload"] == "delta" and ef["error_feedback"] is True
    for r in rows:
        assert r["final_accuracy"] > 0.3 and r["uplink_bytes"] == 2 * r["bytes_per_upload"]
        assert r["uplink_sq_error"] > 0 and np.isfinite(r["uplink_sq_error"])
    assert set(states) == set(labels)


def test_allocation_table_and_headline_show_where_auto_loses() -> None:
    from fedquant.tools.bench import report

    rows = [
        {"spec": "4-2-2-4", "budget_of": "4-2-2-4", "bits": {"a": 4, "b": 2},
         "bits_per_weight": 2.0, "bytes": 100, "sq_error": 1.0, "sq_error_ratio": 1.0,
         "encode_ms": 1.0, "encode_ratio": 1.0},
        {"spec": "auto:2.0", "budget_of": "4-2-2-4", "bits": {"a": 3, "b": 2},
         "bits_per_weight": 2.0, "bytes": 99, "sq_error": 1.2, "sq_error_ratio": 1.2,
         "encode_ms": 5.0, "encode_ratio": 5.0},
    ]  # fmt: skip
    sec = {"n": 0, "allocation": {"models": {"toy": rows}}}
    text = "\n".join(report.beyond_markdown(sec))
    assert "### Adaptive bit allocation" in text
    # columns: spec, budget, one per layer, bits/weight, bytes, sq error, ratio, ms, ratio
    assert "| `auto:2.0` | `4-2-2-4` | 3 | 2 | 2.0000 | 99 | 1.2 | 1.2 | 5 | 5 |" in text
    ((figure, value),) = report.beyond_headline({"sections": {"beyond": sec}})
    assert "toy" in figure and value == "3-2, 2.000, 1.2"
