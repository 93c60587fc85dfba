"""Load (or update) the CHAMP dataset from the `champ-dataset` package."""

from __future__ import annotations

from django.core.management.base import BaseCommand
from tqdm import tqdm

from curation.services.champ import champ_load


class Command(BaseCommand):
    help = "Load the 270 CHAMP problems (answers, solutions, hints as suggested waypoints)."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", default="CHAMP", help="Dataset name (default CHAMP).")

    def handle(self, *args, dataset: str, **options):
        with tqdm(total=270, unit="problem", desc="CHAMP") as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

            report = champ_load(dataset_name=dataset, progress=progress)
        self.stdout.write(self.style.SUCCESS(report.summary()))
