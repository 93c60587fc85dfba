"""The Content-Security-Policy header, and pages that need nothing it forbids (fast, no browser;
tests/browser/test_csp.py runs the pages in Chromium).

Every GET page of the URLconf is rendered as a superuser and parsed: no inline style (neither
`style=""` nor `<style>`), no inline script except JSON data blocks, no event-handler
attributes, no `javascript:` links."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest
from django.test import Client
from django.urls import reverse

from tests.factories import make_problem, make_user
from tests.web.test_role_matrix import URL_KWARGS, _url, routed_views

pytestmark = pytest.mark.django_db


def directives(header: str) -> dict[str, list[str]]:
    return {part.split()[0]: part.split()[1:] for part in header.split(";") if part.strip()}


def assert_strict(response) -> None:
    header = response.headers.get("Content-Security-Policy")
    assert header, f"no CSP header on {response.request['PATH_INFO']}"
    assert "'unsafe-inline'" not in header and "'unsafe-eval'" not in header
    policy = directives(header)
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["object-src"] == ["'none'"]
    assert policy["base-uri"] == ["'self'"]
    assert policy["form-action"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]


class InlineCode(HTMLParser):
    """Finds what a strict CSP would block in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []
        self._script_src: bool | None = None

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        for name, value in attrs:
            if name == "style":
                self.found.append(f"<{tag} style={value!r}>")
            if name.startswith("on"):
                self.found.append(f"<{tag} {name}=…>")
            if name in {"href", "src", "action"} and (value or "").strip().lower().startswith(
                "javascript:"
            ):
                self.found.append(f"<{tag} {name}={value!r}>")
        if tag == "style":
            self.found.append("<style> block")
        if tag == "script":
            data_block = values.get("type") == "application/json"
            self._script_src = bool(values.get("src")) or data_block

    def handle_data(self, data):
        if self._script_src is False and data.strip():
            self.found.append(f"inline <script>: {data.strip()[:60]!r}")

    def handle_endtag(self, tag):
        if tag == "script":
            self._script_src = None


def inline_code(html: str) -> list[str]:
    parser = InlineCode()
    parser.feed(html)
    return parser.found


def test_the_parser_finds_inline_code():
    found = inline_code(
        '<p style="color:red">x</p><style>p{}</style><script>alert(1)</script>'
        '<a href="javascript:void(0)" onclick="x()">y</a>'
        '<script src="/s.js"></script><script type="application/json">{"a": 1}</script>'
    )
    assert len(found) == 5, found


def test_login_page_sends_a_strict_policy(client):
    assert_strict(client.get(reverse("login")))


def test_error_and_admin_pages_send_it_too(client):
    assert_strict(client.get("/no-such-page/"))
    client.force_login(make_user("expert"))
    assert_strict(client.get(reverse("jobs:list")))  # 403
    assert_strict(client.get("/admin/login/"))


def test_every_page_renders_without_inline_script_or_style(settings, tmp_path):
    # As if KaTeX's CSS were installed (`./dev setup`): math must still come without styles.
    settings.KATEX_DIST_DIR = tmp_path
    user = make_user("admin", username="root")
    user.is_staff = user.is_superuser = True
    user.save()
    client = Client()
    client.force_login(user)
    problem = make_problem(
        author=user,
        statement="Let $f(x) = \\frac{1}{\\sqrt{x}}$ and $$\\sum_{k=1}^n k^2$$",
        solution="So $\\binom{n}{2} = \\frac{n(n-1)}{2}$ and the answer is $\\boxed{3}$.",
    )
    pages = [
        reverse("curation:detail", kwargs={"problem_id": problem.pk}),
        reverse("curation:edit", kwargs={"problem_id": problem.pk}),
        "/admin/",
        "/admin/axes/accessattempt/",
        f"/admin/auth/user/{user.pk}/change/",
    ]
    for name, pattern in routed_views():
        if pattern.pattern.converters and name not in URL_KWARGS:
            continue  # test_role_matrix fails for it, asking for its URL_KWARGS entry
        pages.append(_url(name, pattern, user))
    checked = 0
    for url in pages:
        response = client.get(url)
        if response.status_code != 200 or "text/html" not in response.get("Content-Type", ""):
            continue
        assert_strict(response)
        found = inline_code(response.content.decode())
        assert not found, f"{url}: {found}"
        checked += 1
    assert checked >= 25, checked
