"""Paired comparison of two arms' pass@k over the problems both were evaluated on."""

from __future__ import annotations

import pytest

from training.engine.metrics import (
    PairedDifference,
    paired_difference,
    pass_at_k,
    pass_at_k_report,
)

pytestmark = pytest.mark.engine


def test_value_and_counts_by_hand():
    a = {"p1": (4, 4), "p2": (4, 2), "p3": (4, 0), "only-a": (4, 4)}
    b = {"p1": (4, 2), "p2": (4, 2), "p3": (4, 1), "only-b": (4, 0)}
    # k = 1: pass@1 = c / n. d = 1 - 0.5, 0.5 - 0.5, 0 - 0.25 -> mean (0.5 + 0 - 0.25) / 3
    result = paired_difference(a, b, 1)
    assert result.value == pytest.approx(0.25 / 3, abs=1e-12)
    assert (result.problems, result.better, result.worse, result.ties) == (3, 1, 1, 1)
    assert result.k == 1
    # k = 2: pass@2(4, 2) = 1 - C(2,2)/C(4,2) = 5/6, pass@2(4, 1) = 1/2.
    result = paired_difference(a, b, 2)
    assert result.value == pytest.approx(((1 - 5 / 6) + 0 + (0 - 1 / 2)) / 3, abs=1e-12)
    assert (result.better, result.worse, result.ties) == (1, 1, 1)


def test_interval_contains_the_value_and_to_dict():
    a = {f"p{i}": (8, (i * 3) % 9) for i in range(40)}
    b = {f"p{i}": (8, (i * 5) % 9) for i in range(40)}
    result = paired_difference(a, b, 2)
    assert result.low <= result.value <= result.high
    assert result.low < result.high
    assert result.to_dict() == {
        "k": 2,
        "value": result.value,
        "low": result.low,
        "high": result.high,
        "problems": 40,
        "better": result.better,
        "worse": result.worse,
        "ties": result.ties,
    }
    assert result.better + result.worse + result.ties == 40
    assert isinstance(result, PairedDifference)


def test_identical_arms_give_zero_with_zero_width_interval():
    counts = {f"p{i}": (4, i % 5) for i in range(20)}
    result = paired_difference(counts, dict(counts), 2)
    assert (result.value, result.low, result.high) == (0.0, 0.0, 0.0)
    assert (result.better, result.worse, result.ties) == (0, 0, 20)


def test_same_seed_same_interval_and_order_does_not_matter():
    a = {f"p{i}": (8, (i * 3) % 9) for i in range(30)}
    b = {f"p{i}": (8, (i * 7) % 9) for i in range(30)}
    first = paired_difference(a, b, 1, seed=5)
    again = paired_difference(dict(reversed(list(a.items()))), b, 1, seed=5)
    assert (first.low, first.high) == (again.low, again.high)
    other = paired_difference(a, b, 1, seed=6)
    assert (first.low, first.high) != (other.low, other.high)
    assert first.value == other.value


def test_pairing_separates_arms_whose_own_intervals_overlap():
    # Difficulty varies from 0 to 7 correct of 8; arm a solves one more sample on every
    # other problem. Each arm's own interval is wide (difficulty) and they overlap, but the
    # per-problem differences are all >= 0: the paired interval lies above 0.
    b = {f"p{i:02d}": (8, i % 8) for i in range(60)}
    a = {p: (n, c + 1 if int(p[1:]) % 2 == 0 else c) for p, (n, c) in b.items()}
    report_a, report_b = pass_at_k_report(a, [1]), pass_at_k_report(b, [1])
    assert report_a.overall[1].low < report_b.overall[1].high  # overlapping
    result = paired_difference(a, b, 1)
    assert result.value == pytest.approx(1 / 16)
    assert result.low > 0
    assert (result.better, result.worse, result.ties) == (30, 0, 30)


def test_a_bigger_true_difference_excludes_zero():
    # a solves 6 of 8 on 50 problems where b solves 2 of 8; on 10 more, both solve 4 of 8,
    # and on 10 b wins by a little: the mean difference is large and consistent.
    a = {f"p{i}": (8, 6) for i in range(50)} | {f"q{i}": (8, 4) for i in range(10)}
    b = {f"p{i}": (8, 2) for i in range(50)} | {f"q{i}": (8, 4) for i in range(10)}
    a |= {f"r{i}": (8, 3) for i in range(10)}
    b |= {f"r{i}": (8, 4) for i in range(10)}
    result = paired_difference(a, b, 1)
    assert result.value == pytest.approx((50 * 0.5 + 10 * 0 - 10 * 0.125) / 70)
    assert result.low > 0
    assert (result.better, result.worse, result.ties) == (50, 10, 10)
    # ... and the reverse comparison lies entirely below 0.
    reverse = paired_difference(b, a, 1)
    assert reverse.high < 0
    assert reverse.value == pytest.approx(-result.value)


def test_a_small_noisy_difference_includes_zero():
    a = {f"p{i}": (4, 2 + (1 if i % 2 else -1)) for i in range(20)}
    b = {f"p{i}": (4, 2) for i in range(20)}
    result = paired_difference(a, b, 1)
    assert result.value == pytest.approx(0.0)
    assert result.low < 0 < result.high


def test_k_larger_than_n_raises():
    with pytest.raises(ValueError, match="problem 'p2'"):
        paired_difference({"p1": (8, 1), "p2": (2, 1)}, {"p1": (8, 1), "p2": (8, 1)}, 4)


def test_disjoint_problem_sets_raise():
    with pytest.raises(ValueError, match="no problem in common"):
        paired_difference({"p1": (4, 1)}, {"p2": (4, 1)}, 1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"confidence": 1.0}, ValueError),
        ({"resamples": 0}, ValueError),
        ({"resamples": 2.5}, TypeError),
    ],
)
def test_settings_are_validated(kwargs, error):
    with pytest.raises(error):
        paired_difference({"p": (4, 1)}, {"p": (4, 2)}, 1, **kwargs)


def test_counts_are_validated():
    with pytest.raises(ValueError, match="arm b"):
        paired_difference({"p": (4, 1)}, {"p": (4, 5)}, 1)
    with pytest.raises(TypeError):
        paired_difference({"p": (4, 1)}, {"p": (4, 1)}, True)
    assert pass_at_k(4, 1, 1) == 0.25
