"""The report helpers of the tools: JSON files, Markdown tables, the environment line."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fedquant.tools.report import (
    environment,
    environment_line,
    plain,
    source_commit,
    table,
    write_json,
)


def test_write_json_nan_is_null_and_numpy_is_plain(tmp_path: Path) -> None:
    obj = {
        "loss": math.nan,
        "inf": -math.inf,
        "n": np.int64(3),
        "x": np.float32(0.5),
        "a": np.arange(3),
        "t": (1, 2),
    }
    p = write_json(tmp_path / "sub" / "r.json", obj)
    assert p == tmp_path / "sub" / "r.json"
    assert json.loads(p.read_text()) == {
        "loss": None,
        "inf": None,
        "n": 3,
        "x": 0.5,
        "a": [0, 1, 2],
        "t": [1, 2],
    }
    assert p.read_text().endswith("}\n")
    assert [q.name for q in p.parent.iterdir()] == ["r.json"]  # no temporary file left


def test_write_json_rows_per_line_and_digits(tmp_path: Path) -> None:
    rows = {"env": {"python": "3"}, "rows": [{"a": 1, "b": 1 / 3}, {"a": 2, "b": None}]}
    text = write_json(tmp_path / "t.json", rows, digits=3, rows=True).read_text()
    assert text.splitlines() == [
        "{",
        ' "env": {"python": "3"},',
        ' "rows": [',
        '  {"a": 1, "b": 0.333},',
        '  {"a": 2, "b": null}',
        " ]",
        "}",
    ]
    assert json.loads(text)["rows"][0]["b"] == 0.333


def test_plain_refuses_what_json_cannot_hold() -> None:
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        plain({"x": object()})
    assert plain(0.0, digits=2) == 0.0 and plain(123456.0, digits=2) == 120000.0


def test_table() -> None:
    assert table(["a", "b"], [[1, "x"], ["—", 2.5]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1 | x |",
        "| — | 2.5 |",
    ]


def test_source_commit_names_a_commit_not_a_path(tmp_path: Path) -> None:
    assert source_commit(tmp_path) is None  # not a git checkout
    here = Path(__file__).resolve().parent
    head = subprocess.run(
        ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    commit = source_commit(here)
    assert commit is not None and commit.split("+")[0] == head


def test_environment_line_has_versions_cpu_and_commit() -> None:
    env = environment()
    assert env["numpy"] == np.__version__ and env["cpu_count"] >= 1
    line = environment_line(env)
    assert f"numpy {np.__version__}" in line and "CPU: " in line
    assert str(Path.cwd()) not in line and "/" not in line.split("source:")[1].replace("+", "")
    assert environment_line({"python": "3.12"}).endswith("source: commit not recorded.")
