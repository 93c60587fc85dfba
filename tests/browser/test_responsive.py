"""Issue 16.2 and 16.3 in Chromium, at a phone's width (390x844) and a laptop's (1366x768):
no page is wider than the window, every menu item (log out included) can be reached, the
trace page stacks its columns on a phone, and inspecting tokens never moves Accept/Reject."""

from __future__ import annotations

import pytest

from tests.browser.conftest import log_in
from tests.browser.pages import build_site

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PHONE = {"width": 390, "height": 844}
LAPTOP = {"width": 1366, "height": 768}

# The widest element (after the page itself) names the culprit when a page is too wide.
OVERFLOW = """
() => {
  const width = window.innerWidth;
  let culprit = null;
  for (const el of document.querySelectorAll("body *")) {
    const box = el.getBoundingClientRect();
    if (box.width && box.right > width + 1 && !el.closest(".menu-body") ) {
      let parent = el.parentElement, clipped = false;
      while (parent) {
        const style = getComputedStyle(parent);
        if (style.overflowX !== "visible" && parent.getBoundingClientRect().right <= width + 1) { clipped = true; break; }
        parent = parent.parentElement;
      }
      if (!clipped) { culprit = `${el.tagName.toLowerCase()}.${el.className} (right ${Math.round(box.right)})`; break; }
    }
  }
  return {scroll: document.documentElement.scrollWidth, inner: width, culprit};
}
"""


def too_wide(page) -> str | None:
    found = page.evaluate(OVERFLOW)
    if found["scroll"] <= found["inner"]:
        return None
    return f"{found['scroll']} px wide in {found['inner']} px: {found['culprit']}"


def visit(page, url: str) -> None:
    response = page.goto(url)
    assert response is not None and response.status == 200, (url, response and response.status)
    page.wait_for_load_state("networkidle")


def open_menu(page) -> None:
    """Open the top menu where it is collapsed (its summary shows only then)."""
    toggle = page.locator(".site-menu > summary")
    if toggle.is_visible():
        toggle.click()


def assert_menu_reachable(page, where: str) -> None:
    """Every item of the top menu and Log out: visible, inside the window, clickable."""
    open_menu(page)
    width = page.evaluate("() => window.innerWidth")
    items = page.locator("nav[aria-label='Main'] a").all() + [
        page.get_by_role("button", name="Log out")
    ]
    assert len(items) >= 2, where
    for item in items:
        assert item.is_visible(), (where, item.inner_text())
        item.scroll_into_view_if_needed()
        box = item.bounding_box()
        assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (where, item, box)
        # Nothing covers it: the element at its centre is the item itself (or inside it).
        hit = page.evaluate(
            "([x, y]) => document.elementFromPoint(x, y)?.closest('a, button')?.textContent",
            [box["x"] + box["width"] / 2, box["y"] + box["height"] / 2],
        )
        assert hit and hit.strip() == item.inner_text().strip(), (where, hit, item.inner_text())


@pytest.mark.parametrize("viewport", [PHONE, LAPTOP], ids=["390x844", "1366x768"])
def test_every_page_fits_the_window_and_its_menu_is_reachable(browser, live_server, viewport):
    site = build_site()
    context = browser.new_context(viewport=viewport)
    context.set_default_timeout(15_000)
    page = context.new_page()
    problems = []
    for path in site.anonymous:
        visit(page, live_server.url + path)
        if reason := too_wide(page):
            problems.append(f"anonymous {path}: {reason}")
    for role in (site.expert, site.reviewer, site.admin):
        log_in(page, live_server, role.username, role.password)
        for path in role.paths:
            visit(page, live_server.url + path)
            if reason := too_wide(page):
                problems.append(f"{role.username} {path}: {reason}")
        assert_menu_reachable(page, f"{role.username} at {viewport['width']} px")
        page.get_by_role("button", name="Log out").click()
        page.wait_for_load_state("networkidle")
        assert page.get_by_label("Username").is_visible() or "login" in page.url
    context.close()
    assert not problems, "\n".join(problems)


def test_the_menu_is_collapsed_on_a_phone_and_open_on_a_laptop(browser, live_server):
    site = build_site()
    for viewport, collapsed in ((PHONE, True), (LAPTOP, False)):
        context = browser.new_context(viewport=viewport)
        page = context.new_page()
        log_in(page, live_server, site.admin.username, site.admin.password)
        runs = page.locator("nav[aria-label='Main']").get_by_role("link", name="Runs")
        assert runs.is_visible() is not collapsed, viewport
        assert page.locator(".site-menu > summary").is_visible() is collapsed, viewport
        if collapsed:
            page.locator(".site-menu > summary").click()
            assert runs.is_visible()
        runs.click()
        page.wait_for_url("**/runs/")
        context.close()


def test_the_trace_page_stacks_on_a_phone(browser, live_server):
    site = build_site()
    context = browser.new_context(viewport=PHONE)
    page = context.new_page()
    log_in(page, live_server, site.reviewer.username, site.reviewer.password)
    visit(page, live_server.url + site.trace_path)
    text = page.locator("#trace-text").bounding_box()
    side = page.locator(".trace-side").bounding_box()
    assert side["y"] >= text["y"] + text["height"] - 1, (text, side)  # below, not beside
    assert text["width"] >= 300 and side["width"] >= 300, (text, side)
    assert too_wide(page) is None
    context.close()


def test_inspecting_tokens_never_moves_accept_on_a_laptop(browser, live_server):
    """Issue 16.3: the inspector's space is reserved, so Accept stays where it was (and in the
    window at 1366x768) while the reviewer hovers tokens, short and long."""
    site = build_site()
    context = browser.new_context(viewport=LAPTOP)
    page = context.new_page()
    log_in(page, live_server, site.reviewer.username, site.reviewer.password)
    visit(page, live_server.url + site.trace_path)
    accept = page.get_by_role("button", name="Accept")
    before = accept.bounding_box()
    assert before and before["y"] + before["height"] <= LAPTOP["height"], before
    tokens = page.locator("#trace-text .t")
    for index in (0, 3, tokens.count() // 2, tokens.count() - 1):
        tokens.nth(index).hover()
        assert "shortcut score" in page.locator("#token-info").inner_text()
        assert accept.bounding_box() == before, index
    page.keyboard.press("j")  # the keyboard inspects too
    assert accept.bounding_box() == before
    context.close()
