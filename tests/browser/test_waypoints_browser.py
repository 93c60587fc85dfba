"""In a real browser (issue 16, item 5): Alt+W with nothing selected adds nothing and says to
select text first; an old textarea selection is never marked again."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import log_in
from tests.factories import make_problem, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SOLUTION = "So $2x = 6$ and then $x = 3$. The answer is $3$."


def waypoint_count(page) -> int:
    return len(json.loads(page.locator("#id_waypoints").input_value()))


def test_alt_w_without_a_selection_adds_nothing_and_says_so(page, live_server):
    author = make_user("expert", username="noether", password="browser-pass-7")
    problem = make_problem(author=author, solution=SOLUTION, answer="3")
    log_in(page, live_server, "noether", "browser-pass-7")
    page.goto(f"{live_server.url}/problems/{problem.pk}/edit/")
    page.locator("[data-testid=preview] math").first.wait_for()
    assert waypoint_count(page) == 0

    start = SOLUTION.index("$2x = 6$")
    page.locator("#id_body").evaluate(
        "(el, [a, b]) => { el.focus(); el.setSelectionRange(a, b); }", [start, start + 8]
    )
    page.keyboard.press("Alt+w")
    page.locator("ol.waypoints li code", has_text="$2x = 6$").wait_for()
    assert waypoint_count(page) == 1

    # The selection was used: pressing Alt+W again marks nothing and says why.
    page.keyboard.press("Alt+w")
    status = page.locator("#mark-status")
    status.filter(has_text="Select text first").wait_for()
    page.wait_for_timeout(600)  # a request, had one been sent, would have come back by now
    assert waypoint_count(page) == 1

    # A selection left in the textarea after focus moved elsewhere is not reused either.
    page.locator("#id_body").evaluate(
        "(el, [a, b]) => { el.focus(); el.setSelectionRange(a, b); }",
        [SOLUTION.index("$x = 3$"), SOLUTION.index("$x = 3$") + 7],
    )
    page.locator("#id_answer").focus()
    page.keyboard.press("Alt+w")
    status.filter(has_text="Select text first").wait_for()
    page.wait_for_timeout(600)
    assert waypoint_count(page) == 1
    assert page.locator("ol.waypoints li").count() == 1


def test_history_diff_stays_inside_its_card(page, live_server):
    from curation.services.problems import solution_revise

    author = make_user("expert", username="cantor", password="browser-pass-8")
    long_line = "Consider the sum " + " + ".join(f"a_{{{i}}}" for i in range(60)) + "."
    problem = make_problem(author=author, solution=long_line + "\n\nSo $x = 3$.", answer="3")
    solution_revise(
        problem=problem,
        body=long_line.replace("sum", "total") + "\n\nSo $x = 3$ indeed.",
        author=author,
    )
    log_in(page, live_server, "cantor", "browser-pass-8")
    page.set_viewport_size({"width": 1024, "height": 768})
    page.goto(f"{live_server.url}/problems/{problem.pk}/versions/")
    card = page.locator(".diff.card")
    card.locator("table.diff").wait_for()
    sizes = card.evaluate(
        "el => [el.getBoundingClientRect().right, el.querySelector('table').getBoundingClientRect().right,"
        " el.scrollWidth, el.clientWidth, document.documentElement.scrollWidth, innerWidth]"
    )
    card_right, table_right, scroll_width, client_width, page_width, viewport = sizes
    assert table_right <= card_right + 1, sizes
    assert scroll_width <= client_width + 1, sizes  # nothing to scroll sideways either
    assert page_width <= viewport, sizes
