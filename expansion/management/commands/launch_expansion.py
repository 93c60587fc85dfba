"""Launch an expansion run from the command line (the same service as the web form)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from curation.models import Dataset, Problem
from dailweb.errors import DomainError
from expansion.models import Backend
from expansion.services import base_model_dir
from expansion.services.runs import RunSettings, expansion_run_launch


class Command(BaseCommand):
    help = "Queue an expansion run over a dataset (or some of its problems) on the gpu queue."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument(
            "--problems", nargs="*", default=[], help="External ids (default: all)."
        )
        parser.add_argument("--limit", type=int)
        parser.add_argument("--name", default="")
        parser.add_argument(
            "--model", default="", help="Model directory (default: the base model)."
        )
        parser.add_argument("--adapter", default="")
        parser.add_argument(
            "--backend",
            choices=Backend.values,
            default=Backend.TRANSFORMERS,
            help="Rollout engine (vllm: needs vLLM on the gpu workers).",
        )
        parser.add_argument("--samples", type=int, default=4)
        parser.add_argument("--chunk", type=int, default=4, help="Problems per chunk (job).")
        parser.add_argument(
            "--rollout", default="{}", help="RolloutConfig fields as JSON, e.g. '{\"tau\": 0.8}'."
        )
        parser.add_argument("--reasoning", action="store_true")

    def handle(self, *args, **o):
        dataset = Dataset.objects.filter(name=o["dataset"]).first()
        if dataset is None:
            raise CommandError(f"No dataset named {o['dataset']!r}.")
        problems = Problem.objects.filter(dataset=dataset).order_by("external_id")
        if o["problems"]:
            problems = problems.filter(external_id__in=o["problems"])
        ids = list(problems.values_list("pk", flat=True))[: o["limit"] or None]
        try:
            rollout = json.loads(o["rollout"])
            run = expansion_run_launch(
                settings=RunSettings(
                    name=o["name"] or f"{dataset.name} x{o['samples']}",
                    model_path=o["model"] or str(base_model_dir()),
                    adapter_path=o["adapter"],
                    backend=o["backend"],
                    samples_per_problem=o["samples"],
                    rollout=rollout,
                    chunk_problems=o["chunk"],
                    reasoning=o["reasoning"],
                ),
                problem_ids=ids,
                launched_by=None,
            )
        except json.JSONDecodeError as exc:
            raise CommandError(f"--rollout is not JSON: {exc}") from exc
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Queued run #{run.pk} ({len(ids)} problems, {run.chunks.count()} chunks)."
            )
        )
