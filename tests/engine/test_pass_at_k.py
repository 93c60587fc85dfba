"""pass@k against brute-force enumeration and exact rational arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction
from itertools import combinations

import numpy as np
import pytest

from training.engine.metrics import (
    default_ks,
    pass_at_k,
    pass_at_k_by_correct_count,
    pass_at_k_report,
)

pytestmark = pytest.mark.engine


def brute_force(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (the first c correct) holding a correct sample."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_over_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12)


@pytest.mark.parametrize("n", [128, 500, 2000])
def test_stable_for_hundreds_of_samples(n):
    for c in (0, 1, 3, n // 7, n // 2, n - 1, n):
        for k in (1, 2, 16, 64, n // 2, n):
            exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
            assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    if n == 2000:  # the coefficients themselves no longer fit a float
        with pytest.raises(OverflowError):
            float(math.comb(n, n // 2))


def test_pass_at_one_is_the_success_rate():
    assert pass_at_k(128, 37, 1) == pytest.approx(37 / 128, rel=1e-14)


def test_table_for_every_correct_count_matches_the_scalar_form():
    for n, k in ((9, 4), (200, 32)):
        table = pass_at_k_by_correct_count(n, k)
        assert table.shape == (n + 1,)
        assert table == pytest.approx([pass_at_k(n, c, k) for c in range(n + 1)], abs=1e-12)


@pytest.mark.parametrize(
    ("n", "c", "k", "error", "message"),
    [
        (4, 1, 5, ValueError, "k must be between 1 and n=4"),
        (4, 1, 0, ValueError, "k must be between"),
        (4, 5, 1, ValueError, "c \\(correct samples\\)"),
        (4, -1, 1, ValueError, "c \\(correct samples\\)"),
        (0, 0, 1, ValueError, "n \\(samples\\)"),
        (4.0, 1, 1, TypeError, "n must be an integer"),
        (4, 1, True, TypeError, "k must be an integer"),
    ],
)
def test_invalid_counts_are_refused(n, c, k, error, message):
    with pytest.raises(error, match=message):
        pass_at_k(n, c, k)


def test_default_ks_are_powers_of_two_up_to_n():
    assert default_ks(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert default_ks(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert default_ks(1) == [1]


def test_report_averages_problems_and_brackets_every_value():
    counts = {"p1": (16, 0), "p2": (16, 3), "p3": (16, 9), "p4": (16, 16), "p5": (16, 1)}
    report = pass_at_k_report(counts, resamples=500, seed=3)
    assert report.ks == (1, 2, 4, 8, 16)
    for k in report.ks:
        expected = np.mean([pass_at_k(n, c, k) for n, c in counts.values()])
        overall = report.overall[k]
        assert overall.value == pytest.approx(expected, abs=1e-12)
        assert overall.low <= overall.value <= overall.high
        assert overall.high - overall.low > 0  # problems differ: a real interval
        for problem, (n, c) in counts.items():
            estimate = report.per_problem[problem][k]
            assert estimate.value == pytest.approx(pass_at_k(n, c, k), abs=1e-12)
            assert (
                estimate.low <= estimate.value + 1e-12 and estimate.value <= estimate.high + 1e-12
            )
    # A problem solved every time (or never) has no spread to resample.
    assert report.per_problem["p4"][1] == report.per_problem["p4"][1].__class__(1.0, 1.0, 1.0)
    assert report.per_problem["p1"][4].high == 0.0
    assert report.per_problem["p2"][2].high > report.per_problem["p2"][2].low
    assert [row[0] for row in report.curve()] == list(report.ks)


def test_report_is_seeded():
    counts = {f"p{i}": (32, c) for i, c in enumerate([0, 2, 5, 11, 30, 1, 7])}
    a = pass_at_k_report(counts, ks=[1, 8], resamples=300, seed=11)
    b = pass_at_k_report(counts, ks=[1, 8], resamples=300, seed=11)
    c = pass_at_k_report(counts, ks=[1, 8], resamples=300, seed=12)
    assert a == b
    assert a.overall[1].value == c.overall[1].value
    assert (a.overall[1].low, a.overall[1].high) != (c.overall[1].low, c.overall[1].high)


def test_report_interval_narrows_with_more_problems():
    rates = [0, 2, 5, 11, 30, 1, 7, 16]
    few = pass_at_k_report({f"p{i}": (32, c) for i, c in enumerate(rates)}, ks=[1], seed=0)
    many = pass_at_k_report(
        {f"p{i}": (32, rates[i % len(rates)]) for i in range(16 * len(rates))}, ks=[1], seed=0
    )
    width = lambda report: report.overall[1].high - report.overall[1].low  # noqa: E731
    assert many.overall[1].value == pytest.approx(few.overall[1].value)
    assert width(many) < 0.5 * width(few)  # about 1/sqrt(16) as wide


def test_report_refuses_k_beyond_a_problems_samples():
    with pytest.raises(ValueError, match="too few for: short"):
        pass_at_k_report({"long": (64, 3), "short": (8, 1)}, ks=[1, 16])
    with pytest.raises(ValueError, match="no problems"):
        pass_at_k_report({})
    with pytest.raises(ValueError, match="problem 'odd'.*c \\(correct samples\\)"):
        pass_at_k_report({"fine": (8, 1), "odd": (8, 9)})
