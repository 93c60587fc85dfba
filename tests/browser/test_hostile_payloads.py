"""In Chromium: hostile text in every user-controlled field (tests/hostile/payloads.py, the
data set of tests/hostile/payload_world.py) never runs, on every page that shows it, with the
pages' own scripts working on it (the trace inspector, the live preview, the charts, htmx
polling). The raw-HTML half, with the list of fields and pages, is
tests/hostile/test_payload_pages.py.

One data set holds every payload (one problem, run, traces, evaluations, training run and
jobs per payload); one browser session per role loads each page once, as the least
privileged role that may see it. Before any page script runs, `alert`, `confirm` and
`prompt` are replaced by functions that set `window.__pwned`, which every payload's script
sets too. After each page: the sentinel is unset, no native dialog opened, no uncaught page
error, no POST the test did not make, and the live DOM has no event-handler attribute, no
`javascript:`/`data:` link or source, no frame/object/base element and no `dailpwn` marker
(what KaTeX's \\htmlClass/\\htmlId/\\htmlData would inject with trust on).
On the trace page every token is hovered in both views (the inspector writes HTML); on the
problem-create page every payload is typed into the solution (the htmx live preview swaps
the server's rendering in).
"""

from __future__ import annotations

import pytest
from django.conf import settings
from django.test import Client

from tests.hostile.payload_world import build_world, global_pages, item_pages
from tests.hostile.payloads import PAYLOADS, SENTINEL

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

# Signed-in users' names (NFKC-stable, so they also survive a login form).
USERNAMES = {
    "expert": '"><img src=x onerror=alert("user_expert")>',
    "reviewer": "{{ 7*7 }}{% debug %}</textarea><svg onload=alert(1)>",
    "admin": '<script>alert("user_admin")</script>',
}

INIT_SCRIPT = f"""
(() => {{
  window.{SENTINEL} = null;
  const flag = (how) => function (message) {{
    window.{SENTINEL} = window.{SENTINEL} || (how + ": " + String(message));
    return how === "confirm" ? false : null;
  }};
  window.alert = flag("alert");
  window.confirm = flag("confirm");
  window.prompt = flag("prompt");
}})();
"""

# Injected markup the live DOM must not hold (after the page's own scripts ran).
DOM_CHECK = """
() => {
  const bad = [];
  const describe = (el) => "<" + el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") + ">";
  for (const el of document.querySelectorAll("*")) {
    if (["IFRAME", "FRAME", "OBJECT", "EMBED", "BASE", "APPLET"].includes(el.tagName)) {
      bad.push(describe(el) + " element");
    }
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      const value = attr.value.replace(/[\\u0000-\\u0020\\u007f-\\u009f]/g, "").toLowerCase();
      if (name.startsWith("on")) bad.push(describe(el) + " " + name + "=" + attr.value.slice(0, 60));
      if (name.includes("dailpwn")) bad.push(describe(el) + " attribute " + name);
      if (["href", "src", "action", "formaction", "xlink:href", "data", "poster"].includes(name)
          && /^(javascript|vbscript|data):/.test(value)) {
        bad.push(describe(el) + " " + name + "=" + attr.value.slice(0, 60));
      }
      if (name === "hx-trigger" && /\\bload\\b/.test(value)) bad.push(describe(el) + " hx-trigger=load");
    }
    if ((el.id || "").includes("dailpwn")) bad.push(describe(el) + " id marker");
    const cls = typeof el.className === "string" ? el.className : (el.getAttribute("class") || "");
    if (cls.includes("dailpwn")) bad.push(describe(el) + " class marker");
  }
  for (const link of document.querySelectorAll("a[href], area[href]")) {
    if (link.protocol === "javascript:") bad.push("javascript: link " + link.outerHTML.slice(0, 80));
  }
  return bad;
}
"""

HOVER_TOKENS = """
(selector) => {
  let count = 0;
  for (const el of document.querySelectorAll(selector)) {
    el.dispatchEvent(new MouseEvent("mouseover", {bubbles: true}));
    count += 1;
  }
  return count;
}
"""


