"""The paper's claims, decided on collected results by their pre-registered tests.

Each claim is a list of paired comparisons (:class:`Comparison`) decided by the
test the grid file pre-registers in its ``[claims]`` table
(:mod:`fedquant.tools.reproduce.stats`), with Holm's correction over every
hypothesis of claims (a)-(d) together. Every comparison, and every claim, is
*held*, *did not hold* or *inconclusive*: a claim holds when all its counted
comparisons held and did not hold when any did not. Claims (a) and (b) are
judged in the paper's IID setting (their Dirichlet(0.5) comparisons are
decided on their own, not counted); claim (d) counts both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from fedquant.tools.reproduce import stats
from fedquant.tools.reproduce.results import FINAL, Collected, Diff, layer_mse, unaliased
from fedquant.tools.reproduce.stats import Hypothesis, Tested, paired_test, seeds_to_resolve

__all__ = [
    "BEYOND",
    "CLAIMED_GAIN_PP",
    "CLAIM_CELLS",
    "ClaimResult",
    "Comparison",
    "diff_range",
    "evaluate_claims",
    "mse_ratio",
]

#: the paper's "by 2-4 points" (default when the grid states no ``claimed_gain``).
CLAIMED_GAIN_PP = 2.0
#: smallest uplink reduction of claim (a) (default when the grid states no ``min_ratio``).
CLAIMED_MIN_RATIO = 4.0

HELD, NOT_HELD, INCONCLUSIVE = stats.HELD, stats.NOT_HELD, stats.INCONCLUSIVE
NOT_MEASURED, INFO = "not measured", "—"


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


def diff_range(rows: Sequence[Comparison]) -> str:
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
        listed = unaliased(c, ds, [cell for cell, _, _ in checks])
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
    text = f"{_count(res.rows)}{setting}; test: {_test_text(c, res.key)}; {what} {diff_range(res.rows)}"
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
        f"ours minus paper's {diff_range(rows)}.",
        rows,
    )


def mse_ratio(c: Collected, ds: str, a: str, b: str) -> dict[str, float]:
    """Per layer: mean over seeds of (mean-over-rounds weight MSE of ``a``) / (that of ``b``)."""
    ca, cb = c.get(ds, a), c.get(ds, b)
    if ca is None or cb is None:
        return {}
    out: dict[str, list[float]] = {}
    for s in sorted(set(ca.runs) & set(cb.runs)):
        ma, mb = layer_mse(ca.runs[s].metrics), layer_mse(cb.runs[s].metrics)
        for k in ma:
            if k in mb and mb[k] > 0:
                out.setdefault(k, []).append(ma[k] / mb[k])
    return {k: float(np.mean(v)) for k, v in out.items()}


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
