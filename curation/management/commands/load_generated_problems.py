"""Load (or update) a dataset of seeded, generated problems the embedded model can partly
solve (not part of `./dev up`: run it when a study needs it)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from curation.generated_problems import (
    DEFAULT_PER_FAMILY,
    DEFAULT_SEED,
    FAMILIES,
    MAX_PER_FAMILY,
)
from curation.services.generated import DEFAULT_DATASET_NAME, generated_problems_load
from dailweb.errors import DomainError
from dailweb.forms import plain_int_argument


class Command(BaseCommand):
    help = (
        "Generate short multi-step problems from a seed (families: "
        + ", ".join(f"{f.name}: {f.description}" for f in FAMILIES.values())
        + ") with terse solutions and waypoints on the intermediate results, and load them "
        "into a verifiable dataset. Re-loading updates problems by id, never duplicates; the "
        "same seed and sizes change nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--seed",
            type=plain_int_argument,
            default=DEFAULT_SEED,
            help=f"Generator seed (default {DEFAULT_SEED}).",
        )
        parser.add_argument(
            "--per-family",
            type=plain_int_argument,
            default=DEFAULT_PER_FAMILY,
            help=f"Problems per family, 1..{MAX_PER_FAMILY} (default {DEFAULT_PER_FAMILY}).",
        )
        parser.add_argument(
            "--families",
            default=None,
            help=f"Comma-separated families (default: all of {', '.join(FAMILIES)}).",
        )
        parser.add_argument(
            "--dataset",
            default=DEFAULT_DATASET_NAME,
            help=f"Dataset name (default {DEFAULT_DATASET_NAME!r}).",
        )

    def handle(self, *args, seed: int, per_family: int, families: str | None, dataset: str, **o):
        try:
            report = generated_problems_load(
                dataset_name=dataset, seed=seed, per_family=per_family, families=families
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(self.style.SUCCESS(f"{report.dataset_name}: {report.summary()}"))
