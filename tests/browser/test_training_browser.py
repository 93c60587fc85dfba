"""In a real browser: an admin opens Training from the menu, fills the launch form for a small
run on the embedded model (a real Celery worker on the `gpu` queue trains it), lands on the
run's page and watches the loss chart grow step by step while the progress bar fills, until
the job succeeds and the adapter is in the registry."""

from __future__ import annotations

import os
import time

import pytest

from dailweb.jobs.models import JobState
from tests.browser.conftest import log_in
from tests.factories import make_user
from tests.training.training_factories import make_tokenized_run
from training.models import TrainingRun

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.django_db(transaction=True),
]

STEPS = 10


def shot(page, name):
    if os.environ.get("DAIL_SCREENSHOT_DIR"):
        page.screenshot(
            path=os.path.join(os.environ["DAIL_SCREENSHOT_DIR"], f"{name}.png"), full_page=True
        )


def chart_points(page, canvas_id: str = "chart-loss") -> int:
    return page.evaluate(
        "id => { const c = window.Chart && Chart.getChart(document.getElementById(id));"
        " return c ? c.data.datasets[0].data.length : -1; }",
        canvas_id,
    )


def test_admin_launches_a_training_run_and_watches_it_finish(
    page, live_server, celery_worker_factory, embedded_model_dir, settings, tmp_path
):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"
    run_data = make_tokenized_run(embedded_model_dir, samples=STEPS, name="smoke traces")
    make_user("admin", username="hinton", password="browser-pass-9")
    celery_worker_factory(name="gpu-train-browser", queues="gpu")

    log_in(page, live_server, "hinton", "browser-pass-9")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Training").click()
    page.get_by_role("link", name="New training run").click()
    assert "scaled for the embedded SmolLM2-135M" in page.locator("#scale-note").inner_text()
    page.locator("#id_name").fill("browser smoke")
    page.get_by_label(f"#{run_data.pk} smoke traces", exact=False).check()
    page.get_by_label("Base model directory").fill(str(embedded_model_dir))
    page.get_by_label("Maximum length (tokens)").fill("128")
    page.get_by_label("Effective batch (traces per step)").fill("1")
    page.locator("#id_lora_r").fill("4")
    shot(page, "training-01-form")
    page.get_by_role("button", name="Launch training").click()
    page.wait_for_url("**/training/*/")
    run = TrainingRun.objects.get()
    assert page.url.endswith(f"/training/{run.pk}/")
    assert run.total_steps == STEPS

    # Watch: the loss chart gains points while the job runs; the bar ends at 100 %.
    seen: list[int] = []
    deadline = time.monotonic() + 600
    status = page.locator("#training-status")
    while time.monotonic() < deadline:
        count = chart_points(page)
        if count >= 0 and (not seen or count != seen[-1]):
            seen.append(count)
            if 0 < count < STEPS and len(seen) == 2:
                shot(page, "training-02-running")
        if status.get_attribute("data-state") == JobState.SUCCEEDED and count == STEPS:
            break
        time.sleep(0.3)
    assert seen and seen[-1] == STEPS, f"chart point counts seen: {seen}"
    assert seen == sorted(seen), seen
    assert any(0 < c < STEPS for c in seen), f"the chart never showed a partial run: {seen}"
    progress = page.locator("#training-status [role=progressbar]")
    assert progress.get_attribute("aria-valuenow") == "100"
    assert "Succeeded" in status.inner_text()
    assert f"step {STEPS} of {STEPS}" in page.get_by_test_id("training-progress").inner_text()
    for canvas in ("chart-kl-privileged", "chart-kl-negative", "chart-lr"):
        assert chart_points(page, canvas) == STEPS
    assert status.get_attribute("hx-trigger") is None  # polling stopped
    shot(page, "training-03-finished")

    page.get_by_role("link", name="Adapter registry").first.click()
    row = page.get_by_test_id(f"adapter-{run.pk}")
    assert "browser smoke" in row.inner_text() and "zip" in row.inner_text()
    shot(page, "training-04-registry")
    with page.expect_download() as download:
        row.get_by_role("link", name="zip").click()
    assert download.value.suggested_filename == f"dail-adapter-{run.pk}.zip"
