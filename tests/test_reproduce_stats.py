"""Pre-registered tests of the reproduction report: every verdict path on hand-made data."""

from __future__ import annotations

import math

import pytest
from scipy import stats as sps

from fedquant.errors import ConfigError
from fedquant.tools.reproduce import stats
from fedquant.tools.reproduce.stats import (
    HELD,
    INCONCLUSIVE,
    NOT_HELD,
    Hypothesis,
    combine,
    decide,
    holm,
    paired_test,
    seeds_to_resolve,
)

EQ = Hypothesis("equivalence", 1.0)
NI = Hypothesis("non-inferiority", 1.0)
SUP = Hypothesis("superiority", 0.0)
#: five seeds' noise with mean 0 and sd ~0.1
NOISE = (0.1, -0.1, 0.05, -0.05, 0.0)


def _shift(mean: float, scale: float = 1.0) -> list[float]:
    return [mean + scale * e for e in NOISE]


def _verdict(values: list[float], hyp: Hypothesis) -> str:
    return decide([paired_test(values, hyp)])[0][0]


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 30])
def test_t_distribution_matches_scipy(df: int) -> None:
    for x in (-12.0, -2.5, -0.3, 0.0, 0.7, 2.0, 6.9):
        assert math.isclose(stats.t_cdf(x, df), sps.t.cdf(x, df), abs_tol=1e-12)
    for p in (0.9, 0.95, 0.975, 0.9995):
        assert math.isclose(stats.t_ppf(p, df), sps.t.ppf(p, df), rel_tol=1e-9)


@pytest.mark.parametrize(
    ("values", "hyp", "verdict"),
    [
        (_shift(0.3), EQ, HELD),  # tight, inside +-1
        (_shift(-0.3), EQ, HELD),
        (_shift(2.5), EQ, NOT_HELD),  # tight, wholly above +1: not "within" either
        (_shift(-2.5), EQ, NOT_HELD),  # the same below
        (_shift(0.9, 10), EQ, INCONCLUSIVE),  # unresolved positive mean
        (_shift(-0.9, 10), EQ, INCONCLUSIVE),  # unresolved negative mean: not "did not hold"
        (_shift(-1.5, 10), EQ, INCONCLUSIVE),  # beyond the margin, but unresolved
        (_shift(5.0), NI, HELD),  # "matches or beats": a large gain holds
        (_shift(-0.5), NI, HELD),
        (_shift(-2.0), NI, NOT_HELD),
        (_shift(-0.8, 10), NI, INCONCLUSIVE),
        (_shift(0.5), SUP, HELD),
        (_shift(-0.5), SUP, NOT_HELD),
        (_shift(0.5, 10), SUP, INCONCLUSIVE),  # unresolved positive
        (_shift(-0.5, 10), SUP, INCONCLUSIVE),  # unresolved negative: same verdict
        (_shift(1.5), Hypothesis("superiority", 2.0), NOT_HELD),  # resolved, but below 2 pp
        ([0.3], EQ, INCONCLUSIVE),  # one seed decides nothing
    ],
)
def test_every_verdict_path(values: list[float], hyp: Hypothesis, verdict: str) -> None:
    assert _verdict(values, hyp) == verdict


def test_interval_is_the_one_sided_bounds() -> None:
    t = paired_test([1.0, 2.0, 6.0], SUP, alpha=0.05)
    half = sps.t.ppf(0.95, 2) * math.sqrt(7.0) / math.sqrt(3)
    assert math.isclose(t.lo, 3.0 - half) and math.isclose(t.hi, 3.0 + half)
    assert math.isclose(t.p_held, sps.t.sf(3.0 / (math.sqrt(7.0) / math.sqrt(3)), 2))
    assert math.isclose(t.p_held + t.p_failed, 1.0)


def test_resolved_small_loss_is_judged_against_the_margin() -> None:
    # like MNIST IID inverse-MSE minus FedAvg: -0.60, 95 % interval [-1.03, -0.17] on 3 seeds
    values = [-0.60 - 0.173, -0.60, -0.60 + 0.173]
    t = paired_test(values, NI)
    assert t.hi < 0  # a resolved loss ...
    assert t.lo > -1.0  # ... inside the 1 pp margin: non-inferior on its own (5 %),
    assert t.p_held < 0.05 < t.p_failed
    # ... but not once 11 more such comparisons share the family-wise error rate
    weak = paired_test([-0.5, 0.5, 0.0], NI)
    assert decide([t] + [weak] * 11)[0][0] == INCONCLUSIVE
    # with a tighter spread even the corrected verdict holds: the margin, not the sign, decides
    assert _verdict([-0.65, -0.6, -0.55], NI) == HELD
    assert _verdict([-0.65, -0.6, -0.55], EQ) == HELD


def test_holm_is_step_down_and_stops_at_the_first_failure() -> None:
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm([0.01, 0.02, 0.04]) == [True, True, True]
    assert holm([0.2, 0.001]) == [False, True]
    assert holm([]) == []
    adj = stats.holm_adjusted([0.01, 0.04, 0.03])
    assert adj == pytest.approx([0.03, 0.06, 0.06])


def test_combine_never_turns_inconclusive_into_failure() -> None:
    assert combine([INCONCLUSIVE, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([HELD, HELD, "not measured"]) == HELD
    assert combine([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine([HELD, NOT_HELD, INCONCLUSIVE]) == NOT_HELD
    assert combine(["not measured"]) is None


def test_seeds_to_resolve() -> None:
    # the returned n resolves, n - 1 does not
    for mean, hyp in ((0.5, EQ), (-0.7, EQ), (1.6, EQ), (-0.4, NI), (0.8, SUP)):
        n = seeds_to_resolve(mean, 1.5, hyp, 0.05)
        assert n is not None and n >= 2
        d = {"equivalence": abs(1 - abs(mean)), "non-inferiority": abs(mean + 1)}.get(
            hyp.kind, abs(mean)
        )
        assert stats.half_width(1.5, n, 0.05) < d
        assert n == 2 or stats.half_width(1.5, n - 1, 0.05) >= d
    assert seeds_to_resolve(1.0, 1.0, EQ, 0.05) is None  # on the boundary: never
    assert seeds_to_resolve(0.0, 100.0, EQ, 0.05, limit=50) is None
    # a stricter level needs more seeds
    n1, n2 = seeds_to_resolve(0.3, 1.0, EQ, 0.05), seeds_to_resolve(0.3, 1.0, EQ, 0.002)
    assert n1 is not None and n2 is not None and n2 > n1


def test_bad_hypotheses() -> None:
    with pytest.raises(ConfigError, match="'two-sided' is not one of equivalence"):
        Hypothesis("two-sided", 1.0)
    with pytest.raises(ConfigError, match="needs a margin > 0"):
        Hypothesis("equivalence", 0.0)
    with pytest.raises(ConfigError, match="is not a number >= 0"):
        Hypothesis("superiority", -1.0)
