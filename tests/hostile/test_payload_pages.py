"""Hostile text in every user-controlled field, read back from every page that shows it: the
raw HTML must show it as text and never as markup (the Chromium half is
tests/browser/test_hostile_payloads.py).

Fields covered (each holds the payload, cut to its max_length; see payload_world.py):
- curation: Dataset.name / licence / description; Problem.external_id / statement / answer /
  source / tags; SolutionVersion.body (with the payload marked as a waypoint, so the marking
  pane and s~ show it) / answer / note (two versions: the diff shows it too);
- expansion: ExpansionRun.name / adapter_path; RunProblem.answer / partial_solution;
  Trace text (the per-token JSON block and the token markup) / answer_extracted / error;
  Verdict.note; ShortcutSpan.note; Trace.claimed_by (a username);
- training: Evaluation.name / adapter_path / prompt_template / training_snapshot;
  EvaluationProblem.answer; EvaluationSample.text / answer_extracted / ruling_note;
  TrainingRun.name / base_model_path / source_runs names / snapshot_file / output_dir /
  last_checkpoint / adapter_path;
- jobs: Job.title / stage / log / error / params / result;
- users: username (and first name; not shown by the workbench) of authors, reviewers,
  launchers and of the signed-in user (header, home page);
- reflected request values: the problem list's search and author filters, the review
  queue's problem filter, the evaluation problem page's own address (the ruling form's
  `next`), an invalid problem-create form, a dataset-create message.

Pages (payload_world.global_pages / item_pages; `test_every_url_is_covered` fails when a
URL is added without being listed or excused in NOT_PAGES): home; problem list (+ htmx,
search, dataset filter), detail, edit, versions (+ diff), create (form and invalid post),
the editor preview endpoint (refresh, add waypoint, suggest), dataset create; expansion run
list (+ htmx), run detail (+ htmx), run launch form, review queue (+ htmx, filter), trace page
(ok and failed trace), verdict and span partials; evaluation list (+ htmx), detail, problem,
compare, launch form; training list (+ htmx), detail (+ htmx), launch form, adapter
registry; jobs list (+ htmx), job detail (+ htmx); models; the JSONL/CSV/JSON exports and the
metrics endpoint (never served as HTML).

Each page is requested by the least privileged role that may see it; checks are those of
`tests.hostile.html_scan.scan_html`, status 200 (400 for the invalid form), and the payload's
probe visible as text where a field is shown verbatim.
"""

from __future__ import annotations

import json

import pytest
from django.test import Client
from django.urls import resolve

from tests.hostile.html_scan import json_blocks, scan_html, visible_text
from tests.hostile.payload_world import (
    NOT_PAGES,
    ROLES,
    Page,
    build_world,
    global_pages,
    item_pages,
)
from tests.hostile.payloads import PAYLOADS, Payload

pytestmark = pytest.mark.django_db


def _usernames(payload: Payload) -> dict[str, str]:
    return {role: payload.fit(150, f"~{role}") for role in ROLES}


def _clients(world) -> dict[str, Client]:
    clients = {}
    for role, user in world.users.items():
        clients[role] = Client()
        clients[role].force_login(user)
    return clients


def _request(client: Client, page: Page):
    headers = {"HTTP_HX_REQUEST": "true"} if page.htmx else {}
    if page.method == "post":
        return client.post(page.url, page.data or {}, follow=page.follow, **headers)
    return client.get(page.url, follow=page.follow, **headers)


def check_page(client: Client, page: Page, payloads) -> list[str]:
    """Findings for one request (empty: the page is clean)."""
    try:
        response = _request(client, page)
    except Exception as exc:  # a crash is a finding; the test names the page
        return [f"raised {type(exc).__name__}: {exc}"[:300]]
    if response.status_code != page.status:
        return [f"status {response.status_code}, expected {page.status}"]
    content_type = response.get("Content-Type", "")
    if page.download:
        return [] if "html" not in content_type else [f"download served as {content_type}"]
    if "text/html" not in content_type:
        return [f"served as {content_type!r}"]
    html = response.content.decode()
    findings = scan_html(html, payloads)
    text = visible_text(html)
    findings += [f"does not show {probe!r} as text" for probe in page.shows if probe not in text]
    blocks = {attributes.get("id"): content for attributes, content in json_blocks(html)}
    for block_id, probe in page.json_shows:
        if block_id not in blocks:
            findings.append(f"no JSON block #{block_id}")
        elif probe not in "".join(_strings(_json_or_none(blocks[block_id]))):
            findings.append(f"JSON block #{block_id} does not hold {probe!r}")
    return findings


def _json_or_none(content: str):
    try:
        return json.loads(content)
    except ValueError:
        return None  # scan_html reports it


def _strings(value):
    """Every string in a decoded JSON document, in document order."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


@pytest.mark.parametrize("payload", PAYLOADS, ids=str)
def test_payload_is_shown_as_text_on_every_page(payload):
    world = build_world([payload], _usernames(payload))
    clients = _clients(world)
    pages = global_pages(world) + item_pages(world.items[0])
    # The signed-in users' names are the payload too: every role's home page shows them.
    pages += [Page(f"home as {role}", "/", (role,), shows=(payload.probe,)) for role in ROLES]
    failures = {}
    for page in pages:
        role = page.roles[0]
        findings = check_page(clients[role], page, [payload])
        if findings:
            failures[f"{page.name} ({page.method.upper()} {page.url[:80]} as {role})"] = findings
    assert not failures, "\n".join(
        f"{where}:\n  " + "\n  ".join(findings) for where, findings in failures.items()
    )


def test_scan_finds_what_it_is_meant_to_find():
    """The checker itself: each kind of injection is reported (so a clean page means clean)."""
    from tests.hostile.payloads import BY_NAME

    clean = (
        '<p>&lt;script&gt;alert(1)&lt;/script&gt;</p><script src="/static/a.js"></script>'
        '<script id="d" type="application/json">{"t": "\\u003C/script\\u003E"}</script>'
    )
    assert scan_html(clean, PAYLOADS) == []
    dirty = {
        "<p><script>alert(1)</script></p>": "inline script",
        '<img src=x onerror="alert(1)">': "event handler",
        '<a href=" jav&#x09;ascript:alert(1)">x</a>': "script URL",
        '<span class="mord dailpwn">x</span>': "payload marker",
        '<span style="background:url(javascript:alert(1))">x</span>': "payload style",
        '<img src="<span class="katex">">': "malformed attribute",
        '<script type="application/json">{"a": "</script><script>alert(1)</script>': "inline script",
        '<script type="application/json">{"a": "<!--"}</script>': "contains '<'",
        '<iframe src="/"></iframe>': "<iframe>",
        "<svg onload=alert(1)>": "raw '<svg onload'",
    }
    for html, expected in dirty.items():
        findings = " | ".join(scan_html(html, [BY_NAME["svg_onload"]]))
        assert expected in findings, (html, findings)


def test_every_url_is_covered():
    """A page added later must be listed in payload_world (or excused in NOT_PAGES)."""
    from tests.web.test_role_matrix import routed_views

    world = build_world([PAYLOADS[0]], _usernames(PAYLOADS[0]))
    covered = {
        resolve(page.url.split("?")[0]).view_name
        for page in global_pages(world) + item_pages(world.items[0])
    }
    missing = sorted(
        name for name, _pattern in routed_views() if name not in covered | set(NOT_PAGES)
    )
    assert not missing, f"pages the hostile-payload suites do not request: {missing}"
