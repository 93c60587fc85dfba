"""Export problems to JSONL (the import schema) or Parquet (loads with `datasets`)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from curation.models import Dataset
from curation.selectors import ProblemFilters, problem_list
from curation.services.transfer import problems_export_jsonl, problems_export_parquet


class Command(BaseCommand):
    help = "Export problems (current solution versions with waypoints) to .jsonl or .parquet."

    def add_arguments(self, parser):
        parser.add_argument("output", type=Path, help="A .jsonl or .parquet path.")
        parser.add_argument("--dataset", help="Only this dataset (name).")

    def handle(self, *args, output: Path, dataset: str | None, **options):
        filters = ProblemFilters()
        if dataset:
            found = Dataset.objects.filter(name=dataset).first()
            if found is None:
                raise CommandError(f"No dataset named {dataset!r}.")
            filters = ProblemFilters(dataset_id=found.pk)
        problems = problem_list(filters)
        if output.suffix == ".parquet":
            problems_export_parquet(problems, output)
        elif output.suffix in {".jsonl", ".json"}:
            output.write_bytes(problems_export_jsonl(problems))
        else:
            raise CommandError("The output must end in .jsonl or .parquet.")
        self.stdout.write(self.style.SUCCESS(f"Wrote {problems.count()} problems to {output}"))
