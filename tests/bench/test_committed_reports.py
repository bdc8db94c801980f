"""The committed benchmark reports are their JSON rendered by the current generator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fedquant.tools.bench import report

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "folder",
    ["bench", "bench-speed", "bench-speed-nomalloc", "bench-speed-malloc", "bench-averaging"],
)
def test_committed_report_renders_from_its_json(folder: str) -> None:
    d = ROOT / "docs" / "results" / folder
    results = json.loads((d / "bench.json").read_text())
    # regenerate with: fedquant.tools.bench.report.write_markdown(json, "<folder>/bench.md")
    assert (d / "bench.md").read_text() == report.markdown(results)


def test_benchmark_code_names_no_tracker_items() -> None:
    pattern = re.compile(r"\b(issue|item|part) \d+|section \d", re.IGNORECASE)
    for path in sorted((ROOT / "src" / "fedquant" / "tools" / "bench").glob("*.py")):
        hits = [m.group(0) for m in pattern.finditer(path.read_text())]
        assert not hits, f"{path.name}: {hits}"
