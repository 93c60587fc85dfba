"""The first real job kind, end to end: an admin launches the embedded-model preparation from
the web UI, a real worker on the `gpu` queue converts the GGUF and verifies the model."""

from __future__ import annotations

import pytest
from django.urls import reverse

from dailweb.jobs import services
from dailweb.jobs.models import Job, JobState
from expansion.engine.embedded_model import embedded_model_dir, is_prepared
from tests.conftest import wait_for
from tests.factories import make_user

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def fresh_artifacts(tmp_path, settings):
    artifacts = tmp_path / "artifacts"
    settings.ARTIFACTS_DIR = artifacts
    return artifacts


def test_admin_launches_model_preparation_and_it_converts(
    client, celery_worker_factory, fresh_artifacts
):
    celery_worker_factory(
        name="gpu-w", queues="gpu", env={"DAIL_ARTIFACTS_DIR": str(fresh_artifacts)}
    )
    client.force_login(make_user("admin"))
    page = client.get(reverse("expansion:models")).content.decode()
    assert "not prepared" in page

    response = client.post(
        reverse("jobs:launch", kwargs={"kind": "model_prepare"}), {"confirm": "yes"}
    )
    assert response.status_code == 302
    job = Job.objects.get(kind="model_prepare")
    assert response["Location"] == reverse("jobs:detail", kwargs={"job_id": job.pk})
    assert job.queue == "gpu"

    seen_progress: set[int] = set()

    def finished():
        job.refresh_from_db()
        seen_progress.add(job.progress_done)
        return job.state in (JobState.SUCCEEDED, JobState.FAILED)

    wait_for(finished, timeout=240, interval=0.5)
    assert job.state == JobState.SUCCEEDED, job.error + job.log
    assert job.result["converted"] is True
    assert job.result["verification_text"]
    assert job.progress_total > 272  # one unit per GGUF tensor, plus saving and verifying
    assert len(seen_progress) >= 3  # the bar moved in steps, not 0 -> 100
    assert is_prepared(embedded_model_dir(fresh_artifacts))
    assert "prepared" in client.get(reverse("expansion:models")).content.decode()

    # Idempotent: a second run reuses the directory.
    again = services.job_launch(kind="model_prepare", launched_by=None, params={})
    wait_for(lambda: Job.objects.get(pk=again.pk).state == JobState.SUCCEEDED, timeout=120)
    assert Job.objects.get(pk=again.pk).result["converted"] is False


def test_corrupt_gguf_fails_the_job_naming_the_file(
    celery_worker_factory, fresh_artifacts, tmp_path
):
    celery_worker_factory(
        name="gpu-w2", queues="gpu", env={"DAIL_ARTIFACTS_DIR": str(fresh_artifacts)}
    )
    corrupt = tmp_path / "broken-model.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 64)
    job = services.job_launch(
        kind="model_prepare", launched_by=None, params={"gguf_path": str(corrupt)}
    )
    wait_for(lambda: Job.objects.get(pk=job.pk).state == JobState.FAILED, timeout=60)
    job.refresh_from_db()
    assert str(corrupt) in job.error
    assert job.can_retry


def test_second_preparation_is_refused_while_one_is_active(client, broker_url, clean_queues):
    client.force_login(make_user("admin"))
    url = reverse("jobs:launch", kwargs={"kind": "model_prepare"})
    assert client.post(url, {"confirm": "yes"}).status_code == 302
    response = client.post(url, {"confirm": "yes"})
    assert response.status_code == 400
    assert "already being prepared" in response.content.decode()
    assert Job.objects.filter(kind="model_prepare").count() == 1
