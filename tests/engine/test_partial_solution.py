"""The partial solution s~ and the release's waypoint suggestion."""

from __future__ import annotations

import pytest

from expansion.engine.partial_solution import (
    render_partial_solution,
    suggest_waypoint_spans,
    suggest_waypoints,
    waypoints_from_spans,
)


def test_render_with_answer_and_waypoints_is_exact():
    assert render_partial_solution("239", ["x = 3", "2^{10}"]) == (
        "The final answer is 239. Intermediate results used in the solution might include: "
        "x = 3, 2^{10}."
    )


def test_render_without_answer_omits_the_first_sentence():
    assert render_partial_solution(None, ["a+b", "7"]) == (
        "Intermediate results used in the solution might include: a+b, 7."
    )
    assert render_partial_solution("  ", ["7"]).startswith("Intermediate")


def test_render_without_waypoints_keeps_only_the_answer():
    assert render_partial_solution("5", []) == "The final answer is 5."
    assert render_partial_solution("5", ["", "  "]) == "The final answer is 5."
    assert render_partial_solution(None, []) == ""


def test_suggestion_finds_each_kind_of_entity():
    solution = (
        "Let 3x = 12, so x+1 = 5 and 2x+1 = 9. Then 2^{10} = 1024, about 1.5e3, "
        "and 0.25 of it. So \\boxed{1024}."
    )
    found = suggest_waypoints(solution, "1024")
    for entity in ["3x", "12", "x+1", "5", "2x+1", "9", "2^{10}", "1.5e3", "0.25"]:
        assert entity in found, entity
    assert "1024" not in found  # the final answer is removed
    assert found == sorted(set(found))  # sorted (as strings, like the release), no repeats


def test_suggestion_uses_the_last_boxed_answer_when_none_is_given():
    solution = "First 7, then 3 \\cdot 7 = 21, hence \\boxed{21}."
    assert "21" not in suggest_waypoints(solution, None)
    assert "21" in suggest_waypoints(solution, "7")
    assert "7" not in suggest_waypoints(solution, " 7 ")


def test_release_regex_behaviour_is_kept():
    # The release's number pattern also matches the exponent digits and signed numbers.
    found = suggest_waypoints("We get x^2 - 4 = -4 + 0.5", None)
    assert {"x^2", "2", "4", "-4", "0.5"} <= set(found)


def test_spans_point_at_first_occurrences_in_the_same_order():
    solution = "Try 12 and 5, then 12 again, and x+1."
    spans = suggest_waypoint_spans(solution, None)
    assert [solution[s:e] for s, e in spans] == suggest_waypoints(solution, None)
    start = solution.index("12")
    assert (start, start + 2) in spans
    assert len(spans) == len(set(spans))


def test_waypoints_from_spans_orders_and_checks():
    solution = "abc def ghi"
    assert waypoints_from_spans(solution, [(8, 11), (0, 3)]) == ["abc", "ghi"]
    with pytest.raises(ValueError, match="outside"):
        waypoints_from_spans(solution, [(5, 50)])
