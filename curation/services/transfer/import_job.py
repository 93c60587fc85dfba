"""Large imports as a job (`problem_import`, queue `default`).

The page checks the whole file first (nothing is queued for a file with a bad line, unless
only the valid lines are wanted); then the file is stored under DATA_DIR/uploads/imports/,
the new dataset (if any) is created and the job is queued in one transaction (a broker that
is down leaves neither dataset nor file behind).

The job checks the file again (the database may have changed since), then writes it in
batches of DAIL_IMPORT_BATCH_LINES lines, one transaction each. Its progress (in file lines)
is written inside each batch's transaction, so it is exactly what was committed: a cancel
stops between batches and keeps what was written, and a retry skips the lines already
written, so lines without a problem id are not created twice either. The file is deleted
when the job succeeds; a failed or cancelled job keeps it for a retry until
`import_uploads_sweep` removes it (UPLOAD_KEEP_DAYS after the job finished).

The launching user (or an admin) watches, cancels and retries the job on the import pages.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from curation.models import Dataset
from curation.services.transfer.import_write import (
    ImportReport,
    NewDataset,
    import_check,
    import_dataset,
    import_require_right,
    write_in_batches,
)
from curation.services.transfer.jsonl_read import parse_jsonl
from dailweb.errors import DomainError
from dailweb.jobs.models import FINISHED_STATES, Job, JobState
from dailweb.jobs.services import job_cancel, job_launch, job_retry
from dailweb.roles import Role, has_role

IMPORT_JOB_KIND = "problem_import"
UPLOAD_KEEP_DAYS = 7
ORPHAN_UPLOAD_SECONDS = 3600  # a file no job names (its launch failed) is removed after this
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{32}\.jsonl$")


def upload_dir() -> Path:
    return Path(settings.DATA_DIR) / "uploads" / "imports"


def upload_path(name: str) -> Path:
    if not _UPLOAD_NAME.match(name or ""):
        raise DomainError(f"{name!r} is not the name of a stored import file.")
    return upload_dir() / name


def _store_upload(data: bytes) -> str:
    name = f"{uuid.uuid4().hex}.jsonl"
    directory = upload_dir()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f"{name}.partial"
    partial.write_bytes(data)
    partial.replace(directory / name)  # a worker never sees half a file
    return name


def import_uploads_sweep(*, now=None) -> list[str]:
    """Delete stored import files nobody needs any more: files of succeeded jobs, of jobs
    that finished more than UPLOAD_KEEP_DAYS ago, and files no job names."""
    now = now or timezone.now()
    removed = []
    directory = upload_dir()
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        if not _UPLOAD_NAME.match(path.name):
            continue
        job = Job.objects.filter(kind=IMPORT_JOB_KIND, params__upload=path.name).first()
        if job is None:
            age = now.timestamp() - path.stat().st_mtime
            stale = age > ORPHAN_UPLOAD_SECONDS
        else:
            stale = job.state == JobState.SUCCEEDED or (
                job.state in FINISHED_STATES
                and job.finished_at is not None
                and job.finished_at < now - timedelta(days=UPLOAD_KEEP_DAYS)
            )
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def problem_import_job_launch(
    *,
    data: bytes,
    dataset: Dataset | None,
    new_dataset: NewDataset | None,
    author,
    only_valid_lines: bool,
    lines: int,
    file_lines: int,
) -> Job:
    """Store the (checked) file and queue its import; creates the new dataset with the job."""
    import_uploads_sweep()
    name = _store_upload(data)
    try:
        with transaction.atomic():
            target = import_dataset(dataset, new_dataset, author)
            job = job_launch(
                kind=IMPORT_JOB_KIND,
                launched_by=author,
                params={
                    "upload": name,
                    "dataset_id": target.pk,
                    "author_id": getattr(author, "pk", None),
                    "only_valid_lines": only_valid_lines,
                    "lines": lines,
                    "file_lines": file_lines,
                },
                title=f"Import {lines:,} problems into {target.name}",
            )
    except BaseException:
        upload_path(name).unlink(missing_ok=True)
        raise
    return job


def problem_import_job_execute(
    *,
    params: dict,
    resume_after_line: int = 0,
    on_batch_committed: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> ImportReport:
    """The job's work: check the stored file again and write it in batches, skipping the
    lines up to `resume_after_line` (written by an earlier attempt)."""
    path = upload_path(params["upload"])
    if not path.is_file():
        raise DomainError("The uploaded file is gone; upload it again.")
    dataset = Dataset.objects.filter(pk=params["dataset_id"]).first()
    if dataset is None:
        raise DomainError("The dataset of this import was deleted.")
    author = None
    if params.get("author_id") is not None:
        author = get_user_model().objects.filter(pk=params["author_id"], is_active=True).first()
        if author is None:
            raise DomainError("The user who started this import no longer exists.")
        import_require_right(author)  # roles may have changed since the launch
    only_valid_lines = bool(params.get("only_valid_lines"))
    report, items = import_check(
        parse_jsonl(path.read_bytes(), dataset_kind=dataset.kind), dataset=dataset, author=author
    )
    if report.errors and not only_valid_lines:
        for line in report.text_lines():
            log(line)
        shown = "; ".join(str(error) for error in report.errors[:3])
        raise DomainError(
            f"{report.summary()} The database changed since the file was checked: {shown}"
        )
    if resume_after_line:
        report.resumed_lines = sum(1 for item in items if item.line <= resume_after_line)
        items = [item for item in items if item.line > resume_after_line]
        log(f"resuming after line {resume_after_line}: {report.resumed_lines} lines were written")
    write_in_batches(
        items=items,
        dataset=dataset,
        author=author,
        only_valid_lines=only_valid_lines,
        report=report,
        on_batch_committed=on_batch_committed,
        should_stop=should_stop,
    )
    if report.imported:
        path.unlink(missing_ok=True)
    return report


def problem_import_job_get(*, job_id: int, user) -> Job:
    """An import job, for its launcher or an admin (raises Job.DoesNotExist, PermissionDenied)."""
    job = Job.objects.select_related("launched_by").get(pk=job_id, kind=IMPORT_JOB_KIND)
    if not (has_role(user, Role.ADMIN) or job.launched_by_id == user.pk):
        raise PermissionDenied("Only the person who started this import or an admin can see it.")
    return job


def problem_import_job_cancel(*, job_id: int, user) -> Job:
    problem_import_job_get(job_id=job_id, user=user)
    return job_cancel(job_id=job_id, by=user)


def problem_import_job_retry(*, job_id: int, user) -> Job:
    problem_import_job_get(job_id=job_id, user=user)
    return job_retry(job_id=job_id, by=user)
