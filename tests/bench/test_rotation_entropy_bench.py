"""Smoke tests of the rotation and entropy-coding benchmark functions (small sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.bench import entropy as bench_entropy
from fedquant.bench import rotation as bench_rotation


def test_rotation_errors_reach_the_gaussian_figure_on_heavy_tails() -> None:
    rows = bench_rotation.rotation_errors(
        sources=("student-t3",), bits=(2, 4), roundings=("nearest",), n=1 << 16
    )
    assert [(r["source"], r["bits"]) for r in rows] == [("student-t3", 2), ("student-t3", 4)]
    for r in rows:
        # 2**16 values: the rotated NMSE within 5 % of the closed form, and far below plain
        assert r["rotated_vs_gaussian"] == pytest.approx(1.0, abs=0.05)
        assert r["gain"] > 2.0
        assert r["bpc_rotated"] == pytest.approx(r["bits"], rel=0.01)
        assert r["mse_report_error"] < 1e-4


def test_rotation_weight_errors_cover_every_layer_and_granularity() -> None:
    rng = np.random.default_rng(0)
    state = {
        "conv.weight": rng.standard_t(3, (8, 3, 3, 3)).astype(np.float32),
        "conv.bias": np.zeros(8, np.float32),
        "fc.weight": rng.standard_t(3, (10, 100)).astype(np.float32),
    }
    rows = bench_rotation.rotation_weight_errors(state, "toy", bits=(4,))
    assert {(r["layer"], r["granularity"]) for r in rows} == {
        (layer, g) for layer in ("conv.weight", "fc.weight") for g in ("tensor", "channel")
    }
    assert all(r["nmse_rotated"] > 0 and r["bpc_rotated"] >= r["bpc_plain"] for r in rows)


def test_rotation_speed_rows() -> None:
    rows = bench_rotation.rotation_speed(n=1 << 14, threads=(1,), reps=1)
    assert [r["op"] for r in rows] == [
        "rotate",
        "unrotate",
        "encode",
        "encode(rotation)",
        "decode",
        "decode(rotation)",
    ]
    assert all(r["ratio_memcpy"] > 0 and r["seconds"] > 0 for r in rows)


def test_entropy_efficiency_meets_the_entropy() -> None:
    rows = bench_entropy.entropy_efficiency(
        sources=("gaussian",), bits=(2, 4), roundings=("nearest",), rotated=(False,), n=1 << 16
    )
    for r in rows:
        assert r["entropy"] <= r["rans"] < r["entropy"] * 1.01
        assert r["rans"] < r["packed"] == r["bits"]
        if "zstd_packed" in r:  # zstandard installed: the peer is measured too
            assert r["zstd_packed"] >= r["rans"]


def test_entropy_weight_rows_report_payload_savings() -> None:
    rng = np.random.default_rng(1)
    state = {"fc.weight": rng.standard_normal((64, 256)).astype(np.float32)}
    rows = bench_entropy.entropy_weight_efficiency(state, "toy", bits=(4,), rotated=(True,))
    payload = [r for r in rows if r["layer"] == "(payload)"]
    assert len(payload) == 1 and 0.0 < payload[0]["saving"] < 0.15


def test_entropy_speed_rows() -> None:
    rows = bench_entropy.entropy_speed(n=1 << 14, bits=(4,), reps=1)
    ops = [r["op"] for r in rows]
    assert ops[:4] == [
        "rans encode",
        "rans decode (codes)",
        "rans decode (levels)",
        "packed dequantize",
    ]
    assert all(r["ratio_memcpy"] > 0 for r in rows)
