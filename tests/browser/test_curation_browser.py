"""In a real browser: an expert creates a problem with LaTeX, marks two waypoints by selecting
text (keyboard in the source, mouse in the rendered pane), sees s~ and the prompts, saves,
edits the solution, and finds the waypoints carried into version 2."""

from __future__ import annotations

import os

import pytest

from curation.models import Problem
from tests.browser.conftest import log_in
from tests.factories import make_dataset, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SOLUTION = (
    "Let $n$ be the number. Squaring gives $n^2 = 49$, so $n = 7$.\n\n"
    "Then $2n + 1 = 15$ and the answer is $15$."
)


def shot(page, name):
    if os.environ.get("DAIL_SCREENSHOT_DIR"):
        page.screenshot(
            path=os.path.join(os.environ["DAIL_SCREENSHOT_DIR"], f"{name}.png"), full_page=True
        )


def wait_for_panel(page, text: str):
    page.locator("#live-panel", has_text=text).wait_for()


def test_expert_creates_marks_waypoints_saves_and_edits(page, live_server):
    make_user("expert", username="euler", password="browser-pass-4")
    make_dataset(name="Olympiad")
    log_in(page, live_server, "euler", "browser-pass-4")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Problems").click()
    page.get_by_role("link", name="New problem").click()
    page.get_by_label("Dataset").select_option(label="Olympiad")
    page.get_by_label("Problem id").fill("SQ-1")
    page.get_by_label("Problem (Markdown + LaTeX)").fill(
        "If $n^2 = 49$ and $n > 0$, find $2n + 1$."
    )
    page.get_by_label("Solution (Markdown + LaTeX)").fill(SOLUTION)
    page.get_by_label("Final answer").fill("15")
    # The live preview renders the LaTeX (MathML from KaTeX on the server).
    page.locator("[data-testid=preview] math").first.wait_for()

    # Waypoint 1: select "$n = 7$" in the source textarea with the keyboard shortcut.
    start = SOLUTION.index("$n = 7$")
    page.locator("#id_body").evaluate(
        "(el, [a, b]) => { el.focus(); el.setSelectionRange(a, b); }", [start, start + 7]
    )
    page.keyboard.press("Alt+w")
    wait_for_panel(page, "Intermediate results used in the solution might include: $n = 7$.")

    # Waypoint 2: drag the mouse across the rendered formula 2n + 1 = 15 in the marking pane.
    formula = page.locator("#marking .src-math", has=page.locator("math")).nth(3)
    assert formula.get_attribute("title") == "$2n + 1 = 15$"
    box = formula.bounding_box()
    page.mouse.move(box["x"] + 1, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    page.get_by_role("button", name="Mark selection").click()
    partial = "The final answer is 15. Intermediate results used in the solution might include: $n = 7$, $2n + 1 = 15$."
    wait_for_panel(page, partial)
    assert page.locator("[data-testid=partial-solution]").inner_text() == partial
    assert page.locator("#marking .mark").count() >= 2  # both highlighted in the pane

    page.get_by_text("The exact prompts the model will see").click()
    privileged = page.locator("pre[data-view=privileged]").inner_text()
    negative = page.locator("pre[data-view=negative]").inner_text()
    assert "## Reference Solution(s):" in privileged and "Squaring gives" in privileged
    assert f"Hint: {partial}" in negative
    shot(page, "curation-editor")

    page.get_by_role("button", name="Create problem").click()
    page.wait_for_url("**/problems/*/")
    assert page.get_by_role("heading", name="SQ-1").is_visible()
    waypoint_texts = page.locator("ol.waypoints li code").all_inner_texts()
    assert waypoint_texts == ["$n = 7$", "$2n + 1 = 15$"]

    # Edit: add a sentence in front and change the last line; the waypoints follow the text.
    page.get_by_role("link", name="Edit solution & waypoints").click()
    edited = "We solve it directly.\n\n" + SOLUTION.replace(
        "the answer is $15$", "so the answer is $15$"
    )
    page.get_by_label("Solution (Markdown + LaTeX)").fill(edited)
    wait_for_panel(page, "We solve it directly.")
    page.get_by_label("What changed").fill("intro sentence")
    page.get_by_role("button", name="Save", exact=True).click()
    page.wait_for_url("**/problems/*/")
    assert page.get_by_text("Saved version 2.").is_visible()
    assert page.locator("ol.waypoints li code").all_inner_texts() == ["$n = 7$", "$2n + 1 = 15$"]
    shot(page, "curation-detail")

    problem = Problem.objects.get(external_id="SQ-1")
    v2 = problem.versions.get(number=2)
    assert v2.body == edited
    assert [w.text for w in v2.waypoints.order_by("order")] == ["$n = 7$", "$2n + 1 = 15$"]
    assert [w.text for w in problem.versions.get(number=1).waypoints.order_by("order")] == [
        "$n = 7$",
        "$2n + 1 = 15$",
    ]


def test_xss_payload_is_never_executed(page, live_server):
    from tests.factories import make_problem

    author = make_user("expert", username="mallory", password="browser-pass-5")
    payload = '<img src=x onerror="window.__xss = 1"><script>window.__xss = 2</script>'
    problem = make_problem(
        author=author, statement=payload, solution=f"{payload} and $x = 1$", answer=payload
    )
    log_in(page, live_server, "mallory", "browser-pass-5")
    for path in (f"/problems/{problem.pk}/", f"/problems/{problem.pk}/edit/", "/problems/"):
        page.goto(live_server.url + path)
        page.wait_for_load_state("networkidle")
        assert page.evaluate("window.__xss === undefined"), path
    assert page.get_by_text("<script>window.__xss = 2</script>").first.is_visible()
