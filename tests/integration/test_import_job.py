"""A large import through the import page, written by a real Celery worker in batches; the
same file imported again changes and duplicates nothing."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from curation.models import Dataset, Problem, SolutionVersion
from curation.services.transfer.import_job import upload_dir
from dailweb.jobs.models import Job, JobState
from tests.conftest import wait_for
from tests.factories import make_user

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

LINES = 40


def jsonl() -> bytes:
    return "".join(
        json.dumps(
            {
                "problem_id": f"W{i:03d}",
                "problem": f"Find $x$ if $x - {i} = 0$.",
                "solution": f"Add {i}: $x = {i}$.",
                "answer": str(i),
                "waypoints": [f"$x = {i}$"],
            }
        )
        + "\n"
        for i in range(LINES)
    ).encode()


def import_and_wait(client, **form) -> Job:
    before = set(Job.objects.values_list("pk", flat=True))
    response = client.post(
        reverse("curation:import"), {"file": SimpleUploadedFile("big.jsonl", jsonl()), **form}
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    job = Job.objects.exclude(pk__in=before).get(kind="problem_import")
    assert response["Location"] == reverse("curation:import_job", args=[job.pk])
    wait_for(
        lambda: Job.objects.get(pk=job.pk).state not in (JobState.QUEUED, JobState.RUNNING),
        timeout=120,
        message="the import job never finished",
    )
    job.refresh_from_db()
    assert job.state == JobState.SUCCEEDED, f"{job.error}\n{job.log}"
    return job


def test_large_import_runs_as_a_job_and_a_rerun_duplicates_nothing(
    celery_worker_factory, settings, client
):
    settings.DAIL_IMPORT_INLINE_MAX_LINES = 5  # the page decides; the worker writes batches
    celery_worker_factory(env={"DAIL_IMPORT_BATCH_LINES": "7"})
    expert = make_user("expert", username="wanda")
    client.force_login(expert)

    first = import_and_wait(client, new_dataset_name="worker-import")
    assert (
        first.result["summary"]
        == f"Imported {LINES} problems: {LINES} new, 0 updated, 0 unchanged."
    )
    assert first.progress_done == first.progress_total == LINES
    assert first.worker_hostname.startswith("test-worker@")
    assert first.log.count("\n") >= 3 and "Imported" in first.log
    dataset = Dataset.objects.get(name="worker-import")
    assert dataset.problems.filter(author=expert).count() == LINES
    assert [
        w.text for w in dataset.problems.get(external_id="W007").versions.get().waypoints.all()
    ] == ["$x = 7$"]
    assert not any(upload_dir().glob(first.params["upload"]))  # cleaned up

    page = client.get(reverse("curation:import_job", args=[first.pk]))
    assert f"Imported {LINES} problems" in page.content.decode()

    again = import_and_wait(client, dataset=dataset.pk)
    assert again.result["unchanged"] == LINES
    assert again.result["created"] == again.result["updated"] == 0
    assert Problem.objects.filter(dataset=dataset).count() == LINES
    assert SolutionVersion.objects.filter(problem__dataset=dataset).count() == LINES
