"""The reviewer's work: queue, claiming, verdicts with history and conflicts, shortcut spans,
the trace page and its query budget."""

from __future__ import annotations

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
