"""Waypoint spans: validation and carrying them into an edited text (no database)."""

from __future__ import annotations

import pytest

from curation.spans import Span, SpanError, carry_spans, spans_for_strings, validate_spans

BODY = "We get $x = 3$, then $y = 4$; finally $x + y = 7$."


def test_valid_spans_pass_in_their_order():
    spans = [Span(21, 28), Span(7, 14)]
    assert validate_spans(BODY, spans) == spans


@pytest.mark.parametrize(
    ("spans", "message"),
    [
        ([Span(0, 999)], "outside the solution text"),
        ([Span(5, 5)], "or empty"),
        ([Span(2, 3)], "only white space"),
        ([Span(7, 14), Span(10, 20)], "overlap"),
    ],
)
def test_bad_spans_are_refused_with_a_reason(spans, message):
    with pytest.raises(SpanError, match=message):
        validate_spans(BODY, spans)


def test_strings_become_spans_at_first_free_occurrence():
    body = "a=1, b=1, a=1"
    spans, missing = spans_for_strings(body, ["a=1", "a=1", "c=2"], "expert")
    assert [(s.start, s.end) for s in spans] == [(0, 3), (10, 13)]
    assert missing == ["c=2"]


def test_carry_follows_the_text_and_reports_what_is_gone():
    spans = [Span(7, 14), Span(21, 28), Span(38, 49)]
    new = "First a new sentence. We get $x = 3$, then $y = 5$; finally $x + y = 7$."
    carried, dropped = carry_spans(BODY, new, spans)
    assert [s.text_in(new) for s in carried] == ["$x = 3$", "$x + y = 7$"]
    assert dropped == ["$y = 4$"]


def test_carry_picks_the_occurrence_where_the_text_moved():
    old = "x=1 here. later x=1 again"
    new = "Intro. x=1 here. later x=1 again"
    carried, dropped = carry_spans(old, new, [Span(16, 19)])  # the second occurrence
    assert not dropped
    assert carried[0].start == new.rindex("x=1")
