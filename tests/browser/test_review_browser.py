"""In a real browser: a reviewer opens a trace, hovers a token and reads its probabilities,
marks a span as a shortcut, accepts, moves to the next trace, and confirms accepting a trace
without a correct answer, all with the keyboard where the keyboard is meant to be used."""

from __future__ import annotations

import os

import pytest

from expansion.models import ReviewState, ShortcutSpan, Trace
from tests.browser.conftest import log_in
from tests.factories import make_run, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_reviewer_audits_a_trace_with_the_keyboard(page, live_server):
    run = make_run(problems=1, samples=3, tokens=60)
    make_user("reviewer", username="rev", password="browser-pass-6")
    log_in(page, live_server, "rev", "browser-pass-6")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Review").click()
    page.get_by_test_id("next-unreviewed").click()
    page.wait_for_url("**/review/traces/*/")
    first_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    assert Trace.objects.get(pk=first_id).run_id == run.pk

    # Hover a token: the inspector shows the three views' probabilities and alternatives.
    page.locator("#trace-text .t").nth(5).hover()
    inspector = page.locator("#token-info")
    for label in (
        "learner",
        "privileged (PS)",
        "negative ref. (NR)",
        "shortcut score",
        "PS top",
        "NR top",
    ):
        assert label in inspector.inner_text()

    # Threshold slider changes which tokens are outlined.
    before = page.locator("#trace-text .over").count()
    page.locator("#threshold").fill("0")
    assert page.locator("#trace-text .over").count() > before

    # Keyboard: focus the text, move to token 10, extend the selection to token 14, mark it.
    page.locator("#trace-text").focus()
    page.locator("#trace-text .t").nth(0).click()
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    for _ in range(4):
        page.keyboard.press("Shift+ArrowRight")
    page.locator("#span-note").fill("states the result before deriving it")
    page.locator("#trace-text").focus()
    page.keyboard.press("m")
    page.locator("ul.spans", has_text="states the result").wait_for()
    span = ShortcutSpan.objects.get(trace_id=first_id)
    assert (span.start_token, span.end_token) == (10, 15)
    assert page.locator("#trace-text .in-span").count() >= 1

    # Accept with "a", then "n" moves to the next unreviewed trace.
    page.keyboard.press("a")
    page.get_by_test_id("review-state").filter(has_text="Accepted").wait_for()
    assert Trace.objects.get(pk=first_id).review_state == ReviewState.ACCEPTED
    page.keyboard.press("n")
    page.wait_for_url(lambda url: url.rstrip("/").rsplit("/", 1)[1] != str(first_id))
    second_id = int(page.url.rstrip("/").rsplit("/", 1)[1])
    assert Trace.objects.get(pk=second_id).review_state == ReviewState.UNREVIEWED

    # This trace has no correct answer: "a" asks first; Esc cancels, "a" then Enter confirms.
    assert Trace.objects.get(pk=second_id).answer_correct is False
    confirm = page.get_by_test_id("accept-confirm")
    page.keyboard.press("a")
    confirm.wait_for(state="visible")
    page.keyboard.press("Escape")
    confirm.wait_for(state="hidden")
    assert Trace.objects.get(pk=second_id).review_state == ReviewState.UNREVIEWED
    page.keyboard.press("a")
    confirm.wait_for(state="visible")
    page.keyboard.press("Enter")
    page.get_by_test_id("review-state").filter(has_text="Accepted").wait_for()
    assert Trace.objects.get(pk=second_id).review_state == ReviewState.ACCEPTED

    # The help overlay opens with "?".
    page.keyboard.press("?")
    assert page.locator("dialog#help").is_visible()
    page.keyboard.press("Escape")
    if os.environ.get("DAIL_SCREENSHOT_DIR"):
        page.screenshot(path=os.path.join(os.environ["DAIL_SCREENSHOT_DIR"], "review.png"))
