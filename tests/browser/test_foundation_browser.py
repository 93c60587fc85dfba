"""In a real browser: each role logs in and sees its home; an admin launches the embedded
model's preparation and watches the progress bar reach 100 %."""

from __future__ import annotations

import os
import time

import pytest

from tests.browser.conftest import log_in
from tests.factories import make_user

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOTS = os.environ.get("DAIL_SCREENSHOT_DIR")


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        page.screenshot(path=os.path.join(SCREENSHOTS, f"{name}.png"), full_page=True)


@pytest.mark.parametrize(
    ("role", "heading", "link"),
    [
        ("expert", "expert", None),
        ("reviewer", "reviewer", None),
        ("admin", "admin", "Jobs dashboard"),
    ],
)
def test_each_role_logs_in_and_sees_its_home(page, live_server, role, heading, link):
    make_user(role, username=f"{role}-1", password="browser-pass-1")
    log_in(page, live_server, f"{role}-1", "browser-pass-1")
    assert page.get_by_role("heading", name=f"Welcome, {role}-1").is_visible()
    assert page.locator(f"#role-{heading}").is_visible()
    nav_jobs = page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs")
    assert nav_jobs.count() == (1 if role == "admin" else 0)
    if link:
        assert page.get_by_role("link", name=link).is_visible()
    shot(page, f"home-{role}")
    page.get_by_role("button", name="Log out").click()
    page.wait_for_url("**/accounts/login/")


def test_expert_is_refused_the_jobs_page(page, live_server):
    make_user("expert", username="ex", password="browser-pass-2")
    log_in(page, live_server, "ex", "browser-pass-2")
    response = page.goto(f"{live_server.url}/jobs/")
    assert response.status == 403
    assert page.get_by_role("heading", name="403 · Not allowed").is_visible()


def test_admin_watches_model_preparation_reach_100_percent(
    page, live_server, celery_worker_factory, tmp_path, settings
):
    artifacts = tmp_path / "artifacts"
    settings.ARTIFACTS_DIR = artifacts  # the live server runs in this process
    celery_worker_factory(
        name="gpu-browser", queues="gpu", env={"DAIL_ARTIFACTS_DIR": str(artifacts)}
    )
    make_user("admin", username="ada", password="browser-pass-3")
    log_in(page, live_server, "ada", "browser-pass-3")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Models").click()
    assert page.get_by_text("not prepared").is_visible()
    page.get_by_role("button", name="Prepare the embedded model").click()
    page.wait_for_url("**/jobs/*/")

    bar = page.locator("#job-status [role=progressbar]")
    seen: list[int] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        value = int(bar.get_attribute("aria-valuenow") or 0)
        if not seen or seen[-1] != value:
            seen.append(value)
        state = page.locator("#job-status").get_attribute("data-state")
        if state in ("succeeded", "failed"):
            break
        if 20 < value < 80 and not any(n.startswith("job-running") for n in os.listdir(tmp_path)):
            shot(page, "job-running")
            (tmp_path / "job-running-shot").touch()
        page.wait_for_timeout(300)
    shot(page, "job-finished")
    assert page.locator("#job-status").get_attribute("data-state") == "succeeded", page.content()
    assert bar.get_attribute("aria-valuenow") == "100"
    assert page.locator("#job-status .progress-label").inner_text().strip() == "100 %"
    assert any(0 < v < 100 for v in seen), f"the bar never showed an intermediate value: {seen}"
    assert seen == sorted(seen), f"the bar went backwards: {seen}"
    # Polling stopped: the finished status block no longer carries an htmx trigger.
    assert page.locator("#job-status").get_attribute("hx-trigger") is None
    page.get_by_role("link", name="Models").first.click()
    assert page.get_by_text("prepared", exact=True).is_visible()
