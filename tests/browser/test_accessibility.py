"""In Chromium: axe-core checks every page type, as the role that uses it, and the suite fails on
any violation of impact "serious" or "critical"; keyboard focus is visible.

axe-core is the npm package pinned in package.json (installed by `./dev setup` with `npm ci`).
tests/settings.py serves its folder as static files under `vendor/axe-core/`, and the tests add
it with a `<script src>` from the live server: the strict CSP (script-src 'self') allows that,
while an inline `add_script_tag(content=...)` would be blocked. Nothing is fetched from outside.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from django.conf import settings

from tests.browser.conftest import log_in
from tests.browser.pages import build_site

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

AXE_FILE = Path(settings.BASE_DIR) / "node_modules" / "axe-core" / "axe.min.js"
BLOCKING = ("serious", "critical")

# axe leaves the contrast of very short text (one-character tokens on the trace page's heatmap)
# "incomplete" although it measured it: a measured ratio below the required one counts here.
RUN_AXE = """
async () => {
  const result = await axe.run(document);
  const found = result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help, helpUrl: v.helpUrl,
    targets: v.nodes.slice(0, 5).map((n) => n.target.join(" ") + " :: " + n.failureSummary),
  }));
  for (const v of result.incomplete.filter((v) => v.id === "color-contrast")) {
    const low = v.nodes.filter((n) => n.any.some((c) => c.data && c.data.contrastRatio &&
      c.data.contrastRatio < parseFloat(c.data.expectedContrastRatio)));
    if (low.length) found.push({
      id: v.id + " (short text)", impact: "serious", help: v.help, helpUrl: v.helpUrl,
      targets: low.slice(0, 5).map((n) => n.target.join(" ") + " :: " +
        n.any.map((c) => `${c.data.contrastRatio} on ${c.data.bgColor}`).join(", ")),
    });
  }
  return found;
}
"""


def axe_violations(page, live_server) -> list[dict]:
    """Serious and critical axe violations on the page as it is now."""
    if not AXE_FILE.is_file():
        pytest.fail(f"axe-core is missing ({AXE_FILE}): run `npm ci` (./dev setup does).")
    if not page.evaluate("() => typeof window.axe !== 'undefined'"):
        page.add_script_tag(url=f"{live_server.url}/static/vendor/axe-core/axe.min.js")
        page.wait_for_function("() => typeof window.axe !== 'undefined'")
    found = page.evaluate(RUN_AXE)
    return [v for v in found if v["impact"] in BLOCKING]


def describe(where: str, violations: list[dict]) -> str:
    lines = [f"{where}:"]
    for v in violations:
        lines.append(f"  [{v['impact']}] {v['id']}: {v['help']} ({v['helpUrl']})")
        lines.extend(f"      {target}" for target in v["targets"])
    return "\n".join(lines)


def visit(page, url: str, *, status: int = 200) -> None:
    response = page.goto(url)
    assert response is not None and response.status == status, (url, response.status)
    page.wait_for_load_state("networkidle")


def test_the_check_catches_a_serious_violation(page, live_server):
    """The detector itself works: an unlabelled input, an image without text, and a one-letter
    token on the trace page's old red at full strength (3.95:1 under --fg) are reported."""
    visit(page, f"{live_server.url}/accounts/login/")
    page.evaluate(
        """() => {
          const main = document.querySelector('main');
          main.insertAdjacentHTML('beforeend', '<input type="text"><img src="/static/img/favicon.svg">');
          const token = document.createElement('span');
          token.textContent = 'x';
          token.style.backgroundColor = 'rgba(214, 48, 39, 0.85)';
          main.append(token);
        }"""
    )
    ids = {v["id"] for v in axe_violations(page, live_server)}
    assert {"label", "image-alt", "color-contrast (short text)"} <= ids, ids


