"""Evaluation metrics: the unbiased pass@k estimator, per problem and overall, with seeded
bootstrap confidence intervals.

    pass@k = 1 - C(n - c, k) / C(n, k)        (n samples of a problem, c of them correct)

computed in the product form 1 - prod_{i = n-c+1}^{n} (1 - k / i): c factors in [0, 1], no
large numbers, exact to float rounding for any n (the coefficients themselves pass 1e37 at
n = 128 and overflow a float beyond n = 1029).

This module knows nothing about models, answers or how correctness was judged: it takes the
counts (n, c) per problem.

Confidence intervals (ours; the paper reports point estimates):
- overall: percentile bootstrap over problems (resample problems with replacement, average
  their pass@k);
- per problem: percentile bootstrap over that problem's samples, i.e. c* ~ Binomial(n, c/n).
  A problem with c = 0 or c = n gets a zero-width interval: the bootstrap cannot see beyond
  the observed rate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    return int(value)


def _check(n: object, c: object, k: object) -> tuple[int, int, int]:
    n, c, k = _count("n", n), _count("c", c), _count("k", k)
    if n < 1:
        raise ValueError(f"n (samples) must be at least 1; got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"c (correct samples) must be between 0 and n={n}; got c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and n={n} (pass@k needs k <= n samples); got k={k}")
    return n, c, k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `c` correct among `n` samples (1 <= k <= n)."""
    n, c, k = _check(n, c, k)
    if n - c < k:
        return 1.0  # every k-subset holds a correct sample
    factors = 1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)  # (c,)
    return float(1.0 - np.prod(factors))


def pass_at_k_by_correct_count(n: int, k: int) -> np.ndarray:
    """pass@k for every c = 0..n at once: `(n + 1,)` (the bootstrap's lookup table)."""
    n, _, k = _check(n, 0, k)
    factors = 1.0 - k / np.arange(n, 0, -1, dtype=np.float64)  # (n,) i = n, n-1, ..., 1
    # Once i reaches k the factor is exactly 0, so every longer product is 0: pass@k = 1.
    return np.concatenate([[0.0], 1.0 - np.cumprod(factors)])  # (n + 1,)


