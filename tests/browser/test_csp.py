"""In Chromium: every page type, as the role that uses it, is served with the strict
Content-Security-Policy and runs without a single violation (no inline script or style, no
eval), while its scripts (htmx, the trace page, the editor's live preview, Chart.js) still work.

Violations are caught twice: the `securitypolicyviolation` DOM event (hooked into every page
before its own scripts run) and Chromium's console messages about the policy."""

from __future__ import annotations

import pytest
from django.conf import settings

from tests.browser.conftest import log_in
from tests.browser.pages import MATH_SOLUTION, build_site

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.__dailCspViolation(
    `${e.effectiveDirective} blocked ${e.blockedURI || "inline"} (${e.sourceFile}:${e.lineNumber})`
  );
});
"""


class PolicyWatch:
    """Collects CSP violations from every page of one browser context."""

    def __init__(self, page):
        self.page = page
        self.violations: list[str] = []
        page.context.expose_binding(
            "__dailCspViolation", lambda source, text: self.violations.append(text)
        )
        page.context.add_init_script(REPORT_VIOLATIONS)
        page.on("console", self._console)

    def _console(self, message) -> None:
        text = message.text
        if "Content Security Policy" in text or "Content-Security-Policy" in text:
            self.violations.append(f"console: {text}")

    def settle(self) -> None:
        # Polling pages leave gaps longer than 500 ms between requests, so this returns.
        self.page.wait_for_load_state("networkidle")
        self.page.wait_for_timeout(250)

    def visit(self, url: str, *, status: int = 200) -> None:
        response = self.page.goto(url)
        assert response is not None and response.status == status, (url, response.status)
        assert_strict_policy(response.header_value("content-security-policy"), url)
        self.settle()
        self.assert_clean(url)

    def assert_clean(self, where: str) -> None:
        assert not self.violations, f"CSP violations on {where}: {self.violations}"


def assert_strict_policy(header: str | None, where: str) -> None:
    assert header, f"no Content-Security-Policy header on {where}"
    directives = {part.split()[0]: part.split()[1:] for part in header.split(";") if part.strip()}
    assert directives["default-src"] == ["'self'"], where
    assert directives["script-src"] == ["'self'"], where
    assert directives["style-src"] == ["'self'"], where
    assert directives["object-src"] == ["'none'"], where
    assert directives["frame-ancestors"] == ["'none'"], where
    assert "'unsafe-inline'" not in header and "'unsafe-eval'" not in header, where


def test_the_watch_catches_an_inline_style(page, live_server):
    """The detector itself works: an inline style attribute is reported as a violation."""
    watch = PolicyWatch(page)
    watch.visit(f"{live_server.url}/accounts/login/")
    page.evaluate(
        "() => document.body.insertAdjacentHTML('beforeend', '<p style=\"color: red\">x</p>')"
    )
    watch.settle()
    assert any("style-src" in v for v in watch.violations), watch.violations


def test_every_page_type_runs_under_the_policy(page, live_server):
    url = live_server.url
    watch = PolicyWatch(page)
    # Every page type's rows (tests/browser/pages.py): math in the statement and the solution,
    # a run with traces, a running job, a training run, two evaluations, a lockout record.
    site = build_site()
    problem = site.problem
    admin = site.admin_user
    training = site.training
    base, tuned = site.evaluations

    # Anonymous: the login pages, a 404, and the lockout page after too many failures.
    watch.visit(f"{url}/accounts/login/")
    watch.visit(f"{url}/admin/login/")
    watch.visit(f"{url}/no-such-page/", status=404)

    # Expert: curation.
    log_in(page, live_server, site.expert.username, site.expert.password)
    watch.settle()
    watch.assert_clean("the expert's login")
    for path in site.expert.paths:
        watch.visit(url + path)
    watch.visit(f"{url}/problems/{problem.pk}/")
    assert page.locator(".katex math").count() >= 5, "math is typeset as MathML"
    # The editor: typing re-renders the live panel through htmx (hx-post, swap).
    watch.visit(f"{url}/problems/{problem.pk}/edit/")
    before = page.locator("#live-panel").inner_html()
    page.locator("#id_body").fill(MATH_SOLUTION + "\n\nNew line with $y^2$.")
    page.wait_for_function(
        "html => document.querySelector('#live-panel').innerHTML !== html", arg=before
    )
    watch.settle()
    watch.assert_clean("the editor after a live preview")
    # The problem list's filter form swaps its table through htmx.
    watch.visit(f"{url}/problems/")
    page.locator("#id_q").fill("zzz-nothing")
    page.wait_for_url("**q=zzz-nothing**")
    watch.settle()
    watch.assert_clean("the problem list after filtering")
    page.context.clear_cookies()

    # Reviewer: the queue and the token-level trace page (trace.js colours and inspects).
    log_in(page, live_server, site.reviewer.username, site.reviewer.password)
    for path in site.reviewer.paths:
        watch.visit(url + path)
    page.locator("#trace-text .t").nth(3).hover()
    assert "shortcut score" in page.locator("#token-info").inner_text()
    watch.settle()
    watch.assert_clean("the trace page after inspecting a token")
    page.context.clear_cookies()

    # Admin (staff and superuser, as `manage.py demo_users` makes it): jobs, runs, training,
    # evaluations, models, and the Django admin's pages.
    log_in(page, live_server, site.admin.username, site.admin.password)
    for path in (
        *site.admin.paths,
        "/admin/",
        "/admin/axes/accessattempt/",
        f"/admin/auth/user/{admin.pk}/change/",
    ):
        watch.visit(url + path)
    # The training charts (Chart.js from our static files) drew the stored steps.
    watch.visit(f"{url}/training/{training.pk}/")
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-loss')")
    watch.visit(f"{url}/evaluations/compare/?ids={base.pk}&ids={tuned.pk}")
    page.wait_for_function("() => window.Chart && Chart.getChart('chart-budget')")
    watch.settle()
    watch.assert_clean("the evaluation charts")
    # The jobs list's polling (a running job) swaps its table at least once.
    watch.visit(f"{url}/jobs/")
    with page.expect_response(lambda r: "/jobs/" in r.url and r.request.headers.get("hx-request")):
        pass
    watch.settle()
    watch.assert_clean("the jobs list after an htmx poll")
    page.context.clear_cookies()

    # Too many failures: the lockout page.
    for _ in range(settings.AXES_FAILURE_LIMIT):
        page.goto(f"{url}/accounts/login/")
        page.get_by_label("Username").fill("nobody")
        page.get_by_label("Password").fill("wrong")
        page.get_by_role("button", name="Log in").click()
        if page.get_by_test_id("login-locked").count():
            break
    assert page.get_by_test_id("login-locked").is_visible()
    watch.settle()
    watch.assert_clean("the lockout page")
