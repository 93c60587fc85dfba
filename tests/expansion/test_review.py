"""The reviewer's work: queue, claiming, verdicts with history and conflicts, shortcut spans,
the trace page and its query budget."""

from __future__ import annotations

import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from dailweb.errors import ConflictError, DomainError
from expansion.models import ReviewState, Trace, Verdict
from expansion.services import review
from tests.factories import bulk_traces, make_run, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def reviewer(client):
    user = make_user("reviewer", username="rita")
    client.force_login(user)
    return user


def test_next_unreviewed_hands_two_reviewers_different_traces():
    run = make_run(problems=2, samples=2)
    first, second = make_user("reviewer"), make_user("reviewer")
    a = review.trace_claim_next(reviewer=first, run_id=run.pk)
    b = review.trace_claim_next(reviewer=second, run_id=run.pk)
    assert a is not None and b is not None and a.pk != b.pk
    assert review.trace_claim_next(reviewer=first, run_id=run.pk).pk == a.pk  # keeps its own


def test_verdicts_keep_history_and_latest_state():
    run = make_run(problems=1, samples=1)
    trace = run.traces.get()
    rita, sam = make_user("reviewer"), make_user("reviewer")
    review.verdict_record(trace_id=trace.pk, reviewer=rita, decision="accepted", base_revision=0)
    review.verdict_record(
        trace_id=trace.pk, reviewer=sam, decision="rejected", note="skips a step", base_revision=1
    )
    trace.refresh_from_db()
    assert trace.review_state == ReviewState.REJECTED and trace.revision == 2
    assert list(Verdict.objects.filter(trace=trace).values_list("decision", flat=True)) == [
        "rejected",
        "accepted",
    ]


def test_concurrent_verdict_is_refused_with_who_decided_and_nothing_lost():
    run = make_run(problems=1, samples=1)
    trace = run.traces.get()
    rita, sam = make_user("reviewer", username="rita2"), make_user("reviewer")
    review.verdict_record(trace_id=trace.pk, reviewer=rita, decision="accepted", base_revision=0)
    with pytest.raises(ConflictError, match="rita2 marked it accepted"):
        review.verdict_record(trace_id=trace.pk, reviewer=sam, decision="rejected", base_revision=0)
    assert Verdict.objects.filter(trace=trace).count() == 1
    review.verdict_record(trace_id=trace.pk, reviewer=sam, decision="rejected", base_revision=1)
    assert Verdict.objects.filter(trace=trace).count() == 2


def test_shortcut_spans_validate_range_and_overlap():
    run = make_run(problems=1, samples=1, tokens=20)
    trace = run.traces.get()
    user = make_user("reviewer")
    review.shortcut_span_add(
        trace_id=trace.pk, reviewer=user, start_token=2, end_token=5, note="jumps", tokens=20
    )
    with pytest.raises(DomainError, match="overlaps"):
        review.shortcut_span_add(
            trace_id=trace.pk, reviewer=user, start_token=4, end_token=8, tokens=20
        )
    with pytest.raises(DomainError, match="within the trace's 20 tokens"):
        review.shortcut_span_add(
            trace_id=trace.pk, reviewer=user, start_token=18, end_token=25, tokens=20
        )


def test_trace_page_for_2048_tokens_stays_within_15_queries_and_1_5_mb(client, reviewer):
    run = make_run(problems=1, samples=2, tokens=2048)
    trace = run.traces.first()
    review.verdict_record(
        trace_id=trace.pk, reviewer=make_user("reviewer"), decision="accepted", base_revision=0
    )
    review.shortcut_span_add(
        trace_id=trace.pk, reviewer=reviewer, start_token=1, end_token=4, tokens=2048
    )
    with CaptureQueriesContext(connection) as queries:
        response = client.get(reverse("expansion:trace", args=[trace.pk]))
    assert response.status_code == 200
    assert len(queries) <= 15, [q["sql"][:120] for q in queries]
    assert len(response.content) < 1.5 * 1024 * 1024
    html = response.content.decode()
    assert 'id="trace-data"' in html and 'data-i="2047"' in html


def test_queue_queries_do_not_grow_with_page_size_or_number(client, reviewer, monkeypatch):
    run = make_run(problems=3, samples=2, tokens=4)
    bulk_traces(run, 100_000)
    assert Trace.objects.count() > 100_000
    url = reverse("expansion:queue")

    def count(path):
        with CaptureQueriesContext(connection) as queries:
            assert client.get(path).status_code == 200
        return len(queries)

    first = count(url)
    assert count(url + "?page=2") == first
    assert count(url + "?page=1500") == first
    assert count(url + f"?run={run.pk}&sort=fallback&correct=yes&page=1") == first
    import expansion.views

    monkeypatch.setattr(expansion.views, "TRACES_PER_PAGE", 100)
    assert count(url) == first


