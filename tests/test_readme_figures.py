"""README headline figures agree with the committed results they quote (docs/results, docs/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REPORT = (ROOT / "docs" / "results" / "claims-medium" / "README.md").read_text()
BENCH = (ROOT / "docs" / "results" / "bench" / "bench.md").read_text()
BENCH_SPEED = (ROOT / "docs" / "results" / "bench-speed" / "bench.md").read_text()


def _ascii(text: str) -> str:
    return text.replace("−", "-").replace("–", "-")


def _table_rows(md: str, first_cell: str) -> dict[str, list[str]]:
    """Rows of Markdown tables whose first cell starts with ``(a)``, ``(b)``... -> cells."""
    out = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.match(first_cell, cells[0]) if line.startswith("|") else None
        if m:
            out[m.group(1)] = cells
    return out


def test_reproduction_table_quotes_the_committed_report() -> None:
    readme = _table_rows(README, r"\(([a-d])\) ")
    report = _table_rows(REPORT, r"\(([a-d])\) ")
    assert set(readme) == set(report) == {"a", "b", "c", "d"}
    for key, row in readme.items():
        verdict = report[key][1].strip("*")
        assert row[1] == verdict, f"claim ({key}): README says {row[1]!r}, report {verdict!r}"
        counts = re.search(r"\d+ held, \d+ did not hold, \d+ inconclusive of \d+", row[2])
        assert counts is not None and counts.group(0) in report[key][2], key
        span = re.search(r"\(([-+]\d+\.\d+ to [-+]\d+\.\d+) pp\)", _ascii(row[2]))
        assert span is not None and span.group(1) in _ascii(report[key][2]), key
    # the quoted report is current and complete
    assert "**OUTDATED" not in REPORT and "**Status: complete**" in REPORT


def test_bench_figures_quoted_in_readme() -> None:
    # memory: 100 clients vs 10
    row = next(line for line in BENCH.splitlines() if line.startswith("| 100 |"))
    end_minus_first, per_client = (c.strip() for c in row.strip("|").split("|")[5:7])
    assert f"{end_minus_first.lstrip('+')} higher" in README.replace("\n  ", " ")
    assert f"the {per_client} one float32 model per client" in README.replace("\n  ", " ")
    # OCTAV threshold vs np.abs(x).sum(), 1 and 2 threads
    ratios = {
        c[1]: float(c[3])
        for line in BENCH_SPEED.splitlines()
        if line.startswith("| `threshold(x, 4, 'stochastic')`")
        for c in [[x.strip() for x in line.strip().strip("|").split("|")]]
    }
    flat = README.replace("\n  ", " ")
    assert f"costs {ratios['1']:.1f}x one `np.abs(x).sum()` pass on 1 thread" in flat
    assert f"{ratios['2']:.1f}x on 2" in flat
    # the encoded 4-2-2-4 state; the reproduction's base cell (MNIST, the first data set)
    # averages it over rounds and clients whose numbers take one or two digits in the metadata
    assert "whole encoded state is 24,927 bytes" in README.replace("\n", " ")
    base = next(
        line
        for line in REPORT.splitlines()
        if line.startswith("| `base` |") and line.count("|") > 10  # the results table
    )
    per_upload = float(base.split("|")[8].strip().replace(",", ""))
    assert 24_927 <= per_upload <= 24_929
    assert f"averages {per_upload:,.0f}" in README.replace("\n", " ")


def test_averaging_figure_quoted_in_readme() -> None:
    res = json.loads((ROOT / "docs" / "results" / "bench-averaging" / "bench.json").read_text())
    shares = [
        r["bias_share"]
        for r in res["sections"]["averaging"]["rows"]
        if r["method"] == "octav" and r["rounding"] == "stochastic" and 2 <= r["bits"] <= 4
    ]
    lo, hi = round(100 * min(shares)), round(100 * max(shares))
    assert f"{lo}–{hi} % of one upload's error at 2–4 bits" in README.replace("\n", " ")


def test_threshold_sweep_figure_quoted_in_readme() -> None:
    res = json.loads((ROOT / "docs" / "results" / "bench-averaging" / "bench.json").read_text())
    rows = [r for r in res["sections"]["averaging"]["sweep"] if 2 <= r["bits"] <= 4]
    factors = [r["best_factor"] for r in rows]
    ratios = [r["best_nmse"] / r["nmse"]["1"] for r in rows]
    quoted = (
        f"clipping at {min(factors):g}–{max(factors):g}x OCTAV's threshold leaves the "
        f"mean of 30 uploads {min(ratios):.2f}–{max(ratios):.2f}x OCTAV's error"
    )
    assert quoted in README.replace("\n", " ")
