"""An evaluation end to end with the real embedded model (SmolLM2-135M-Instruct) and a real
Celery worker on the `gpu` queue: 3 problems x 4 samples at 48 tokens, launched from the web
form, two problems per sampling call, cancelled part-way (stored samples kept), retried
(only missing batches drawn), and read back as pass@k and budget curves. The model solves little; nothing here expects it to."""

from __future__ import annotations

import pytest
from django.urls import reverse

from dailweb.jobs.models import JobState
from dailweb.jobs.services import job_cancel, job_retry
from tests.conftest import wait_for
from tests.factories import make_dataset, make_problem, make_user
from training.evaluations import selectors
from training.models import Evaluation, EvaluationSample

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

PROBLEMS = [
    ("What is $2 + 3$?", "5"),
    ("How many ways are there to choose 5 of 10 people?", "C(10, 5), or equivalently 252"),
    ("Is $\\sqrt{2}$ rational? Answer Yes or No.", "No"),
]


def test_evaluation_runs_on_a_worker_cancels_resumes_and_reports(
    client, celery_worker_factory, embedded_model_dir
):
    # Calls of 8 sequences: problems 1 and 2 share the first call, problem 3 has its own.
    celery_worker_factory(
        name="gpu-eval", queues="gpu", env={"DAIL_EVALUATION_MAX_BATCH_SIZE": "8"}
    )
    dataset = make_dataset(name="smoke")
    for statement, answer in PROBLEMS:
        make_problem(dataset=dataset, statement=statement, answer=answer)
    admin = make_user("admin")
    client.force_login(admin)
    response = client.post(
        reverse("evaluations:launch"),
        {
            "name": "SmolLM2 smoke",
            "base_model_path": str(embedded_model_dir),
            "backend": "transformers",
            "dataset": dataset.pk,
            "split": "all",
            "samples_per_problem": "4",
            "ks": "1, 2, 4",
            "budgets": "16, 48",
            "temperature": "0.6",
            "top_p": "0.95",
            "seed": "0",
            "batch_size": "4",
            "prompt_template": "## Problem:\n{problem}\n\nBegin your step-by-step thinking process.\n"
            "Put your final answer within \\boxed{}.\n",
        },
    )
    assert response.status_code == 302, response.content.decode()[-2000:]
    evaluation = Evaluation.objects.get()
    job = evaluation.job
    assert job.queue == "gpu"

    # Cancel once the first call's samples are stored; what was stored stays. (Timeouts are
    # generous: on 2 busy cores the 135M model can take minutes for 48 tokens x 4 samples.)
    wait_for(lambda: EvaluationSample.objects.count() >= 4, timeout=600, interval=0.5)
    job_cancel(job_id=job.pk, by=admin)
    wait_for(lambda: job.__class__.objects.get(pk=job.pk).state == JobState.CANCELLED, timeout=120)
    kept = dict(EvaluationSample.objects.values_list("pk", "text"))
    assert len(kept) == 8  # the first call's two problems, whole

    job_retry(job_id=job.pk, by=admin)

    def finished():
        job.refresh_from_db()
        return job.state in (JobState.SUCCEEDED, JobState.FAILED)

    wait_for(finished, timeout=900, interval=0.5)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert job.attempt == 2 and (job.progress_done, job.progress_total) == (12, 12)
    samples = list(EvaluationSample.objects.all())
    assert len(samples) == 12
    assert {s.pk: s.text for s in samples if s.pk in kept} == kept  # not drawn again
    assert job.result["sampled_now"] == 12 - len(kept)
    for sample in samples:
        assert 0 <= sample.token_count <= 48
        assert sample.finish_reason in ("eos", "length")
        if sample.finish_reason == "length":
            assert sample.token_count == 48
        assert sample.has_answer == bool(sample.answer_extracted)
    assert "correct" in job.log and "with a boxed answer" in job.log

    # The numbers are whatever the model did: pass@k from the stored verdicts.
    result = selectors.evaluation_result(evaluation)
    correct = sum(s.auto_correct for s in samples)
    assert result.samples == 12 and result.correct_samples == correct
    assert result.metrics.overall.overall[1].value == pytest.approx(correct / 12)
    within_16 = sum(s.auto_correct and s.token_count <= 16 for s in samples)
    assert result.metrics.by_budget[16].overall[1].value == pytest.approx(within_16 / 12)
    page = client.get(
        reverse("evaluations:detail", kwargs={"evaluation_id": evaluation.pk})
    ).content.decode()
    assert f"{correct} of 12 samples correct" in page
    assert "pass@4" in page
