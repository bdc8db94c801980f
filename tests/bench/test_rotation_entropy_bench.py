"""Smoke tests of the rotation and entropy-coding benchmark functions (small sizes)."""

from __future__ import annotations

import numpy as np
import pytest

from fedquant.tools.bench import entropy as bench_entropy
from fedquant.tools.bench import rotation as bench_rotation


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


# --------------------------------------------------------------------------- report verdicts


def _rot_row(layer: str, numel: int, var: float, plain: float, rotated: float) -> dict:
    return {
        "model": "toy",
        "layer": layer,
        "numel": numel,
        "variance": var,
        "kurtosis": 0.5,
        "granularity": "tensor",
        "rounding": "nearest",
        "bits": 4,
        "nmse_plain": plain,
        "nmse_rotated": rotated,
        "gain": plain / rotated,
        "bpc_plain": 4.1,
        "bpc_rotated": 4.2,
    }


def test_rotation_verdicts_follow_the_rows() -> None:
    from fedquant.tools.bench import report

    rows = [_rot_row("a", 100, 1.0, 0.01, 0.02), _rot_row("b", 300, 4.0, 0.01, 0.04)]
    (tot,) = report.rotation_totals(rows)
    # sum of MSE x size / sum of variance x size
    assert tot["nmse_rotated"] == pytest.approx((0.02 * 100 + 0.04 * 1200) / 1300)
    assert tot["gain"] == pytest.approx(0.01 / tot["nmse_rotated"])
    assert tot["bpc_rotated"] == pytest.approx(4.2)

    def md(rows: list[dict]) -> str:
        sec = {"n": 0, "rotation": {"synthetic": [], "models": {"toy": rows}}}
        return "\n".join(report.beyond_markdown(sec))

    # whole model: gain = 0.01 / 0.03846 = 0.26 (the rotation hurts); per layer 0.5x, 0.25x
    assert f"| tensor | 4 | 0.01 | {report.fmt(tot['nmse_rotated'])} | 0.26x |" in md(rows)
    assert "| `b` | 300 |" in md(rows) and "| 0.25x |" in md(rows)
    better = [_rot_row("a", 100, 1.0, 0.04, 0.01)]
    assert "| tensor | 4 | 0.04 | 0.01 | 4x | 4.100 | 4.200 |" in md(better)


def test_entropy_totals_and_verdicts() -> None:
    from fedquant.tools.bench import report

    layer = {"model": "toy", "rotation": False, "rounding": "stochastic", "bits": 2}
    rows = [
        layer | {"layer": "a", "codes": 100, "entropy": 1.9, "rans": 1.92, "zstd_packed": 2.0},
        layer | {"layer": "b", "codes": 300, "entropy": 1.5, "rans": 1.52, "zstd_packed": 1.4},
        layer | {"layer": "(payload)", "payload_packed": 110, "payload_rans": 110, "saving": 0.0},
    ]
    (tot,) = report.entropy_totals(rows)
    assert tot["rans"] == pytest.approx((1.92 * 100 + 1.52 * 300) / 400)
    assert tot["saving"] == 0.0
    text = "\n".join(report.beyond_markdown({"n": 0, "entropy": {"models": {"toy": rows}}}))
    # rotation, B, entropy, rANS, zstd, payload packed / rANS, saving (code-weighted means)
    assert "| no | 2 | 1.6 | 1.62 | 1.55 | 110 | 110 | 0.0 % |" in text
    assert "| `b` | no | 2 | 1.5 | 1.52 | 1.4 | - |" in text
