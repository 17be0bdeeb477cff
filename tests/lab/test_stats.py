"""Welch's t-test and the challenge verdict (better by > 0.005 nats at p < 0.01)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from pgolf.lab.stats import ALPHA, MARGIN_NATS, summarize, verdict, welch_improvement

REF = [2.3312, 2.3288, 2.3341, 2.3305]
CAND = [2.3190, 2.3221, 2.3203]


def hand_welch(a, b, margin):
    """Welch's statistic and Welch–Satterthwaite degrees of freedom, written out."""
    na, nb = len(a), len(b)
    ma, mb = sum(a) / na, sum(b) / nb
    va = sum((x - ma) ** 2 for x in a) / (na - 1)
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1)
    se2 = va / na + vb / nb
    t = (ma - mb - margin) / math.sqrt(se2)
    df = se2 ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    return t, df


def test_t_and_p_equal_scipy_and_the_formula():
    w = welch_improvement(REF, CAND, MARGIN_NATS)
    ref = sps.ttest_ind(REF, np.asarray(CAND) + MARGIN_NATS, equal_var=False, alternative="greater")
    assert w.t == pytest.approx(float(ref.statistic), rel=1e-12)
    assert w.p == pytest.approx(float(ref.pvalue), rel=1e-12)
    t, df = hand_welch(REF, CAND, MARGIN_NATS)
    assert w.t == pytest.approx(t, rel=1e-9) and w.df == pytest.approx(df, rel=1e-9)
    assert w.p == pytest.approx(sps.t.sf(t, df), rel=1e-9)  # one-sided upper tail
    # Without a margin the one-sided p is half scipy's two-sided p (t > 0 here).
    two_sided = sps.ttest_ind(REF, CAND, equal_var=False).pvalue
    assert welch_improvement(REF, CAND, 0.0).p == pytest.approx(two_sided / 2, rel=1e-12)


def test_clear_improvement_is_better():
    v = verdict(REF, CAND)
    assert v.better and v.welch.p < ALPHA
    assert v.improvement == pytest.approx(np.mean(REF) - np.mean(CAND))
    assert "better by" in v.reason


def test_improvement_of_exactly_the_margin_is_not_enough():
    a = [3.0, 3.01, 3.02, 3.03]
    b = [x - 0.005 for x in a]
    v = verdict(a, b)
    assert v.improvement == pytest.approx(0.005, abs=1e-12)
    assert not v.better and 0.4 < v.welch.p < 0.6


def _shift_for_p(a, p_target, margin):
    """The shift d making b = a - d reach exactly p_target (equal variances and sizes: df = 2n - 2)."""
    n, var = len(a), float(np.var(a, ddof=1))
    se = math.sqrt(2 * var / n)
    return margin + sps.t.isf(p_target, 2 * n - 2) * se


@pytest.mark.parametrize("nudge, better", [(+1e-6, True), (-1e-6, False)])
def test_p_just_below_or_above_alpha(nudge, better):
    a = [3.0, 3.004, 3.011, 3.002, 3.007]
    d = _shift_for_p(a, ALPHA, MARGIN_NATS) + nudge
    v = verdict(a, [x - d for x in a])
    assert abs(v.welch.p - ALPHA) < 1e-3
    assert (v.welch.p < ALPHA) is better and v.better is better
    if not better:
        assert "not significant" in v.reason and "more seeds" in v.reason


def test_one_run_cannot_claim_significance():
    v = verdict([3.0], [2.0, 2.01, 2.02])
    assert not v.better and math.isnan(v.welch.p)
    assert "at least 2 runs per group (have 1 and 3)" in v.reason


def test_zero_variance():
    v = verdict([3.0, 3.0, 3.0], [2.0, 2.0, 2.0])
    assert not v.better and "zero variance" in v.reason
    # One constant group is fine: Welch's test uses the other group's variance.
    one = verdict([3.0, 3.0, 3.0], [2.0, 2.01, 1.99])
    assert one.better and math.isfinite(one.welch.t)


def test_worse_candidate_and_custom_rule():
    v = verdict(CAND, REF)
    assert not v.better and v.improvement < 0 and "not above the 0.005-nat margin" in v.reason
    loose = verdict(REF, CAND, margin=0.0, alpha=0.5)
    assert loose.better and loose.margin == 0.0 and loose.alpha == 0.5


def test_summarize():
    s = summarize([1.0, 2.0, 4.0])
    assert s.n == 3 and s.mean == pytest.approx(7 / 3) and s.std == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert summarize([5.0]).std == 0.0 and summarize([]).n == 0