class Session:
    """One role's browser context: signed in by session cookie, with the traps installed."""

    def __init__(self, browser, live_server, user) -> None:
        client = Client()
        client.force_login(user)
        self.live_server = live_server
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.context.set_default_timeout(20_000)
        self.context.add_cookies([
            {"name": settings.SESSION_COOKIE_NAME,
             "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
             "url": live_server.url},
        ])  # fmt: skip
        self.context.add_init_script(INIT_SCRIPT)
        self.page = self.context.new_page()
        self.events: list[str] = []
        self.allowed_posts: tuple[str, ...] = ()
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda error: self.events.append(f"page error: {error}"))
        self.page.on("request", self._request)

    def _dialog(self, dialog) -> None:
        self.events.append(f"native {dialog.type} dialog: {dialog.message[:80]}")
        dialog.dismiss()

    def _request(self, request) -> None:
        if request.method != "GET" and not any(p in request.url for p in self.allowed_posts):
            self.events.append(f"unexpected {request.method} {request.url}")

    def visit(self, url: str) -> list[str]:
        self.events = []
        response = self.page.goto(self.live_server.url + url, wait_until="load")
        if response is None or response.status != 200:
            self.events.append(f"status {response.status if response else 'none'}")
        return self.findings()

    def findings(self) -> list[str]:
        found = list(self.events)
        pwned = self.page.evaluate(f"window.{SENTINEL}")
        if pwned:
            found.append(f"payload executed: {pwned}")
        found += self.page.evaluate(DOM_CHECK)
        return found

    def check_traps(self) -> None:
        """The traps are installed before page scripts (else a clean run proves nothing)."""
        page = self.page
        assert page.evaluate(f"window.{SENTINEL} === null"), "the init script did not run"
        assert page.evaluate(f"alert('trap'), window.{SENTINEL}") == "alert: trap"
        page.evaluate(f"window.{SENTINEL} = null")

    def wait_for_poll(self, path: str) -> None:
        """Let htmx poll once and swap the partial (with the payloads) into the page."""
        with self.page.expect_response(
            lambda r: path in r.url and r.request.headers.get("hx-request") == "true",
            timeout=10_000,
        ):
            pass

    def close(self) -> None:
        self.context.close()


def _trace_interactions(session: Session) -> list[str]:
    """Hover every token in both views: trace.js writes each token into the inspector."""
    page = session.page
    hovered = page.evaluate(HOVER_TOKENS, "#trace-text .t, #trace-text .tm")
    assert hovered > 0, "the trace page shows no tokens"
    page.locator("#raw-toggle").check()
    page.evaluate(HOVER_TOKENS, "#trace-raw [data-i]")
    assert page.locator("#token-info code").count() > 0, "the inspector showed nothing"
    return session.findings()


def _type_into_editor(session: Session, texts) -> dict[str, list[str]]:
    """Type each text as a new problem's solution; the live preview renders it."""
    page = session.page
    session.allowed_posts = ("/problems/editor/preview/",)
    failures = {}
    for name, text in texts:
        session.events = []
        with page.expect_response(lambda r: "/problems/editor/preview/" in r.url) as answer:
            page.locator("#id_body").fill(text)
        if answer.value.status != 200:
            session.events.append(f"preview status {answer.value.status}")
        page.wait_for_load_state("load")
        findings = session.findings()
        if findings:
            failures[f"live preview of {name}"] = findings
    session.allowed_posts = ()
    return failures


def test_no_payload_runs_in_chromium(browser, live_server):
    world = build_world(PAYLOADS, USERNAMES)
    pages = [
        page
        for page in global_pages(world) + [p for item in world.items for p in item_pages(item)]
        if page.method == "get" and not page.htmx and not page.download and page.browser
    ]
    sessions = {role: Session(browser, live_server, user) for role, user in world.users.items()}
    failures: dict[str, list[str]] = {}
    visited = 0
    try:
        for role, session in sessions.items():
            if findings := session.visit("/"):
                failures[f"home as {role}"] = findings
            session.check_traps()
        for page in pages:
            role = page.roles[0]
            session = sessions[role]
            where = f"{page.name} {page.url[:60]} as {role}"
            findings = session.visit(page.url)
            visited += 1
            if not findings and page.name in ("trace", "failed trace"):
                findings = _trace_interactions(session)
            if not findings and page.name == "jobs":  # a job runs: the table polls
                session.wait_for_poll("/jobs/")
                findings = session.findings()
            if findings:
                failures[where] = findings
        session = sessions["expert"]
        session.visit("/problems/new/")
        failures.update(_type_into_editor(session, [(p.name, p.text) for p in PAYLOADS]))
    finally:
        for session in sessions.values():
            session.close()
    assert visited >= len(PAYLOADS) * 8, visited
    assert not failures, "\n".join(
        f"{where}:\n  " + "\n  ".join(findings) for where, findings in failures.items()
    )
