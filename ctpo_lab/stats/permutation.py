"""Paired sign-flip permutation test over seeds.

For paired differences d_1..d_n (e.g. final accuracy of a loss minus a reference's, same seed), under
H0: the distribution of each d_s is symmetric about 0, every sign pattern ε ∈ {−1, +1}^n is equally likely, so
p = #{ε : |mean(ε·d)| ≥ |mean(d)|} / 2^n is an exact two-sided p-value (the smallest attainable is 2/2^n:
0.25 with 3 seeds).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["sign_flip_p_value", "sign_flip_is_exact", "monte_carlo_sign_flip_p_value", "EXACT_SIGN_FLIP_MAX",
           "holm_adjust"]

#: Up to this many paired differences :func:`sign_flip_p_value` counts all 2^n sign patterns (by direct
#: enumeration up to 20, by meet-in-the-middle beyond: two halves of ≤ 2^20 partial sums each).
EXACT_SIGN_FLIP_MAX = 40
_MONTE_CARLO_PATTERNS = 200_000


def sign_flip_is_exact(n: int) -> bool:
    """Whether :func:`sign_flip_p_value` of ``n`` differences is exact (every sign pattern counted)."""
    return n <= EXACT_SIGN_FLIP_MAX


def _half_sums(d: np.ndarray) -> np.ndarray:
    """Σ_i ε_i d_i for every ε ∈ {−1, +1}^len(d) (2^len(d) values, in no particular order)."""
    sums = np.zeros(1)
    for x in d:
        sums = np.concatenate((sums + x, sums - x))
    return sums


def sign_flip_p_value(diffs: np.ndarray) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of mean(diffs) = 0, shape ``diffs`` [n].

    p = #{ε ∈ {−1, +1}^n : |mean(ε·d)| ≥ |mean(d)| − 1e-12} / 2^n, counted exactly for n ≤
    :data:`EXACT_SIGN_FLIP_MAX` (40): the 2^n patterns are enumerated for n ≤ 20; for 20 < n ≤ 40 the sums split
    into two halves, a + b with a, b over the 2^⌈n/2⌉ and 2^⌊n/2⌋ partial sums, and for each a the b with
    |a + b| ≥ n·(|mean(d)| − 1e-12) are counted in the sorted b (the same count as the enumeration, up to the
    1e-12 tolerance).  Beyond 40, a Monte Carlo estimate (k + 1) / (N + 1) over N = 200 000 random patterns
    (seed 0), which is never 0.  NaN (no test) when ``diffs`` is empty or holds a NaN or inf.
    """
    d = np.asarray(diffs, dtype=np.float64).ravel()
    n = d.size
    if n == 0 or not np.all(np.isfinite(d)):  # no test: NaN, which holm_adjust leaves out of the family
        return float("nan")
    observed = abs(d.mean())
    if n <= 20:
        signs = np.array(list(itertools.product([-1.0, 1.0], repeat=n)))
        null = np.abs((signs * d).mean(axis=1))
        return float((null >= observed - 1e-12).mean())
    if n <= EXACT_SIGN_FLIP_MAX:
        threshold = n * (observed - 1e-12)
        if threshold <= 0:  # every pattern is at least as extreme
            return 1.0
        half = (n + 1) // 2
        a, b = _half_sums(d[:half]), np.sort(_half_sums(d[half:]))
        # a + b ≥ threshold, or a + b ≤ −threshold (disjoint: threshold > 0)
        upper = b.size - np.searchsorted(b, threshold - a, side="left")
        lower = np.searchsorted(b, -threshold - a, side="right")
        return float((upper.sum() + lower.sum()) / 2.0**n)
    return monte_carlo_sign_flip_p_value(d)


def monte_carlo_sign_flip_p_value(diffs: np.ndarray, patterns: int = _MONTE_CARLO_PATTERNS, seed: int = 0) -> float:
    """Monte Carlo sign-flip p-value (k + 1) / (N + 1), shape ``diffs`` [n]: k of N = ``patterns`` random sign
    patterns (``seed``) with |mean(ε·d)| ≥ |mean(d)| − 1e-12; never 0, standard error ≈ √(p(1 − p)/N)."""
    d = np.asarray(diffs, dtype=np.float64).ravel()
    if not (isinstance(patterns, int) and patterns > 0):
        raise ValueError(f"patterns: expected a positive int, got {patterns!r}")
    rng = np.random.default_rng(seed)
    k = 0
    for start in range(0, patterns, 50_000):  # chunks bound the memory at 50 000 × n floats
        signs = rng.choice([-1.0, 1.0], size=(min(50_000, patterns - start), d.size))
        k += int((np.abs((signs * d).mean(axis=1)) >= abs(d.mean()) - 1e-12).sum())
    return (k + 1) / (patterns + 1)


def holm_adjust(p_values: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment for a family of m tests (controls the family-wise error rate).

    With the raw p-values sorted p_(1) ≤ … ≤ p_(m): p̃_(i) = min(1, max_{j ≤ i} (m − j + 1)·p_(j)); returned in
    the input order.  NaN entries are not part of the family (m counts the finite ones) and stay NaN.
    """
    p = np.asarray(p_values, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    m = finite.size
    if m == 0:
        return out
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out