def test_verdict_through_the_page_and_conflict_message(client, reviewer):
    run = make_run(problems=1, samples=1)
    trace = run.traces.get()
    url = reverse("expansion:verdict", args=[trace.pk])
    response = client.post(
        url, {"decision": "accepted", "note": "fine", "base_revision": 0}, HTTP_HX_REQUEST="true"
    )
    assert response.status_code == 200 and "Accepted" in response.content.decode()
    stale = client.post(url, {"decision": "rejected", "base_revision": 0}, HTTP_HX_REQUEST="true")
    assert stale.status_code == 409
    assert "rita marked it accepted" in stale.content.decode()
    assert Trace.objects.get(pk=trace.pk).review_state == ReviewState.ACCEPTED


def test_accept_then_next_redirects_to_the_next_unreviewed(client, reviewer):
    run = make_run(problems=1, samples=3)
    first = review.trace_claim_next(reviewer=reviewer, run_id=run.pk)
    response = client.post(
        reverse("expansion:verdict", args=[first.pk]),
        {"decision": "accepted", "base_revision": 0, "then": "next"},
    )
    assert response.status_code == 302
    follow = client.get(response["Location"])
    assert follow.status_code == 302
    next_id = int(follow["Location"].rstrip("/").rsplit("/", 1)[1])
    assert next_id != first.pk
    assert Trace.objects.get(pk=next_id).review_state == ReviewState.UNREVIEWED


def test_expert_cannot_review(client):
    client.force_login(make_user("expert"))
    run = make_run(problems=1, samples=1)
    trace = run.traces.get()
    assert client.get(reverse("expansion:trace", args=[trace.pk])).status_code == 403
    assert (
        client.post(
            reverse("expansion:verdict", args=[trace.pk]),
            {"decision": "accepted", "base_revision": 0},
        ).status_code
        == 403
    )
    assert not Verdict.objects.exists()


def test_export_of_reviewed_traces_loads_with_datasets(client, reviewer, tmp_path):
    import json

    import datasets

    run = make_run(problems=2, samples=2, tokens=16)
    traces = list(run.traces.order_by("pk"))
    review.verdict_record(
        trace_id=traces[0].pk, reviewer=reviewer, decision="accepted", base_revision=0
    )
    review.verdict_record(
        trace_id=traces[1].pk, reviewer=reviewer, decision="rejected", base_revision=0
    )
    review.shortcut_span_add(
        trace_id=traces[0].pk, reviewer=reviewer, start_token=3, end_token=6, note="jump", tokens=16
    )

    response = client.get(reverse("expansion:export") + f"?run={run.pk}&format=jsonl")
    lines = b"".join(response.streaming_content).decode().splitlines()
    assert len(lines) == 1  # accepted only by default; rejected traces never go to training
    record = json.loads(lines[0])
    assert record["trace_id"] == traces[0].pk
    assert (
        len(record["token_ids"])
        == len(record["char_starts"])
        == len(record["privileged_logprobs"])
        == 16
    )
    assert record["char_ends"][-1] == len(record["text"])
    assert record["shortcut_spans"] == [
        {"start_token": 3, "end_token": 6, "note": "jump", "reviewer": "rita"}
    ]
    assert record["verdicts"][0]["decision"] == "accepted"

    response = client.get(
        reverse("expansion:export") + f"?run={run.pk}&state=accepted&state=rejected&format=parquet"
    )
    path = tmp_path / "x.parquet"
    path.write_bytes(b"".join(response.streaming_content))
    loaded = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert loaded.num_rows == 2
    assert sorted(loaded["review_state"]) == ["accepted", "rejected"]


# --- Accepting a trace whose answer is wrong, missing or cut off needs a confirmation --------


def _trace(**fields) -> Trace:
    run = make_run(problems=1, samples=1)
    trace = run.traces.get()
    Trace.objects.filter(pk=trace.pk).update(**fields)
    return Trace.objects.get(pk=trace.pk)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"answer_correct": False, "answer_extracted": "7"}, "its final answer 7 is wrong"),
        ({"answer_correct": False, "answer_extracted": ""}, "no final \\boxed{} answer"),
        ({"finish_reason": "length"}, "cut off at the token limit"),
        ({"finish_reason": "error"}, "the trace failed"),
    ],
)
def test_accepting_a_questionable_trace_needs_an_explicit_confirmation(fields, reason):
    trace = _trace(**fields)
    rita = make_user("reviewer")
    with pytest.raises(DomainError, match="Accept anyway") as refused:
        review.verdict_record(trace_id=trace.pk, reviewer=rita, decision="accepted")
    assert reason in refused.value.message
    assert "confirm_incorrect" in refused.value.field_errors
    assert not Verdict.objects.exists()
    # Rejecting needs no confirmation; accepting with the flag records the verdict.
    review.verdict_record(trace_id=trace.pk, reviewer=rita, decision="rejected", base_revision=0)
    review.verdict_record(
        trace_id=trace.pk, reviewer=rita, decision="accepted", confirm_incorrect=True
    )
    assert Trace.objects.get(pk=trace.pk).review_state == ReviewState.ACCEPTED


