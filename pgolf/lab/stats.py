"""Significance of a claimed improvement: Welch's t-test and the challenge's verdict.

The rule (openai/parameter-golf README, "Submission Process"): a new record must beat the
current one by at least 0.005 nats, with enough runs to show at p < 0.01 that it achieved that
0.005-nat improvement. We read it as a one-sided test with the margin built in: with A the
reference runs and B the candidate's (val_loss in nats per token, lower is better) and the
improvement d = mean(A) - mean(B),

    H0: d <= margin    against    H1: d > margin,

tested by Welch's unequal-variance t-test on A and B + margin (scipy.stats.ttest_ind,
equal_var=False, alternative="greater"). B is better when p < alpha. A p below alpha needs an
observed improvement above the margin, so an improvement of exactly the margin never passes.

At the end of the challenge the maintainers ranked the leaderboard by a looser progression rule
(PR #1902): the same one-sided Welch test against the previous best, no margin, p < 0.25
(PROGRESSION_*); `pgolf compare` gives both verdicts.

No claim is possible from fewer than 2 runs in a group (no variance estimate), nor when both
groups have zero variance (the t statistic is undefined; identical results usually mean the
seeds did not differ).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np

MARGIN_NATS = 0.005
ALPHA = 0.01
# The progression rule the maintainers applied at the end of the challenge (openai/parameter-golf
# PR #1902, the leaderboard as of 2026-04-28): a submission joins the leaderboard when the one-sided
# Welch t-test against the previous best gives p < 0.25, with no margin.
PROGRESSION_MARGIN_NATS = 0.0
PROGRESSION_ALPHA = 0.25


@dataclass
class Summary:
    n: int
    mean: float
    std: float  # sample standard deviation (ddof=1); 0 for one value


def summarize(values) -> Summary:
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Summary(0, math.nan, math.nan)
    return Summary(int(x.size), float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0)


@dataclass
class Welch:
    t: float
    df: float
    p: float  # one-sided: of an improvement above the margin


def welch_improvement(reference, candidate, margin: float = 0.0) -> Welch:
    """Welch's t-test that mean(reference) - mean(candidate) > margin (lower values are better)."""
    from scipy import stats

    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64) + margin
    if a.size < 2 or b.size < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return Welch(math.nan, math.nan, math.nan)
    with warnings.catch_warnings():  # one group of identical values is valid input; scipy warns about it
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    return Welch(float(res.statistic), float(res.df), float(res.pvalue))


@dataclass
class Verdict:
    better: bool
    reason: str
    improvement: float  # mean(reference) - mean(candidate), nats
    margin: float
    alpha: float
    welch: Welch

    def to_dict(self) -> dict:
        return asdict(self)


def verdict(reference, candidate, margin: float = MARGIN_NATS, alpha: float = ALPHA) -> Verdict:
    """Does the candidate beat the reference by more than `margin` nats at p < `alpha`?"""
    ref, cand = summarize(reference), summarize(candidate)
    improvement = ref.mean - cand.mean
    welch = welch_improvement(reference, candidate, margin)
    if min(ref.n, cand.n) < 2:
        reason = f"cannot claim significance: needs at least 2 runs per group (have {ref.n} and {cand.n})"
    elif math.isnan(welch.p):
        reason = "cannot claim significance: both groups have zero variance (did the seeds differ?)"
    elif welch.p < alpha:
        reason = f"better by {improvement:.4f} nats (> {margin:g}) at p = {welch.p:.2g} < {alpha:g}"
    elif improvement <= margin:
        reason = f"not better: improvement {improvement:.4f} nats is not above the {margin:g}-nat margin"
    else:
        reason = (f"not significant: improvement {improvement:.4f} nats > {margin:g} but p = {welch.p:.2g} "
                  f">= {alpha:g} (more seeds may settle it)")
    return Verdict(bool(welch.p < alpha), reason, improvement, margin, alpha, welch)