@pytest.mark.parametrize(
    "viewport",
    [{"width": 1366, "height": 768}, {"width": 390, "height": 844}],
    ids=["laptop", "phone"],
)
def test_every_page_type_has_no_serious_violation(page, live_server, viewport):
    page.set_viewport_size(viewport)
    url = live_server.url
    site = build_site()
    problems: list[str] = []

    def check(where: str) -> None:
        found = axe_violations(page, live_server)
        if found:
            problems.append(describe(where, found))

    for path in site.anonymous:
        visit(page, url + path)
        check(path)
    visit(page, f"{url}/no-such-page/", status=404)
    check("the 404 page")
    for role in (site.expert, site.reviewer, site.admin):
        log_in(page, live_server, role.username, role.password)
        for path in role.paths:
            visit(page, url + path)
            check(f"{path} as {role.username}")
        page.context.clear_cookies()

    # The trace page after inspecting a token (the inspector's table is filled in) and with the
    # raw-token view shown.
    log_in(page, live_server, site.reviewer.username, site.reviewer.password)
    visit(page, url + site.trace_path)
    page.locator("#trace-text .t").nth(3).hover()
    page.wait_for_function("() => document.querySelector('#token-info').innerText.length > 20")
    # The trace's scores reach both ends of the scale, so the contrast check above saw text on
    # the heatmap's strongest colours, both hues.
    strongest = page.evaluate(
        """() => [...document.querySelectorAll('#trace-text .t')].map(
             (el) => el.style.backgroundColor).filter((c) => c.endsWith(', 0.7)'))"""
    )
    assert len(set(strongest)) == 2, strongest
    check("the trace page with a token inspected")

    assert not problems, "axe found serious or critical violations:\n" + "\n\n".join(problems)


def test_no_stylesheet_hides_the_focus_outline():
    """Only <main> (focused by the skip link, not itself interactive) may drop its outline."""
    css_dir = Path(settings.BASE_DIR) / "dailweb" / "static" / "css"
    hiding = re.compile(r"([^{}]*)\{[^}]*outline:\s*(?:none|0)\b", re.IGNORECASE)
    found = [
        (sheet.name, match.group(1).strip())
        for sheet in sorted(css_dir.glob("*.css"))
        for match in hiding.finditer(re.sub(r"/\*.*?\*/", "", sheet.read_text(), flags=re.S))
    ]
    assert found == [("app.css", "main:focus")], found


def focus_outline(page) -> dict:
    return page.evaluate(
        """() => {
          const el = document.activeElement, s = getComputedStyle(el);
          return {tag: el.tagName, text: (el.innerText || el.value || '').trim().slice(0, 40),
                  style: s.outlineStyle, width: parseFloat(s.outlineWidth)};
        }"""
    )


def test_keyboard_focus_is_visible(page, live_server):
    """Tabbing through a page lands on links and buttons, and each shows a visible outline."""
    site = build_site()
    log_in(page, live_server, site.admin.username, site.admin.password)
    visit(page, f"{live_server.url}/jobs/")
    seen = set()
    for _ in range(20):  # past the navigation's links to the page's first buttons
        page.keyboard.press("Tab")
        focused = focus_outline(page)
        if focused["tag"] in ("BODY", "MAIN"):
            continue
        seen.add(focused["tag"])
        assert focused["style"] != "none" and focused["width"] >= 2, focused
    assert {"A", "BUTTON"} <= seen, seen
    page.context.clear_cookies()
    # On the trace page the text is reached by Tab, and the token moved to with the arrows is
    # marked (a ring of its own, since the token itself is not the focused element).
    log_in(page, live_server, site.reviewer.username, site.reviewer.password)
    visit(page, f"{live_server.url}{site.trace_path}")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement.id") == "trace-text":
            break
    focused = focus_outline(page)
    assert focused["style"] != "none" and focused["width"] >= 2, focused
    page.keyboard.press("ArrowRight")
    ring = page.locator("#trace-text .focus").evaluate("el => getComputedStyle(el).boxShadow")
    assert ring and ring != "none", ring
