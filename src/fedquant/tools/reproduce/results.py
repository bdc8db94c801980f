"""The raw results of one scale of a grid, collected: per cell and seed, plus statistics.

Everything is read from the files :mod:`fedquant.tools.reproduce.runner` writes
(``summary.json`` and ``metrics.jsonl`` of every run, ``raw/invocations/``),
never from memory of a run, so reports regenerate from committed files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.tools.reproduce.grid import Grid, Job, Scale, expand
from fedquant.tools.runner import job_status, read_invocations

__all__ = [
    "FINAL",
    "LAST_EVALS",
    "LAST_K",
    "CellResults",
    "Collected",
    "Diff",
    "SeedRun",
    "Stat",
    "code_line",
    "collect",
    "layer_mse",
    "paired_diff",
    "stat",
    "t975",
    "unaliased",
]

#: the accuracy the verdicts use: the final model's, on the whole test split ...
FINAL = "final"
#: ... or, as a robustness check, the mean of the last LAST_K per-round evaluations
LAST_EVALS = "last-evals"
LAST_K = 3

#: two-sided 95 % Student-t quantiles for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (1.96 past 30)."""
    if df < 1:
        return math.nan
    return _T975[df - 1] if df <= len(_T975) else 1.96


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of ``n`` values (sd NaN for n < 2)."""

    mean: float
    sd: float
    n: int

    def fmt(self, digits: int = 2) -> str:
        if self.n == 0:
            return "—"
        if self.n < 2:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}"


def stat(values: Iterable[float]) -> Stat:
    """:class:`Stat` of ``values`` (empty gives NaN, n = 0)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return Stat(math.nan, math.nan, 0)
    return Stat(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan, int(v.size))


@dataclass(frozen=True)
class Diff:
    """A paired difference ``a - b`` over seeds: mean, sd, n and the 95 % t-interval."""

    mean: float
    sd: float
    n: int
    lo: float
    hi: float

    @property
    def resolved(self) -> bool:
        """True when the 95 % interval excludes zero (never for n < 2)."""
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)

    def fmt(self) -> str:
        if self.n < 2:
            return f"{self.mean:+.2f} (1 seed)"
        return f"{self.mean:+.2f} ± {self.sd:.2f} [{self.lo:+.2f}, {self.hi:+.2f}]"


def paired_diff(a: Mapping[int, float], b: Mapping[int, float]) -> Diff | None:
    """``a - b`` over the seeds both have; ``None`` if they share none.

    Examples
    --------
    >>> d = paired_diff({0: 90.0, 1: 91.0, 2: 92.0}, {0: 89.0, 1: 89.0, 2: 89.0})
    >>> round(d.mean, 3), round(d.sd, 3), d.n, d.resolved
    (2.0, 1.0, 3, True)
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds], dtype=np.float64)
    n = d.size
    if n < 2:
        return Diff(float(d[0]), math.nan, 1, math.nan, math.nan)
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return Diff(mean, sd, n, mean - half, mean + half)


# --------------------------------------------------------------------------- raw results


@dataclass
class SeedRun:
    """One finished run: its summary and per-round metrics."""

    seed: int
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]


@dataclass
class CellResults:
    """All finished seeds of one (data set, cell); an alias shares its target's runs."""

    dataset: str
    cell: str
    label: str
    changes: str
    bits: str
    alias_of: str | None
    expected: tuple[int, ...]
    runs: dict[int, SeedRun] = field(default_factory=dict)

    def acc(self, metric: str = FINAL) -> dict[int, float]:
        """Accuracy (%) per seed: the final one (whole test split), or :data:`LAST_EVALS`."""
        if metric == FINAL:
            return {
                s: 100.0 * float(r.summary["final_accuracy"])
                for s, r in self.runs.items()
                if r.summary.get("final_accuracy") is not None
            }
        out = {}
        for s, r in self.runs.items():
            evals = [x["test_accuracy"] for x in r.metrics if x.get("test_accuracy") is not None]
            if evals:
                out[s] = 100.0 * float(np.mean(evals[-LAST_K:]))
        return out

    def summary_value(self, key: str) -> float | None:
        vals = [r.summary.get(key) for r in self.runs.values()]
        nums = [float(v) for v in vals if isinstance(v, (int, float))]
        return float(np.mean(nums)) if nums else None


