"""Import problems from a JSONL file (our schema or the paper's e1 files)."""

from __future__ import annotations

from pathlib import Path

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from curation.models import Dataset, DatasetKind
from curation.services.transfer import NewDataset, problems_import_jsonl
from dailweb.errors import DomainError


class Command(BaseCommand):
    help = (
        "Import a JSONL file of problems into a dataset (created if it does not exist, only "
        "when the import goes ahead). Checks every line first and reports every bad line; "
        "with any bad line nothing is imported unless --only-valid-lines. With --as USERNAME "
        "the import has exactly that user's rights (experts change only their own problems, "
        "admins every problem) and that user authors what is written; without it the import "
        "runs as the system: every right, new problems without an author. Files with more "
        "lines than DAIL_IMPORT_INLINE_MAX_LINES are written in batches of "
        "DAIL_IMPORT_BATCH_LINES lines (one transaction each)."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--dataset", required=True, help="Dataset name.")
        parser.add_argument(
            "--kind",
            choices=DatasetKind.values,
            default=DatasetKind.VERIFIABLE,
            help="Kind of a new dataset (an existing dataset keeps its own).",
        )
        parser.add_argument("--licence", default="", help="Licence of a new dataset.")
        parser.add_argument(
            "--only-valid-lines",
            action="store_true",
            help="Import the valid lines even if some are bad (default: all or nothing).",
        )
        parser.add_argument(
            "--as",
            dest="as_user",
            metavar="USERNAME",
            help="Import with this user's rights and as its author (default: the system, "
            "with every right and no author).",
        )

    def handle(
        self,
        *args,
        file: Path,
        dataset: str,
        kind: str,
        licence: str,
        only_valid_lines: bool,
        as_user: str | None,
        **options,
    ):
        if not file.is_file():
            raise CommandError(f"No such file: {file}")
        author = None
        if as_user:
            author = get_user_model().objects.filter(username=as_user, is_active=True).first()
            if author is None:
                raise CommandError(f"No active user named {as_user!r}.")
        existing = Dataset.objects.filter(name=dataset).first()

        def progress(done: int, total: int) -> None:
            self.stderr.write(f"{file}: written through line {done} of {total}")

        try:
            report = problems_import_jsonl(
                data=file.read_bytes(),
                dataset=existing,
                new_dataset=None if existing else NewDataset(dataset, kind, licence),
                author=author,
                only_valid_lines=only_valid_lines,
                large_imports="batches",
                progress=progress,  # called only when the file is written in batches
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        *errors, summary = report.text_lines()
        for line in errors:
            self.stderr.write(f"{file}: {line}")
        if not report.imported:
            raise CommandError(summary)
        self.stdout.write(self.style.SUCCESS(summary))
