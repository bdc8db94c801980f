"""The results directory's per-round files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fedquant.fl.results import CHECKPOINT, ResultsDir


def _rows(n: int) -> list[dict[str, object]]:
    return [
        {
            "round": i + 1,
            "test_accuracy": 0.5 + i / 100,
            "train_loss": math.nan if i == 0 else 1.0 / (i + 1),  # NaN is written as null
            "mse": {"fc.weight": np.float64(1e-3 * (i + 1))},
            "uplink_bytes": np.int64(1000 + i),
        }
        for i in range(n)
    ]


def test_write_round_files_match_a_full_serialization_every_round(tmp_path: Path) -> None:
    rd = ResultsDir(tmp_path)
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    metrics: list[dict[str, object]] = []
    rows = _rows(4)
    for r, row in enumerate(rows, start=1):
        metrics.append(row)
        rd.write_round(r, state, metrics)
        # what the files hold is what a fresh, complete serialization gives
        lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x) for x in lines] == json.loads(
            json.dumps([_plain(m) for m in metrics])
        )
        ck = rd.read_checkpoint()
        assert ck is not None and ck.round == r
        assert ck.metrics == [json.loads(x) for x in lines]
        np.testing.assert_array_equal(ck.global_state["w"], state["w"])
    assert (tmp_path / CHECKPOINT).exists()
    # a changed history (a resumed run's rows are other objects) is written as it is now
    other = _rows(2)
    other[1]["test_accuracy"] = 0.0
    rd.write_round(2, state, other)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["test_accuracy"] == 0.0


def _plain(row: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out[k] = {kk: float(vv) for kk, vv in v.items()}  # type: ignore[arg-type]
        elif isinstance(v, float) and math.isnan(v):
            out[k] = None
        else:
            out[k] = v.item() if isinstance(v, np.generic) else v
    return out