def default_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself (the paper's grid)."""
    n = _count("n", n)
    if n < 1:
        raise ValueError(f"n must be at least 1; got n={n}")
    ks = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return ks if ks[-1] == n else [*ks, n]


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float
    high: float


@dataclass(frozen=True)
class PassAtKReport:
    ks: tuple[int, ...]
    overall: dict[int, Estimate]
    per_problem: dict[str, dict[int, Estimate]]
    confidence: float
    resamples: int
    seed: int

    def curve(self) -> list[tuple[int, float, float, float]]:
        """(k, pass@k, low, high) rows of the overall curve."""
        return [(k, e.value, e.low, e.high) for k, e in sorted(self.overall.items())]


def pass_at_k_report(
    counts: Mapping[str, tuple[int, int]],
    ks: Sequence[int] | None = None,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PassAtKReport:
    """pass@k per problem and overall, each with a bootstrap interval.

    `counts`: problem id -> (n samples, c correct). `ks` default: `default_ks` of the smallest
    n. Every k must be <= every problem's n. Same inputs and seed, same intervals."""
    if not counts:
        raise ValueError("no problems to evaluate")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    if _count("resamples", resamples) < 1:
        raise ValueError(f"resamples must be at least 1; got {resamples}")
    for problem, (n, c) in counts.items():
        try:
            _check(n, c, 1)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"problem {problem!r}: {exc}") from exc
    smallest = min(n for n, _ in counts.values())
    ks = tuple(default_ks(smallest) if ks is None else ks)
    for k in ks:
        too_few = [p for p, (n, _) in counts.items() if _count("k", k) > n]
        if too_few or k < 1:
            raise ValueError(
                f"k={k} needs at least k samples per problem; too few for: {', '.join(too_few)}"
                if too_few
                else f"k must be at least 1; got k={k}"
            )

    rng = np.random.default_rng(seed)
    tail = (1 - confidence) / 2 * 100
    problems = list(counts)
    values = np.empty((len(problems), len(ks)))  # (P, K)
    per_problem: dict[str, dict[int, Estimate]] = {}
    for row, problem in enumerate(problems):
        n, c = counts[problem]
        draws = rng.binomial(n, c / n, size=resamples)  # (R,) bootstrap correct counts
        per_problem[problem] = {}
        for col, k in enumerate(ks):
            table = pass_at_k_by_correct_count(n, k)  # (n + 1,)
            values[row, col] = table[c]
            low, high = np.percentile(table[draws], [tail, 100 - tail])
            per_problem[problem][k] = Estimate(float(table[c]), float(low), float(high))

    picks = rng.integers(0, len(problems), size=(resamples, len(problems)))  # (R, P)
    means = values[picks].mean(axis=1)  # (R, K)
    lows, highs = np.percentile(means, [tail, 100 - tail], axis=0)  # (K,) each
    overall = {
        k: Estimate(float(values[:, col].mean()), float(lows[col]), float(highs[col]))
        for col, k in enumerate(ks)
    }
    return PassAtKReport(ks, overall, per_problem, confidence, resamples, seed)


@dataclass(frozen=True)
class PairedDifference:
    """Mean per-problem difference of pass@k between two arms (a minus b) with its interval,
    and how many common problems each arm did better on."""

    k: int
    value: float
    low: float
    high: float
    problems: int  # problems both arms were evaluated on
    better: int  # problems where a's pass@k exceeds b's
    worse: int  # problems where it falls short
    ties: int

    def to_dict(self) -> dict[str, float | int]:
        return {
            "k": self.k,
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "problems": self.problems,
            "better": self.better,
            "worse": self.worse,
            "ties": self.ties,
        }


# Per-problem differences closer to 0 than this count as ties (pass@k of equal rates computed
# from different n may differ in the last bits).
_TIE_TOLERANCE = 1e-12


def paired_difference(
    a: Mapping[str, tuple[int, int]],
    b: Mapping[str, tuple[int, int]],
    k: int,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedDifference:
    """pass@k of arm `a` minus arm `b`, paired over the problems both were evaluated on.

    `a`, `b`: problem id -> (n samples, c correct), as `pass_at_k_report`'s `counts`. Per
    common problem i, d_i = pass@k_a(i) - pass@k_b(i); the value is the mean of d_i and the
    interval a percentile bootstrap over problems that resamples the same problem indices for
    both arms.

    Why paired: how hard a problem is varies far more than the arms differ (most problems are
    solved by every arm or by none), so two independent intervals overlap even when one arm
    wins on problem after problem. Differencing per problem first removes the difficulty from
    the comparison and leaves only the arms' disagreement to bootstrap.

    Problems in only one arm are left out; `problems` says how many were compared. Same
    inputs and seed, same interval."""
    k = _count("k", k)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence!r}")
    if _count("resamples", resamples) < 1:
        raise ValueError(f"resamples must be at least 1; got {resamples}")
    for arm, counts in (("a", a), ("b", b)):
        for problem, (n, c) in counts.items():
            try:
                _check(n, c, k)
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"arm {arm}, problem {problem!r}: {exc}") from exc
    # Sorted, so the bootstrap's draws do not depend on the mappings' order.
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two arms have no problem in common: nothing to compare")

    differences = np.array(
        [pass_at_k(*a[problem], k) - pass_at_k(*b[problem], k) for problem in common]
    )  # (P,)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(common), size=(resamples, len(common)))  # (R, P)
    means = differences[picks].mean(axis=1)  # (R,)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    better = int(np.sum(differences > _TIE_TOLERANCE))
    worse = int(np.sum(differences < -_TIE_TOLERANCE))
    return PairedDifference(
        k=k,
        value=float(differences.mean()),
        low=float(low),
        high=float(high),
        problems=len(common),
        better=better,
        worse=worse,
        ties=len(common) - better - worse,
    )
