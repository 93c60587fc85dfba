"""In a real browser: an expert whose editor page went stale (someone saved a newer version) is
refused with who saved what, keeps every word typed, opens the diff, and saves on top; and the
trace page's what-if box holds the trace's waypoints, one per line."""

from __future__ import annotations

import pytest

from curation.services.problems import solution_revise
from curation.spans import Span
from tests.browser.conftest import log_in
from tests.factories import make_problem, make_run, make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_a_stale_editor_is_refused_and_keeps_the_text(page, live_server):
    expert = make_user("expert", username="edna", password="browser-pass-9")
    problem = make_problem(author=expert, waypoints=[Span(38, 45)])
    log_in(page, live_server, "edna", "browser-pass-9")
    page.goto(f"{live_server.url}/problems/{problem.pk}/edit/")

    mine = "My careful rewrite: " + problem.versions.get().body
    page.locator("#id_body").fill(mine)
    page.locator("#id_note").fill("rewrote the start")
    # Meanwhile an admin saves version 2.
    solution_revise(
        problem=problem,
        body=problem.versions.get().body + " Checked.",
        author=make_user("admin", username="otto"),
        base_version=1,
    )
    page.get_by_role("button", name="Save", exact=True).click()

    alert = page.get_by_role("alert").filter(has_text="otto saved version 2")
    alert.wait_for()
    assert "were not saved" in alert.inner_text()
    assert page.locator("#id_body").input_value() == mine
    assert page.locator("#id_note").input_value() == "rewrote the start"
    assert problem.versions.count() == 2

    with page.context.expect_page() as diff_tab:
        page.get_by_role("link", name="Compare version 1 with version 2").click()
    diff = diff_tab.value
    diff.wait_for_load_state()
    assert diff.url.endswith(f"/problems/{problem.pk}/versions/?a=1&b=2")
    assert diff.locator(".diff_add").count() > 0  # what otto added is marked
    diff.close()

    page.get_by_role("button", name="Save", exact=True).click()  # now on top of version 2
    page.wait_for_url(f"**/problems/{problem.pk}/")
    assert problem.versions.get(number=3).body == mine


def test_the_whatif_box_holds_the_waypoints(page, live_server):
    from curation.services.problems import waypoints_save
    from curation.services.suggestions import partial_solution_text

    run = make_run(problems=1, samples=1, tokens=12)
    run_problem = run.run_problems.get()
    version = run_problem.solution_version
    spans = [Span(8, 20), Span(38, 45)]  # "$2x + 1 = 7$" and "$x = 3$"
    waypoints_save(version=version, spans=spans)
    run_problem.partial_solution = partial_solution_text(body=version.body, answer="3", spans=spans)
    run_problem.save(update_fields=["partial_solution"])
    make_user("reviewer", username="rhea", password="browser-pass-10")
    log_in(page, live_server, "rhea", "browser-pass-10")
    page.goto(f"{live_server.url}/review/traces/{run.traces.get().pk}/")
    box = page.locator("#whatif-waypoints")
    assert box.input_value() == "$2x + 1 = 7$\n$x = 3$"
