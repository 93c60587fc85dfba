"""Issue 16.6: the run, job and evaluation pages show settings as labelled fields, the run
page has the ETA and the log tail of the chunk it follows, plurals and states read right."""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from dailweb.jobs.models import JobState
from dailweb.labelled_fields import FieldLabel, format_value, labelled_fields
from expansion.models import ExpansionChunk
from tests.factories import make_job, make_run, make_user
from tests.training.factories import make_evaluation
from training.models import EvaluationSample

pytestmark = pytest.mark.django_db

LONG_MODEL = "/data/artifacts/models/" + "smollm2-135m-instruct-converted-" * 4 + "safetensors"


def client_for(role: str) -> Client:
    client = Client()
    client.force_login(make_user(role))
    return client


def text_of(page: str) -> str:
    """The page's text with tags dropped and spaces collapsed (wording checks)."""
    return re.sub(r"\s+", " ", unescape(re.sub(r"<[^>]+>", " ", page)))


def run_with_chunks(states, *, tokens=40, problems=1, samples=1, **job_fields):
    run = make_run(problems=problems, samples=samples, tokens=tokens, model_path=LONG_MODEL)
    for index, state in enumerate(states):
        job = make_job(state=state, kind="expansion_chunk", queue="gpu", **job_fields)
        chunk = ExpansionChunk.objects.create(run=run, index=index, job=job)
        chunk.run_problems.set(run.run_problems.all())
    return run


def run_page(run, role="admin") -> str:
    response = client_for(role).get(reverse("expansion:run_detail", args=[run.pk]))
    assert response.status_code == 200
    return response.content.decode()


def test_a_finished_run_reads_in_the_past_with_singular_plurals():
    now = timezone.now()
    run = run_with_chunks(
        [JobState.SUCCEEDED], tokens=40,
        started_at=now - timedelta(seconds=90), finished_at=now,
        log="started on gpu@a\nexpanded problem 1\nchunk done",
    )  # fmt: skip
    page = run_page(run)
    size = text_of(page.split('data-testid="run-size">')[1].split("</span>")[0])
    assert size == "1 problem × 1 sample · 40 tokens · 1 chunk", size
    assert "so far" not in size and "1 chunks" not in page
    # The log tail of the chunk, and its (finished) ETA.
    assert "expanded problem 1" in page and "chunk done" in page
    assert 'data-testid="eta">—' in page


def test_a_running_run_shows_its_eta_and_what_waits_in_the_queue():
    now = timezone.now()
    run = run_with_chunks(
        [JobState.RUNNING, JobState.QUEUED, JobState.QUEUED], tokens=7, problems=2, samples=2,
        progress_done=30, progress_total=130, started_at=now - timedelta(seconds=600),
        progress_first_at=now - timedelta(seconds=20), progress_first_done=10, progress_at=now,
        log="\n".join(f"line {i}" for i in range(40)),
    )  # fmt: skip
    page = run_page(run, role="reviewer")
    text = text_of(page)
    assert "2 problems × 2 samples · 28 tokens so far · 3 chunks" in text
    eta = text_of(page.split('data-testid="eta">')[1].split("</dd>")[0]).strip()
    # 100 units left at 1 unit/s (the 600 s of start-up do not count), then 2 chunks queued.
    assert re.fullmatch(r"1 min 3[89] s \(2 more chunks queued\)|1 min 40 s \(2 more chunks queued\)", eta), eta  # fmt: skip
    # The last lines of the log only; reviewers get no link to the jobs pages (admins only).
    tail = page.split('data-testid="log-tail">')[1].split("</pre>")[0]
    assert tail.splitlines() == [f"line {i}" for i in range(25, 40)]
    assert reverse("jobs:detail", args=[run.chunks.first().job_id]) not in page


def test_run_settings_are_labelled_fields_not_a_dict():
    run = run_with_chunks([JobState.SUCCEEDED])
    run.rollout_overrides = {"tau": 0.9}
    run.rollout_config = run.rollout_config | {"tau": 0.9}
    run.save(update_fields=["rollout_overrides", "rollout_config"])
    page = run_page(run)
    settings = page.split('data-testid="rollout-settings"')[1].split("</dl>")[0]
    text = text_of(settings)
    assert "Acceptance threshold τ 0.9" in text and "Chosen over the preset" in text
    assert "Longest trace 2048 tokens" in text
    assert "End-of-trace token ids the model's own" in text
    assert "{" not in settings and "&#x27;tau&#x27;" not in page and "'tau'" not in page
    # The long model path may break anywhere (it never runs into the adapter's column).
    assert f'<code class="path" title="{LONG_MODEL}">' in page


def test_the_job_page_shows_parameters_and_result_as_fields():
    job = make_job(
        state=JobState.SUCCEEDED, params={"run_id": 7, "chunk_index": 0},
        result={"traces": 4, "skipped_problems": [], "tokens": 395},
    )  # fmt: skip
    page = client_for("admin").get(reverse("jobs:detail", args=[job.pk])).content.decode()
    params = text_of(page.split('data-testid="job-params"')[1].split("</dl>")[0])
    assert "Chunk index 0" in params and "Run id 7" in params
    result = text_of(page.split('data-testid="job-result"')[1].split("</dl>")[0])
    assert "Skipped problems none" in result and "Tokens 395" in result
    assert "{&#x27;" not in page


def test_a_running_evaluation_says_how_many_samples_are_drawn():
    evaluation = make_evaluation(problems=2, samples=2, job_state=JobState.RUNNING)
    EvaluationSample.objects.filter(eval_problem__evaluation=evaluation).delete()
    evaluation.job.progress_done, evaluation.job.progress_total = 2, 4
    evaluation.job.save(update_fields=["progress_done", "progress_total"])
    page = client_for("reviewer").get(reverse("evaluations:detail", args=[evaluation.pk]))
    text = text_of(page.content.decode())
    assert "2 of 4 samples drawn" in text and "no samples" not in text
    evaluation.job.state = JobState.FAILED
    evaluation.job.save(update_fields=["state"])
    page = client_for("reviewer").get(reverse("evaluations:detail", args=[evaluation.pk]))
    assert "no samples stored" in text_of(page.content.decode())


def test_evaluation_plurals():
    evaluation = make_evaluation(problems=1, samples=1)
    page = client_for("reviewer").get(reverse("evaluations:detail", args=[evaluation.pk]))
    text = text_of(page.content.decode())
    assert "of 1 sample correct" in text and "of 1 problem solved" in text
    assert "1 samples" not in text and "1 problems" not in text


def test_values_are_formatted_once_for_every_page():
    assert format_value(True) == "yes" and format_value([]) == "none"
    assert format_value(0.30000000000000004) == "0.3"
    assert format_value(2048, unit="tokens") == "2048 tokens"
    rows = labelled_fields(
        {"zeta": 1, "max_new_tokens": 5, "tau": 0.5},
        labels={"tau": FieldLabel("τ"), "max_new_tokens": FieldLabel("Longest", "tokens")},
    )
    assert [(r.label, r.value) for r in rows] == [
        ("τ", "0.5"),
        ("Longest", "5 tokens"),
        ("Zeta", "1"),
    ]
