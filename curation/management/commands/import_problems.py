"""Import problems from a JSONL file (our schema or the paper's e1 files)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from curation.models import Dataset, DatasetKind
from curation.services.problems import dataset_create
from curation.services.transfer import problems_import_jsonl
from dailweb.errors import DomainError


class Command(BaseCommand):
    help = "Import a JSONL file of problems into a dataset (created if it does not exist)."

    def add_arguments(self, parser):
        parser.add_argument("file", type=Path)
        parser.add_argument("--dataset", required=True, help="Dataset name.")
        parser.add_argument("--kind", choices=DatasetKind.values, default=DatasetKind.VERIFIABLE)
        parser.add_argument("--licence", default="")
        parser.add_argument(
            "--only-valid-lines",
            action="store_true",
            help="Import the valid lines even if some are bad (default: all or nothing).",
        )

    def handle(
        self,
        *args,
        file: Path,
        dataset: str,
        kind: str,
        licence: str,
        only_valid_lines: bool,
        **options,
    ):
        if not file.is_file():
            raise CommandError(f"No such file: {file}")
        try:
            target = Dataset.objects.filter(name=dataset).first() or dataset_create(
                name=dataset, kind=kind, licence=licence
            )
            report = problems_import_jsonl(
                dataset=target, data=file.read_bytes(), only_valid_lines=only_valid_lines
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        for error in report.errors:
            self.stderr.write(f"{file}: {error}")
        if not report.imported:
            raise CommandError(report.summary())
        self.stdout.write(self.style.SUCCESS(report.summary()))