@dataclass
class Collected:
    """The raw results of one scale, organized by data set and cell."""

    grid: Grid
    scale: Scale
    raw: Path
    jobs: list[Job]
    cells: dict[tuple[str, str], CellResults]
    status: dict[str, list[str]]
    invocations: list[dict[str, Any]]
    #: what the claims compare: FINAL or LAST_EVALS
    metric: str = "final"

    @property
    def datasets(self) -> list[str]:
        seen: list[str] = []
        for j in self.jobs:
            if j.dataset not in seen:
                seen.append(j.dataset)
        return seen

    def get(self, dataset: str, cell: str) -> CellResults | None:
        c = self.cells.get((dataset, cell))
        return c if c is not None and c.runs else None

    @property
    def alpha(self) -> float:
        """The pre-registered family-wise error rate (0.05 when the grid states none)."""
        return 0.05 if self.grid.claims is None else self.grid.claims.alpha

    def values(self, dataset: str, a: str, b: str) -> list[float]:
        """The per-seed differences ``a - b`` (pp) over the seeds both cells finished."""
        ca, cb = self.get(dataset, a), self.get(dataset, b)
        if ca is None or cb is None:
            return []
        xa, xb = ca.acc(self.metric), cb.acc(self.metric)
        return [xa[s] - xb[s] for s in sorted(set(xa) & set(xb))]

    def diff(self, dataset: str, a: str, b: str) -> Diff | None:
        ca, cb = self.get(dataset, a), self.get(dataset, b)
        if ca is None or cb is None:
            return None
        return paired_diff(ca.acc(self.metric), cb.acc(self.metric))

    def title(self, dataset: str) -> str:
        return next((d.title for d in self.grid.datasets if d.name == dataset), dataset)

    @property
    def complete(self) -> bool:
        return all(not v for k, v in self.status.items() if k not in ("done", "alias"))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def collect(
    grid: Grid, scale: str, raw: str | os.PathLike[str], *, data_dir: str | None = None
) -> Collected:
    """Read the finished runs of ``scale`` under ``raw`` (stale runs are left out).

    Parameters
    ----------
    grid : Grid
    scale : str
    raw : path
        The scale's raw-results folder.
    data_dir : str, optional
        Only used to build the jobs' configs (results do not depend on it).
    """
    raw_p = Path(raw)
    jobs = expand(grid, scale, data_dir=data_dir)
    cells: dict[tuple[str, str], CellResults] = {}
    status: dict[str, list[str]] = {}
    for j in jobs:
        key = (j.dataset, j.cell)
        if key not in cells:
            cell = grid.cell(j.cell)
            cells[key] = CellResults(
                dataset=j.dataset,
                cell=j.cell,
                label=cell.label,
                changes=cell.describe(),
                bits=j.config.bits,
                alias_of=j.alias_of,
                expected=tuple(sorted({jj.seed for jj in jobs if jj.dataset == j.dataset})),
            )
        st = job_status(j, raw_p)
        status.setdefault(st, []).append(j.key)
        if st != "done":
            continue
        d = j.directory(raw_p)
        with open(d / "summary.json") as f:
            summary = json.load(f)
        cells[key].runs[j.seed] = SeedRun(j.seed, summary, _read_jsonl(d / "metrics.jsonl"))
    for (ds, _), c in cells.items():  # aliases share their target's runs
        if c.alias_of is not None and (ds, c.alias_of) in cells:
            c.runs = cells[(ds, c.alias_of)].runs
    invocations = read_invocations(raw_p)
    return Collected(grid, grid.scale(scale), raw_p, jobs, cells, status, invocations)


def unaliased(c: Collected, ds: str, cells: Sequence[str]) -> list[str]:
    """``cells`` without those that are aliases of one already listed."""
    out: list[str] = []
    for name in cells:
        cr = c.cells.get((ds, name))
        if cr is not None and cr.alias_of is not None and cr.alias_of in out:
            continue
        out.append(name)
    return out


def layer_mse(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per layer, the mean of the ``mse`` entries of the per-round metrics (None skipped)."""
    acc: dict[str, list[float]] = {}
    for row in metrics:
        for k, v in (row.get("mse") or {}).items():
            if v is not None:
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


# --------------------------------------------------------------------------- provenance


def code_line(c: Collected, current: str | None) -> str:
    """Which code computed the runs, by source fingerprint and commit, against ``current``.

    Runs computed by a source other than ``current`` (the importing code's
    fingerprint; ``None`` to skip the check) are called outdated: their numbers
    may not be what the current code computes.
    """
    hashes: dict[str, int] = {}
    for (_, _), cr in c.cells.items():
        if cr.alias_of is None:
            for r in cr.runs.values():
                h = str(r.summary.get("source_sha256", "unrecorded"))
                hashes[h] = hashes.get(h, 0) + 1
    if not hashes:
        return "Code: no finished runs yet."
    commits: dict[str, set[str]] = {}
    for i in c.invocations:
        if i.get("source_sha256"):
            commits.setdefault(str(i["source_sha256"]), set()).add(
                str(i.get("source_commit") or "not recorded")
            )

    def named(h: str, n: int) -> str:
        where = ", ".join(f"`{x}`" for x in sorted(commits.get(h, {"not recorded"})))
        return f"`{h}` ({n} runs; commit {where})"

    listed = ", ".join(named(h, n) for h, n in sorted(hashes.items()))
    text = f"Code: fedquant source {listed}."
    if len(hashes) > 1:
        text = f"**{text} ({len(hashes)} sources.)**"
    if current is not None and set(hashes) != {current}:
        old = sum(n for h, n in hashes.items() if h != current)
        text += (
            f"\n\n**OUTDATED: {old} of {sum(hashes.values())} runs were computed by another "
            "source than the one that wrote this page.**\n\n"
            f"This page was written by source `{current}`."
        )
    return text