def test_correct_and_ungraded_reasoning_traces_accept_without_a_question():
    rita = make_user("reviewer")
    correct = _trace(answer_correct=True)
    review.verdict_record(trace_id=correct.pk, reviewer=rita, decision="accepted")
    # A reasoning trace: not graded, cut at its thinking budget by design.
    thinking = _trace(answer_correct=None, finish_reason="length")
    thinking.run.reasoning = True
    thinking.run.save(update_fields=["reasoning"])
    review.verdict_record(trace_id=thinking.pk, reviewer=rita, decision="accepted")
    assert Verdict.objects.filter(decision="accepted").count() == 2


def test_the_trace_page_asks_first_and_the_view_requires_the_flag(client, reviewer):
    trace = _trace(answer_correct=False, answer_extracted="7")
    page = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    assert 'data-testid="accept-confirm"' in page and "its final answer 7 is wrong" in page
    url = reverse("expansion:verdict", args=[trace.pk])
    refused = client.post(url, {"decision": "accepted", "base_revision": 0}, HTTP_HX_REQUEST="true")
    assert refused.status_code == 400
    panel = refused.content.decode()
    assert 'data-testid="accept-confirm" hidden' not in panel  # now open, with the checkbox
    assert 'name="confirm_incorrect"' in panel
    assert Trace.objects.get(pk=trace.pk).review_state == ReviewState.UNREVIEWED
    client.post(url, {"decision": "accepted", "base_revision": 0, "confirm_incorrect": "1"})
    assert Trace.objects.get(pk=trace.pk).review_state == ReviewState.ACCEPTED


# --- Shortcut spans: only the author or an admin deletes; deletion keeps history ------------


def test_only_the_author_or_an_admin_deletes_a_span_and_the_history_stays(client, reviewer):
    from dailweb.errors import ForbiddenError
    from expansion.models import ShortcutSpan
    from expansion.services import export

    run = make_run(problems=1, samples=1, tokens=16)
    trace = run.traces.get()
    mine = review.shortcut_span_add(
        trace_id=trace.pk, reviewer=reviewer, start_token=2, end_token=5, note="jump", tokens=16
    )
    sam = make_user("reviewer", username="sam")
    theirs = review.shortcut_span_add(
        trace_id=trace.pk, reviewer=sam, start_token=8, end_token=10, tokens=16
    )
    # Another reviewer may not delete it: neither through the service nor the page.
    with pytest.raises(ForbiddenError, match="Only rita, who marked this span, or an admin"):
        review.shortcut_span_delete(span_id=mine.pk, reviewer=sam)
    response = client.post(reverse("expansion:span_delete", args=[trace.pk, theirs.pk]))
    assert response.status_code == 403
    assert "Only sam, who marked this span, or an admin" in response.content.decode()
    page = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    assert page.count('aria-label="Delete span') == 1  # no button on sam's span
    assert set(trace.shortcut_spans.values_list("pk", flat=True)) == {mine.pk, theirs.pk}

    # The author deletes theirs; an admin deletes anyone's.
    response = client.post(reverse("expansion:span_delete", args=[trace.pk, mine.pk]))
    assert response.status_code == 302
    admin = make_user("admin", username="ada")
    review.shortcut_span_delete(span_id=theirs.pk, reviewer=admin)
    assert not trace.shortcut_spans.exists()  # live readers no longer see them
    history = ShortcutSpan.all_objects.filter(trace=trace).order_by("pk")
    assert [(s.deleted_by.username, s.deleted_at is not None) for s in history] == [
        ("rita", True),
        ("ada", True),
    ]
    # The page lists them as history; exports (what training reads) leave them out.
    page = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    # Listed with the text the tokens cover (issue 16: not only "tokens 2–4").
    assert re.search(
        r'tokens 2–4 <q class="span-text">[^<]+</q> marked by rita \(jump\), deleted by rita', page
    )
    assert re.search(
        r'tokens 8–9 <q class="span-text">[^<]+</q> marked by sam, deleted by ada', page
    )
    review.verdict_record(trace_id=trace.pk, reviewer=reviewer, decision="accepted")
    traces = export.reviewed_traces(run_ids=[run.pk], states=["accepted"])
    assert [record["shortcut_spans"] for record in export.iter_records(traces)] == [[]]
    # The tokens may be marked again; deleting twice is refused, not a crash.
    review.shortcut_span_add(
        trace_id=trace.pk, reviewer=reviewer, start_token=2, end_token=5, tokens=16
    )
    assert (
        client.post(reverse("expansion:span_delete", args=[trace.pk, mine.pk])).status_code == 404
    )


