"""Write a study's report (study.json, report.md and the charts as SVG) into a directory."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from dailweb.forms import plain_int_argument
from training.models import Study
from training.studies.report import report_files
from training.studies.selectors import study_document


class Command(BaseCommand):
    help = (
        "Write the report of study ID into DIRECTORY: study.json (the export), report.md "
        "(tables, comparisons, lineage) and the charts it shows as SVG files."
    )

    def add_arguments(self, parser):
        parser.add_argument("study_id", type=plain_int_argument)
        parser.add_argument("directory")

    def handle(self, *args, **o):
        study = Study.objects.filter(pk=o["study_id"]).first()
        if study is None:
            raise CommandError(f"There is no study #{o['study_id']}.")
        directory = Path(o["directory"])
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for name, content in report_files(study_document(study)).items():
                (directory / name).write_text(content, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"Cannot write the report into {directory}: {exc}") from None
        self.stdout.write(
            self.style.SUCCESS(f"Wrote the report of study #{study.pk} to {directory}")
        )
