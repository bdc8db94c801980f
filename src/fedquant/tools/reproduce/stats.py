"""Pre-registered hypothesis tests on paired differences over seeds (pure functions).

A comparison of two cells gives one difference ``a - b`` per seed (percentage
points). Each claim states in the grid file which test judges it:

``equivalence`` (margin m)
    "within m": held when the ``1 - 2 alpha`` interval lies inside ``(-m, m)``
    (two one-sided tests, TOST); did not hold when it lies wholly outside
    ``[-m, m]``.
``non-inferiority`` (margin m)
    "matches or beats": held when the one-sided lower bound is above ``-m``;
    did not hold when the one-sided upper bound is below ``-m``.
``superiority`` (margin m >= 0)
    "beats (by more than m)": held when the one-sided lower bound is above
    ``m``; did not hold when the one-sided upper bound is below ``m``.

Anything else is *inconclusive*. Every comparison carries two p-values, one per
direction (:attr:`Tested.p_held`, :attr:`Tested.p_failed`); :func:`decide`
applies Holm's step-down correction over all of them at once, so the whole
family of verdicts has family-wise error rate ``alpha``.

Student's t is computed in closed form for integer degrees of freedom (all a
paired test over seeds needs), so this module depends on the standard library
only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fedquant.errors import ConfigError

__all__ = [
    "EQUIVALENCE",
    "HELD",
    "INCONCLUSIVE",
    "KINDS",
    "NON_INFERIORITY",
    "NOT_HELD",
    "SUPERIORITY",
    "Hypothesis",
    "Tested",
    "combine",
    "decide",
    "half_width",
    "holm",
    "holm_adjusted",
    "paired_test",
    "seeds_to_resolve",
    "t_cdf",
    "t_ppf",
]

EQUIVALENCE, NON_INFERIORITY, SUPERIORITY = "equivalence", "non-inferiority", "superiority"
KINDS = (EQUIVALENCE, NON_INFERIORITY, SUPERIORITY)
HELD, NOT_HELD, INCONCLUSIVE = "held", "did not hold", "inconclusive"


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with integer ``df >= 1`` (Abramowitz & Stegun 26.7.3-4).

    Examples
    --------
    >>> round(t_cdf(4.303, 2), 4)
    0.975
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    theta = math.atan2(x, math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    c2 = c * c
    if df % 2 == 1:
        total, term = 0.0, c
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        a = 2.0 / math.pi * (theta + s * total) if df > 1 else 2.0 / math.pi * theta
    else:
        total, term = 0.0, 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        a = s * total
    # a = P(|T| < |x|) signed like x
    return min(1.0, max(0.0, 0.5 + 0.5 * a))


def t_ppf(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` (bisection on :func:`t_cdf`)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_ppf(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


@dataclass(frozen=True)
class Hypothesis:
    """How a claim is tested: its kind (:data:`KINDS`) and margin in percentage points."""

    kind: str
    margin: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("test", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if not (math.isfinite(self.margin) and self.margin >= 0):
            raise ConfigError("margin", f"{self.margin!r} is not a number >= 0")
        if self.kind != SUPERIORITY and self.margin == 0:
            raise ConfigError("margin", f"an {self.kind} test needs a margin > 0")

    def describe(self) -> str:
        m = f"{self.margin:g} pp"
        if self.kind == EQUIVALENCE:
            return f"equivalence within ±{m} (TOST)"
        if self.kind == NON_INFERIORITY:
            return f"non-inferiority, margin {m}"
        return "superiority" + (f" by more than {m}" if self.margin else "")


def _upper_tail(num: float, se: float, df: int) -> float:
    """P(T >= num / se); a zero standard error gives 0 or 1 (0.5 at num == 0)."""
    if se == 0.0:
        return 0.0 if num > 0 else 1.0 if num < 0 else 0.5
    return 1.0 - t_cdf(num / se, df)


@dataclass(frozen=True)
class Tested:
    """One comparison under a :class:`Hypothesis`, before the family-wise correction.

    Attributes
    ----------
    values : tuple of float
        The per-seed differences ``a - b``.
    mean, sd : float
        Their mean and sample standard deviation (NaN sd for one value).
    lo, hi : float
        The two-sided ``1 - 2 alpha`` interval (NaN for one value): for
        ``alpha = 0.05`` the 90 % interval whose ends are the one-sided 95 %
        bounds the tests use.
    p_held, p_failed : float
        p-values of the test whose rejection means "held" and of the one whose
        rejection means "did not hold" (1.0 with fewer than two seeds).
    """

    hypothesis: Hypothesis
    values: tuple[float, ...]
    mean: float
    sd: float
    lo: float
    hi: float
    p_held: float
    p_failed: float

    @property
    def n(self) -> int:
        return len(self.values)


def paired_test(values: Sequence[float], hyp: Hypothesis, alpha: float = 0.05) -> Tested:
    """Test the per-seed differences ``values`` against ``hyp`` (one-sided level ``alpha``).

    Examples
    --------
    >>> t = paired_test([0.1, -0.1, 0.0, 0.05, -0.05], Hypothesis("equivalence", 1.0))
    >>> t.p_held < 0.001 < 0.999 < t.p_failed
    True
    """
    v = tuple(float(x) for x in values)
    n = len(v)
    if n == 0:
        raise ValueError("no paired values to test")
    mean = sum(v) / n
    if n < 2:
        return Tested(hyp, v, mean, math.nan, math.nan, math.nan, 1.0, 1.0)
    df = n - 1
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / df)
    se = sd / math.sqrt(n)
    half = t_ppf(1.0 - alpha, df) * se
    m = hyp.margin
    if hyp.kind == EQUIVALENCE:
        # held: delta > -m and delta < m; failed: delta > m or delta < -m
        p_held = max(_upper_tail(mean + m, se, df), _upper_tail(-(mean - m), se, df))
        p_failed = min(_upper_tail(mean - m, se, df), _upper_tail(-(mean + m), se, df))
    elif hyp.kind == NON_INFERIORITY:
        p_held = _upper_tail(mean + m, se, df)
        p_failed = _upper_tail(-(mean + m), se, df)
    else:
        p_held = _upper_tail(mean - m, se, df)
        p_failed = _upper_tail(-(mean - m), se, df)
    return Tested(hyp, v, mean, sd, mean - half, mean + half, p_held, p_failed)


def holm(pvalues: Sequence[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise ``alpha``.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03], alpha=0.05)
    [True, False, False]
    >>> holm([0.01, 0.02, 0.04], alpha=0.05)
    [True, True, True]
    """
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [False] * m
    for rank, i in enumerate(order):
        if pvalues[i] > alpha / (m - rank):
            break
        out[i] = True
    return out


