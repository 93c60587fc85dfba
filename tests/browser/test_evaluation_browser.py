"""In a real browser: an admin picks two evaluations, compares them (Chart.js charts from our
own static files, tables with intervals), switches the budget chart's k, exports CSV, opens a
problem's samples (math typeset) and rules on a flagged sample, which changes the numbers."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import pytest

from tests.browser.conftest import log_in
from tests.factories import make_user
from tests.training.factories import make_evaluation
from training.models import EvaluationSample

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def shot(page, name):
    if os.environ.get("DAIL_SCREENSHOT_DIR"):
        page.screenshot(
            path=os.path.join(os.environ["DAIL_SCREENSHOT_DIR"], f"{name}.png"), full_page=True
        )


def chart_labels(page, canvas_id: str) -> list[str]:
    return page.evaluate(
        "id => Chart.getChart(document.getElementById(id)).data.datasets"
        ".map(d => d.label).filter(l => !l.startsWith('_'))",
        canvas_id,
    )


def test_admin_compares_evaluations_drills_down_and_rules(page, live_server):
    make_user("admin", username="gauss", password="browser-pass-7")
    base = make_evaluation(
        problems=3, samples=4, name="base model", correct=lambda p, s: p == 0 and s == 0,
        tokens=lambda p, s: 12 + 10 * s,
    )  # fmt: skip
    tuned = make_evaluation(
        samples=4, name="adapter", correct=lambda p, s: s < 2, tokens=lambda p, s: 8 + 5 * s,
        adapter_path="/adapters/dail-1",
        on_problems=[m.problem for m in base.problems.select_related("problem__dataset")],
    )  # fmt: skip
    flagged = EvaluationSample.objects.get(
        eval_problem__evaluation=base, eval_problem__position=1, sample_index=3
    )
    EvaluationSample.objects.filter(pk=flagged.pk).update(checkers_disagree=True, math_verify=True)

    log_in(page, live_server, "gauss", "browser-pass-7")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Evaluations").click()
    page.get_by_label(f"Compare evaluation #{base.pk}").check()
    page.get_by_label(f"Compare evaluation #{tuned.pk}").check()
    page.get_by_role("button", name="Compare selected").click()
    page.wait_for_url(f"**/evaluations/compare/?ids={tuned.pk}&ids={base.pk}")
    compare_url = page.url

    # Charts drawn by Chart.js (served from /static/vendor/chartjs/), one line per evaluation.
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-budget')")
    assert chart_labels(page, "chart-pass-at-k") == [
        f"#{tuned.pk} adapter",
        f"#{base.pk} base model",
    ]
    assert chart_labels(page, "chart-budget")[0] == f"#{tuned.pk} adapter (pass@4)"
    page.get_by_label("k for the budget curve").select_option("1")
    assert chart_labels(page, "chart-budget")[0] == f"#{tuned.pk} adapter (pass@1)"
    values = page.evaluate(
        "() => Chart.getChart('chart-pass-at-k').data.datasets.filter(d => !d.label.startsWith('_'))"
        ".map(d => d.data)"
    )
    assert values[0] == pytest.approx([0.5, 5 / 6, 1.0])  # adapter: 2 of 4 right everywhere
    assert values[1][0] == pytest.approx(1 / 12)  # base: one sample of twelve
    table = page.locator("#pass-at-k-table")
    assert "50.0 % [50.0, 50.0]" in table.inner_text()
    shot(page, "evaluation-compare")

    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    rows = list(csv.DictReader(io.StringIO(Path(download.value.path()).read_text())))
    assert {int(r["evaluation_id"]) for r in rows} == {base.pk, tuned.pk}

    # Drill down to the problem with the flagged sample.
    problem = flagged.eval_problem.problem
    problem_name = f"{problem.dataset.name}/{problem.external_id}"
    page.locator("#problem-table").get_by_role("link", name=problem_name).click()
    page.get_by_role("heading", name=problem_name).wait_for()
    assert page.locator(".sample-column").count() == 2  # both evaluations' samples side by side
    sample = page.locator(f"#sample-{flagged.pk}")
    assert "checkers disagree" in sample.inner_text()
    assert sample.locator("math").count() >= 1  # the sample's LaTeX, typeset on the server
    shot(page, "evaluation-samples")
    sample.get_by_label("Ruling").select_option("correct")
    sample.get_by_label("Note on sample 4").fill("equivalent, says a person")
    sample.get_by_role("button", name="Save ruling").click()
    page.get_by_text("Sample 4: ruled correct.").wait_for()
    assert "Ruled correct by gauss" in page.locator(f"#sample-{flagged.pk}").inner_text()

    # Back on the comparison, the ruling counts: base now has 2 correct samples of 12.
    page.goto(compare_url)
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-pass-at-k')")
    values = page.evaluate(
        "() => Chart.getChart('chart-pass-at-k').data.datasets.filter(d => !d.label.startsWith('_'))"
        ".map(d => d.data)"
    )
    assert values[1][0] == pytest.approx(2 / 12)
    assert "1 ruled, 1 overturning the checkers" in page.locator("#eval-summary").inner_text()
