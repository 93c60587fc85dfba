"""Large imports (issue 12, defect 4): checked in the request, written by a `problem_import`
job in batches; cancel between batches, retry without duplicates, the same report, and the
job page for the person who started it. The job runs in this process (`runner.job_execute`);
tests/integration/test_import_job.py runs it on a real worker."""

from __future__ import annotations

import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from curation.models import Dataset, Problem
from curation.services import transfer
from curation.services.transfer import import_write
from dailweb.errors import ServiceUnavailableError
from dailweb.jobs import runner
from dailweb.jobs.models import Job, JobState
from tests.factories import make_job, make_user

pytestmark = pytest.mark.django_db


def lines(count: int, *, without_id: tuple[int, ...] = ()) -> bytes:
    records = [
        {
            "problem_id": "" if i in without_id else f"J{i}",
            "problem": f"Problem {i}",
            "solution": f"So $x = {i}$.",
            "answer": str(i),
            "waypoints": [f"$x = {i}$"],
        }
        for i in range(1, count + 1)
    ]
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture
def small_imports(settings, tmp_path):
    settings.DAIL_IMPORT_INLINE_MAX_LINES = 3
    settings.DAIL_IMPORT_BATCH_LINES = 2
    settings.DATA_DIR = tmp_path
    return tmp_path / "uploads" / "imports"


@pytest.fixture
def expert(client):
    user = make_user("expert", username="emmy")
    client.force_login(user)
    return user


def post_import(client, data: bytes, **form):
    fields = {"file": SimpleUploadedFile("big.jsonl", data), "new_dataset_name": "big", **form}
    return client.post(reverse("curation:import"), fields)


def run_inline(job: Job) -> Job:
    job.refresh_from_db()
    runner.job_execute(job_id=job.pk, task_id=job.task_id, hostname="inline@test")
    job.refresh_from_db()
    return job


def test_a_large_import_is_checked_in_the_request_and_written_by_a_job(
    client, expert, small_imports, broker_url, clean_queues
):
    response = post_import(client, lines(7, without_id=(2, 5)))
    job = Job.objects.get(kind="problem_import")
    assert response.status_code == 302
    assert response["Location"] == reverse("curation:import_job", args=[job.pk])
    assert job.queue == "default" and job.launched_by == expert
    assert Problem.objects.count() == 0  # nothing written in the request
    assert Dataset.objects.filter(name="big").exists()  # created with the job
    stored = list(small_imports.iterdir())
    assert len(stored) == 1 and job.params["upload"] == stored[0].name

    job = run_inline(job)
    assert job.state == JobState.SUCCEEDED, job.error
    assert job.result["summary"] == "Imported 7 problems: 7 new, 0 updated, 0 unchanged."
    assert job.progress_unit == "lines" and job.progress_done == job.progress_total == 7
    assert Problem.objects.filter(dataset__name="big", author=expert).count() == 7
    assert not any(small_imports.iterdir())  # the file is cleaned up

    page = client.get(reverse("curation:import_job", args=[job.pk]))
    assert page.status_code == 200
    assert "Imported 7 problems" in page.content.decode()


def test_a_large_file_with_a_bad_line_is_refused_before_anything_is_queued(
    client, expert, small_imports, broker_url, clean_queues
):
    data = lines(7) + b"{oops\n"
    response = post_import(client, data)
    assert response.status_code == 400
    assert [str(e) for e in response.context["report"].errors] == [
        "line 8: not valid JSON: Expecting property name enclosed in double quotes at column 2"
    ]
    assert not Job.objects.exists() and not Dataset.objects.filter(name="big").exists()
    assert not small_imports.exists() or not any(small_imports.iterdir())


def test_only_valid_lines_of_a_large_file_go_to_the_job_with_the_same_report(
    client, expert, small_imports, broker_url, clean_queues
):
    response = post_import(client, lines(7) + b"[]\n", only_valid_lines="on")
    job = run_inline(Job.objects.get(kind="problem_import"))
    assert response.status_code == 302 and job.state == JobState.SUCCEEDED
    report = transfer.ImportReport.from_dict(job.result)
    assert (
        report.summary()
        == "Imported 7 problems: 7 new, 0 updated, 0 unchanged; 1 bad lines skipped."
    )
    assert [str(e) for e in report.errors] == ["line 8: a line must be a JSON object, not an array"]