# --- The what-if box starts with the waypoints that made s~ ---------------------------------


def _run_with_waypoints(body: str, marks: list[str]):
    """A run whose problem's pinned version has `marks` as waypoints and whose s~ was built
    from them (as the launch does)."""
    from curation.services.problems import waypoints_save
    from curation.services.suggestions import partial_solution_text
    from curation.spans import Span

    run = make_run(problems=1, samples=1, tokens=8)
    run_problem = run.run_problems.get()
    version = run_problem.solution_version
    version.body = body
    version.save(update_fields=["body"])
    spans = [Span(body.index(m), body.index(m) + len(m)) for m in marks]
    waypoints_save(version=version, spans=spans)
    run_problem.partial_solution = partial_solution_text(body=body, answer="3", spans=spans)
    run_problem.save(update_fields=["partial_solution"])
    return run.traces.get(), run_problem


def _whatif_box(html: str) -> str:
    import html as html_lib
    import re

    match = re.search(r'<textarea id="whatif-waypoints"[^>]*>(.*?)</textarea>', html, re.S)
    assert match, "no what-if box"
    return html_lib.unescape(match.group(1))


def test_the_whatif_box_shows_the_waypoints_and_rescoring_it_unedited_uses_the_real_s(
    client, reviewer, monkeypatch
):
    import numpy as np

    from expansion.engine import pipeline
    from expansion.services import whatif

    body = "We have $2x = 6$, so\n$$x =\n3$$ and $x < 4$."
    trace, run_problem = _run_with_waypoints(body, ["$2x = 6$", "$$x =\n3$$", "$x < 4$"])
    html = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    box = _whatif_box(html)
    assert "{{" not in box and "{%" not in box
    # One per line (a waypoint with a line break is shown on one line).
    assert box.splitlines() == ["$2x = 6$", "$$x = 3$$", "$x < 4$"]
    assert "$x &lt; 4$" in html  # escaped in the page, plain in the box

    scored = []

    def rescore(model, tokenizer, item, token_ids, **kwargs):
        scored.append(item.partial_solution)
        return np.zeros(len(token_ids), dtype=np.float32)

    monkeypatch.setattr(whatif, "_loaded", lambda trace: (None, None))
    monkeypatch.setattr(pipeline, "rescore_negative", rescore)
    response = client.post(reverse("expansion:whatif", args=[trace.pk]), {"waypoints": box})
    assert response.status_code == 200, response.content
    assert scored == [run_problem.partial_solution]
    assert response.json()["partial_solution"] == run_problem.partial_solution
    assert "$$x =\n3$$" in run_problem.partial_solution
    # An edited box scores what was typed.
    client.post(reverse("expansion:whatif", args=[trace.pk]), {"waypoints": "$x < 4$"})
    assert scored[-1].endswith("might include: $x < 4$.")


def test_the_whatif_box_keeps_the_real_s_when_waypoints_changed_after_the_run(client, reviewer):
    from curation.services.problems import waypoints_save
    from curation.spans import Span
    from expansion.services.whatif import trace_whatif_waypoints

    body = "We have $2x = 6$, so $x = 3$, which is odd, prime."
    trace, run_problem = _run_with_waypoints(body, ["$2x = 6$", "$x = 3$, which is odd"])
    waypoints_save(version=run_problem.solution_version, spans=[Span(0, 7)])  # edited later
    waypoints = trace_whatif_waypoints(trace=trace)
    assert waypoints == ["$2x = 6$, $x = 3$, which is odd"]  # the stored list, one piece
    html = client.get(reverse("expansion:trace", args=[trace.pk])).content.decode()
    assert _whatif_box(html) == "$2x = 6$, $x = 3$, which is odd"
    from expansion.engine.partial_solution import render_partial_solution

    assert render_partial_solution("3", waypoints) == run_problem.partial_solution


def test_the_run_page_shows_the_kept_rule_and_preset(client, reviewer):
    named = make_run(
        problems=1, samples=1, kept_rule="every_correct", rollout_preset="mixed_policy"
    )
    page = client.get(reverse("expansion:run_detail", args=[named.pk])).content.decode()
    assert "every correct trace" in page and "prob_threshold_non_reasoning" in page
    older = make_run(problems=1, samples=1)  # recorded before kept rules were named
    page = client.get(reverse("expansion:run_detail", args=[older.pk])).content.decode()
    assert "recorded before kept rules were named" in page


def test_ungraded_traces_read_not_graded_in_the_queue(client, reviewer):
    run = make_run(problems=1, samples=1)
    Trace.objects.filter(run=run).update(answer_correct=None)
    page = client.get(reverse("expansion:queue") + f"?run={run.pk}").content.decode()
    assert "not graded" in page
