"""In Chromium: every page type, as the role that uses it, is served with the strict
Content-Security-Policy and runs without a single violation (no inline script or style, no
eval), while its scripts (htmx, the trace page, the editor's live preview, Chart.js) still work.

Violations are caught twice: the `securitypolicyviolation` DOM event (hooked into every page
before its own scripts run) and Chromium's console messages about the policy."""

from __future__ import annotations

import pytest
from axes.models import AccessAttempt
from django.conf import settings

from curation.services.problems import solution_revise
from dailweb.jobs.models import JobState
from tests.browser.conftest import log_in
from tests.factories import make_dataset, make_job, make_problem, make_run, make_user
from tests.training.factories import make_evaluation
from tests.training.training_factories import make_training_run

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (e) => {
  window.__dailCspViolation(
    `${e.effectiveDirective} blocked ${e.blockedURI || "inline"} (${e.sourceFile}:${e.lineNumber})`
  );
});
"""

MATH_SOLUTION = (
    "Let $f(x) = \\frac{x^2 + 1}{\\sqrt{x}}$. Then\n\n"
    "$$\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}, \\qquad \\int_0^1 x\\,dx = \\tfrac12$$\n\n"
    "\\begin{aligned} a &= b + c \\\\ \\left( \\frac{a}{b} \\right)^2 &= \\binom{n}{k} \\end{aligned}\n\n"
    "| n | $n^2$ |\n| --- | --- |\n| 3 | $9$ |\n\n`code $x$` and **bold**. The answer is $\\boxed{3}$."
)


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

    # Anonymous: the login pages, a 404, and the lockout page after too many failures.
    watch.visit(f"{url}/accounts/login/")
    watch.visit(f"{url}/admin/login/")
    watch.visit(f"{url}/no-such-page/", status=404)

    # Expert: curation, with real math in the statement and the solution.
    expert = make_user("expert", username="erin", password="csp-pass-1")
    dataset = make_dataset(name="csp set")
    problem = make_problem(
        author=expert, dataset=dataset, statement="Find $x$ with $\\sqrt{x} = 3$.",
        solution=MATH_SOLUTION, answer="3",
    )  # fmt: skip
    solution_revise(problem=problem, body=MATH_SOLUTION + "\n\nA second version.", author=expert)
    log_in(page, live_server, "erin", "csp-pass-1")
    watch.settle()
    watch.assert_clean("the expert's login")
    for path in (
        "/",
        "/problems/",
        f"/problems/{problem.pk}/",
        f"/problems/{problem.pk}/versions/",
        f"/problems/{problem.pk}/versions/?a=1&b=2",
        "/problems/new/",
        "/problems/import/",
        "/problems/datasets/new/",
    ):
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
    run = make_run(problems=1, samples=2, tokens=40)
    trace = run.traces.order_by("pk").first()
    make_user("reviewer", username="rita", password="csp-pass-2")
    log_in(page, live_server, "rita", "csp-pass-2")
    watch.visit(f"{url}/review/")
    watch.visit(f"{url}/review/traces/{trace.pk}/")
    page.locator("#trace-text .t").nth(3).hover()
    assert "shortcut score" in page.locator("#token-info").inner_text()
    watch.settle()
    watch.assert_clean("the trace page after inspecting a token")
    page.context.clear_cookies()

    # Admin: jobs, runs, training, evaluations, models, Django admin.
    # Staff and superuser, as `manage.py demo_users` makes the admin (Django admin pages too).
    admin = make_user("admin", username="ada", password="csp-pass-3")
    admin.is_staff = admin.is_superuser = True
    admin.save(update_fields=["is_staff", "is_superuser"])
    running = make_job(state=JobState.RUNNING, progress_done=3, progress_total=8)
    training = make_training_run(
        job_state=JobState.SUCCEEDED, metrics=[(1.0, 0.5, 0.4), (0.8, 0.4, 0.3)]
    )
    base = make_evaluation(problems=2, samples=2, name="base")
    tuned = make_evaluation(
        samples=2, name="tuned", on_problems=[m.problem for m in base.problems.all()]
    )
    evaluated = base.problems.first().problem_id
    AccessAttempt.objects.create(
        username="someone", ip_address="10.0.0.1", user_agent="x", failures_since_start=2,
        http_accept="text/html", path_info="/accounts/login/", get_data="", post_data="",
    )  # fmt: skip
    log_in(page, live_server, "ada", "csp-pass-3")
    for path in (
        "/",
        "/jobs/",
        f"/jobs/{running.pk}/",
        "/runs/",
        f"/runs/{run.pk}/",
        "/runs/new/",
        "/models/",
        "/training/",
        "/training/new/",
        f"/training/{training.pk}/",
        "/training/adapters/",
        "/evaluations/",
        "/evaluations/new/",
        f"/evaluations/{base.pk}/",
        f"/evaluations/problems/{evaluated}/?ids={base.pk}&ids={tuned.pk}",
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