def test_cancel_stops_between_batches_and_retry_finishes_without_duplicates(
    client, expert, small_imports, broker_url, clean_queues, monkeypatch
):
    post_import(client, lines(7, without_id=(1, 2, 3, 4, 5, 6, 7)))
    job = Job.objects.get(kind="problem_import")
    monkeypatch.setattr(runner, "CANCEL_CHECK_INTERVAL", 0)
    real_upsert = import_write.problem_upsert

    def upsert_then_cancel(dataset, item, author, report, **kwargs):
        real_upsert(dataset, item, author, report, **kwargs)
        if item.line == 3:  # someone presses Cancel while the second batch is written
            Job.objects.filter(pk=job.pk).update(cancel_requested=True)

    monkeypatch.setattr(import_write, "problem_upsert", upsert_then_cancel)
    job = run_inline(job)
    assert job.state == JobState.CANCELLED
    assert job.progress_done == 4 and Problem.objects.count() == 4  # the batch was kept
    page = client.get(reverse("curation:import_job", args=[job.pk])).content.decode()
    assert "Cancelled" in page and reverse("curation:import_job_retry", args=[job.pk]) in page

    monkeypatch.setattr(import_write, "problem_upsert", real_upsert)
    response = client.post(reverse("curation:import_job_retry", args=[job.pk]))
    assert response.status_code == 302
    job = run_inline(job)
    assert job.state == JobState.SUCCEEDED and job.attempt == 2
    assert job.result["resumed_lines"] == 4 and job.result["created"] == 3
    assert Problem.objects.count() == 7  # lines without an id were not created twice
    assert sorted(Problem.objects.values_list("statement", flat=True)) == [
        f"Problem {i}" for i in range(1, 8)
    ]


def test_cancel_from_the_import_page(client, expert, small_imports, broker_url, clean_queues):
    post_import(client, lines(5))
    job = Job.objects.get(kind="problem_import")
    response = client.post(reverse("curation:import_job_cancel", args=[job.pk]))
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.CANCELLED  # it had not started: cancelled at once
    assert Problem.objects.count() == 0


def test_a_broker_that_is_down_leaves_no_dataset_and_no_file(
    client, expert, small_imports, monkeypatch
):
    def down():
        raise ServiceUnavailableError("The job queue is unreachable, so nothing was launched.")

    monkeypatch.setattr("dailweb.jobs.services._require_broker", down)
    response = post_import(client, lines(5))
    assert response.status_code == 503
    assert "unreachable" in response.content.decode()
    assert not Dataset.objects.filter(name="big").exists() and not Job.objects.exists()
    assert not any(small_imports.iterdir())


def test_the_import_job_page_is_for_its_launcher_and_admins(client, small_imports):
    owner = make_user("expert")
    job = make_job(kind="problem_import", launched_by=owner, params={"upload": "x"})
    url = reverse("curation:import_job", args=[job.pk])
    client.force_login(make_user("expert"))
    assert client.get(url).status_code == 403
    assert client.post(reverse("curation:import_job_cancel", args=[job.pk])).status_code == 403
    client.force_login(owner)
    assert client.get(url).status_code == 200
    client.force_login(make_user("admin"))
    assert client.get(url).status_code == 200
    other = make_job(kind="worker_check", launched_by=owner)
    client.force_login(owner)
    assert client.get(reverse("curation:import_job", args=[other.pk])).status_code == 404


def test_stored_files_are_swept_when_no_longer_needed(small_imports):
    from datetime import timedelta

    from django.utils import timezone

    small_imports.mkdir(parents=True)
    names = [f"{str(i) * 32}.jsonl" for i in range(4)]
    for name in names:
        (small_imports / name).write_bytes(b"{}\n")
    now = timezone.now()
    make_job(kind="problem_import", state=JobState.SUCCEEDED, params={"upload": names[0]})
    make_job(
        kind="problem_import",
        state=JobState.CANCELLED,
        params={"upload": names[1]},
        finished_at=now - timedelta(days=1),
    )
    make_job(
        kind="problem_import",
        state=JobState.FAILED,
        params={"upload": names[2]},
        finished_at=now - timedelta(days=8),
    )
    # names[3]: no job names it (a launch that failed); kept for an hour.
    assert sorted(transfer.import_uploads_sweep(now=now)) == sorted([names[0], names[2]])
    assert sorted(transfer.import_uploads_sweep(now=now + timedelta(hours=2))) == [names[3]]
    assert [p.name for p in small_imports.iterdir()] == [names[1]]  # kept for a retry


def test_the_import_page_states_its_limits(client, expert, settings):
    settings.DAIL_UPLOAD_MAX_MB = 7
    settings.DAIL_IMPORT_INLINE_MAX_LINES = 1234
    page = client.get(reverse("curation:import")).content.decode()
    assert "Upload limit: 7 MB." in page and "more than 1234 problems" in page
    assert "see settings" not in page


def test_the_command_writes_a_large_file_in_batches_itself(small_imports, tmp_path):
    import io

    from django.core.management import call_command

    path = tmp_path / "big.jsonl"
    path.write_bytes(lines(7))
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command("import_problems", str(path), "--dataset", "cli", stdout=stdout, stderr=stderr)
    assert stdout.getvalue().strip() == "Imported 7 problems: 7 new, 0 updated, 0 unchanged."
    assert [text.rsplit(": ", 1)[1] for text in stderr.getvalue().splitlines()] == [
        f"written through line {done} of 7" for done in (2, 4, 6, 7)
    ]
    assert Problem.objects.filter(dataset__name="cli").count() == 7 and not Job.objects.exists()
