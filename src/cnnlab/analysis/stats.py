"""Significance tests for comparing trained models, as pure functions: exact McNemar on paired predictions,
paired and Welch t-tests over seeds, t-intervals of a mean, and Holm's step-down correction.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def _bools(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array (one entry per test item), got shape {a.shape}")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            raise ValueError(f"{name} must hold booleans (item classified correctly or not)")
        a = a.astype(bool)
    return a


def discordant(correct_a, correct_b) -> tuple[int, int]:
    """(b, c): items only model A gets right, items only model B gets right."""
    a, b = _bools(correct_a, "correct_a"), _bools(correct_b, "correct_b")
    if len(a) != len(b):
        raise ValueError(f"the two models were scored on different numbers of items ({len(a)} vs {len(b)})")
    return int(np.sum(a & ~b)), int(np.sum(~a & b))


def mcnemar_counts(b: int, c: int, *, mid_p: bool = False) -> tuple[float, float]:
    """Exact McNemar test from the discordant counts: under H0 each of the n = b + c disagreements
    is equally likely to go either way, so min(b, c) ~ Binomial(n, 1/2). Two-sided p = 2 P(X <= min),
    capped at 1 (as statsmodels' `mcnemar(exact=True)`); the mid-p version subtracts P(X = min) once.
    Returns (statistic = min(b, c), p)."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n, k = int(b) + int(c), min(int(b), int(c))
    if n == 0:
        return float(k), 1.0
    p = 2.0 * _st.binom.cdf(k, n, 0.5)
    if mid_p:
        p -= _st.binom.pmf(k, n, 0.5)
    return float(k), float(min(1.0, p))


def mcnemar(correct_a, correct_b, *, mid_p: bool = False) -> tuple[float, float]:
    """Exact McNemar test of two classifiers scored on the same items (bool arrays: item right or not)."""
    return mcnemar_counts(*discordant(correct_a, correct_b), mid_p=mid_p)


def _floats(x, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of values, got shape {a.shape}")
    return a


def paired_t(a, b) -> tuple[float, float]:
    """Paired t-test of a - b (same seeds in the same order); as scipy.stats.ttest_rel(a, b).
    No spread in the differences: all zero gives (0, 1), a constant shift (+-inf, 0)."""
    x, y = _floats(a, "a"), _floats(b, "b")
    if len(x) != len(y):
        raise ValueError(f"a paired test needs as many values on each side, got {len(x)} and {len(y)}")
    if len(x) < 2:
        raise ValueError("a paired t-test needs at least 2 pairs (repeats: 2 or more)")
    d = x - y
    mean, sd = d.mean(), d.std(ddof=1)
    if sd == 0 or not math.isfinite(sd):
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(len(d)))
    return float(t), float(2.0 * _st.t.sf(abs(t), len(d) - 1))


def welch_df(a, b) -> float:
    """Welch-Satterthwaite degrees of freedom of the unequal-variance t-test."""
    x, y = _floats(a, "a"), _floats(b, "b")
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    return float((vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1)))


def welch_t(a, b) -> tuple[float, float]:
    """Welch's unequal-variance t-test of mean(a) - mean(b); as scipy.stats.ttest_ind(a, b, equal_var=False)."""
    x, y = _floats(a, "a"), _floats(b, "b")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"Welch's t-test needs at least 2 values on each side, got {len(x)} and {len(y)}")
    diff = x.mean() - y.mean()
    se = math.sqrt(x.var(ddof=1) / len(x) + y.var(ddof=1) / len(y))
    if se == 0:
        return (0.0, 1.0) if diff == 0 else (math.copysign(math.inf, diff), 0.0)
    t = diff / se
    return float(t), float(2.0 * _st.t.sf(abs(t), welch_df(x, y)))


def mean_ci(values, level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-distribution interval of the mean; one value gives (x, nan, nan)."""
    x = _floats(values, "values")
    if len(x) == 0:
        return math.nan, math.nan, math.nan
    m = float(x.mean())
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(_st.t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def proportion_ci(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n (one model's accuracy on n test items)."""
    if n <= 0:
        return math.nan, math.nan
    z = float(_st.norm.ppf(0.5 + level / 2))
    p, z2 = k / n, z * z / n
    centre, half = (p + z2 / 2) / (1 + z2), z * math.sqrt(p * (1 - p) / n + z2 / (4 * n)) / (1 + z2)
    # the interval holds k/n exactly (in floating point too: at k = 0 the lower end rounded to +3e-17)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def describe(values, level: float = 0.95) -> dict:
    """{n, mean, std, lo, hi} of repeated measurements (std with ddof=1; nan where n < 2)."""
    x = _floats(values, "values")
    m, lo, hi = mean_ci(x, level)
    sd = float(x.std(ddof=1)) if len(x) > 1 else math.nan
    return {"n": int(len(x)), "mean": m, "std": sd, "lo": lo, "hi": hi}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p values (family-wise error), in the input order; as statsmodels'
    multipletests(method='holm'): the i-th smallest becomes max_{j<=i} min(1, (m - j) p_(j))."""
    p = _floats(pvalues, "pvalues")
    m = len(p)
    order = np.argsort(p, kind="mergesort")
    adj = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    out = np.empty(m)
    out[order] = adj
    return out