def holm_adjusted(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (reject at family-wise ``alpha`` iff adjusted <= ``alpha``)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def decide(tests: Sequence[Tested], alpha: float = 0.05) -> list[tuple[str, float]]:
    """Verdict and Holm-adjusted p-value of each comparison, corrected over the whole family.

    The family is every comparison's two hypotheses (``2 * len(tests)``). The
    p-value returned is that of the direction the mean points to (the
    ``held`` direction when both are 1).
    """
    ps = [p for t in tests for p in (t.p_held, t.p_failed)]
    adj = holm_adjusted(ps)
    out = []
    for k, _ in enumerate(tests):
        a_held, a_failed = adj[2 * k], adj[2 * k + 1]
        if a_held <= alpha:
            out.append((HELD, a_held))
        elif a_failed <= alpha:
            out.append((NOT_HELD, a_failed))
        else:
            out.append((INCONCLUSIVE, min(a_held, a_failed)))
    return out


def combine(outcomes: Iterable[str]) -> str | None:
    """A claim's verdict from its comparisons' (:data:`HELD`, ...; others are ignored).

    Held when every comparison held, did not hold when any did not hold,
    inconclusive otherwise; ``None`` when none was measured.

    Examples
    --------
    >>> combine(["inconclusive", "inconclusive"])
    'inconclusive'
    >>> combine(["held", "inconclusive", "did not hold"])
    'did not hold'
    """
    measured = [o for o in outcomes if o in (HELD, NOT_HELD, INCONCLUSIVE)]
    if not measured:
        return None
    if NOT_HELD in measured:
        return NOT_HELD
    if all(o == HELD for o in measured):
        return HELD
    return INCONCLUSIVE


def _distance(mean: float, hyp: Hypothesis) -> float:
    """How far the mean is from the boundary the test has to clear."""
    if hyp.kind == EQUIVALENCE:
        return abs(hyp.margin - abs(mean))
    if hyp.kind == NON_INFERIORITY:
        return abs(mean + hyp.margin)
    return abs(mean - hyp.margin)


def half_width(sd: float, n: int, alpha: float = 0.05) -> float:
    """Half-width of the two-sided ``1 - 2 alpha`` t-interval of a mean of ``n`` values."""
    if n < 2:
        return math.inf
    return t_ppf(1.0 - alpha, n - 1) * sd / math.sqrt(n)


def seeds_to_resolve(
    mean: float, sd: float, hyp: Hypothesis, alpha: float, limit: int = 10_000
) -> int | None:
    """Seeds for which a comparison with this mean and sd would be resolved at level ``alpha``.

    The smallest ``n >= 2`` whose one-sided ``alpha`` bound clears the
    boundary (held or did not hold, whichever side the mean is on); ``None``
    when the mean sits on the boundary or more than ``limit`` seeds are needed.
    Pass the level the correction demands of it (Holm's strictest step is
    ``alpha / family size``).

    Examples
    --------
    >>> seeds_to_resolve(0.0, 1.0, Hypothesis("equivalence", 1.0), 0.05)
    5
    """
    d = _distance(mean, hyp)
    if not (d > 0 and math.isfinite(sd)):
        return None
    if sd == 0:
        return 2
    z = t_ppf(1.0 - alpha, 10_000)  # ~ normal quantile: a lower bound on n
    n = max(2, math.floor((z * sd / d) ** 2))
    while n <= limit:
        if half_width(sd, n, alpha) < d:
            return n
        n += 1
    return None
