"""Importing a JSONL file: the one service the import page, `manage.py import_problems` and
the import job share, so all three check the same things and report the same way.

1. The importer must be an expert or an admin (None: the system); a new dataset's name must
   be free; the file must fit DAIL_UPLOAD_MAX_MB and have a line.
2. Every line is checked (`jsonl_read`), then against the database (`import_write`): a bad
   line, anywhere, is reported with its number before anything is written.
3. With any bad line nothing is written (no dataset is created either), unless the caller
   asks to import only the valid lines.
4. Up to DAIL_IMPORT_INLINE_MAX_LINES lines to write are written at once, in one transaction.
   Above it the page hands the write to a `problem_import` job (`large_imports="job"`), and
   the command line writes in batches itself (`large_imports="batches"`), so neither holds
   the database's write lock for minutes.
"""

from __future__ import annotations

from collections.abc import Callable

from django.conf import settings

from curation.models import Dataset
from curation.services.transfer.import_job import problem_import_job_launch
from curation.services.transfer.import_write import (
    ImportReport,
    NewDataset,
    import_check,
    import_dataset,
    import_require_right,
    new_dataset_check,
    write_all,
    write_in_batches,
)
from curation.services.transfer.jsonl_read import parse_jsonl
from dailweb.errors import DomainError

LARGE_IMPORTS = ("job", "batches")


def upload_limit_bytes() -> int:
    return settings.DAIL_UPLOAD_MAX_MB * 1024 * 1024


def upload_check_size(*, size: int) -> None:
    """Refuse a file over DAIL_UPLOAD_MAX_MB (before it is read)."""
    if size > upload_limit_bytes():
        raise DomainError(
            f"The file is {size / 2**20:.1f} MB; the upload limit is "
            f"{settings.DAIL_UPLOAD_MAX_MB} MB (setting DAIL_UPLOAD_MAX_MB)."
        )


def inline_max_lines() -> int:
    return int(settings.DAIL_IMPORT_INLINE_MAX_LINES)


def problems_import_jsonl(
    *,
    data: bytes,
    dataset: Dataset | None = None,
    new_dataset: NewDataset | None = None,
    author=None,
    only_valid_lines: bool = False,
    large_imports: str = "batches",
    progress: Callable[[int, int], None] | None = None,
) -> ImportReport:
    """Import a JSONL file into `dataset`, or into `new_dataset` (created only if the import
    goes ahead). `author` is the importing user, whose editing rights apply and who authors
    what is written; None is the system (every right, no author).

    Returns the report; `report.job_id` is set when the write was handed to a job. Raises
    DomainError for what concerns the whole file (too large, empty, no right, name taken)."""
    if (dataset is None) == (new_dataset is None):
        raise ValueError("give either a dataset or a new dataset")
    if large_imports not in LARGE_IMPORTS:
        raise ValueError(f"large_imports must be one of {LARGE_IMPORTS}")
    import_require_right(author)
    upload_check_size(size=len(data))
    if new_dataset is not None:
        new_dataset_check(new_dataset)
    kind = dataset.kind if dataset is not None else new_dataset.kind
    report, items = import_check(
        parse_jsonl(data, dataset_kind=kind), dataset=dataset, author=author
    )
    if new_dataset is not None:
        report.dataset_name = new_dataset.name
    if (report.errors and not only_valid_lines) or not items:
        return report
    if len(items) <= inline_max_lines():
        write_all(
            items=items,
            dataset=dataset,
            new_dataset=new_dataset,
            author=author,
            only_valid_lines=only_valid_lines,
            report=report,
        )
    elif large_imports == "job":
        job = problem_import_job_launch(
            data=data,
            dataset=dataset,
            new_dataset=new_dataset,
            author=author,
            only_valid_lines=only_valid_lines,
            lines=report.to_write,
            file_lines=report.total_lines,
        )
        report.job_id = job.pk
    else:
        write_in_batches(
            items=items,
            dataset=import_dataset(dataset, new_dataset, author),
            author=author,
            only_valid_lines=only_valid_lines,
            report=report,
            on_batch_committed=progress,
        )
    return report
