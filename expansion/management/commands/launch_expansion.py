"""Launch an expansion run from the command line (the same service as the web form)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from curation.models import Dataset
from dailweb.errors import DomainError
from dailweb.forms import plain_int_argument
from expansion.engine.answers import DEFAULT_KEPT_RULE, KEPT_RULES
from expansion.engine.rollout import DEFAULT_ROLLOUT_PRESET, ROLLOUT_PRESETS
from expansion.models import Backend
from expansion.services import base_model_dir
from expansion.services.runs import (
    DEFAULT_CHUNK_TOKENS,
    RunSettings,
    expansion_run_launch,
    run_problems_select,
)


class Command(BaseCommand):
    help = "Queue an expansion run over a dataset (or some of its problems) on the gpu queue."

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True)
        parser.add_argument(
            "--problems", nargs="*", default=[], help="External ids (default: all)."
        )
        parser.add_argument("--limit", type=plain_int_argument)
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
        parser.add_argument("--samples", type=plain_int_argument, default=4)
        parser.add_argument(
            "--chunk-tokens",
            type=plain_int_argument,
            default=DEFAULT_CHUNK_TOKENS,
            help="Work per chunk job: problems x samples x max_new_tokens (default "
            f"{DEFAULT_CHUNK_TOKENS}).",
        )
        parser.add_argument(
            "--chunk",
            type=plain_int_argument,
            default=None,
            help="Problems per chunk job, instead of sizing chunks by work.",
        )
        parser.add_argument(
            "--preset",
            choices=list(ROLLOUT_PRESETS),
            default=DEFAULT_ROLLOUT_PRESET,
            help="Rollout settings to start from (--rollout overrides single fields): "
            + " ".join(f"{p.name} = {p.label}: {p.source}" for p in ROLLOUT_PRESETS.values()),
        )
        parser.add_argument(
            "--rollout",
            default="{}",
            help="RolloutConfig fields over the preset, as JSON, e.g. '{\"max_new_tokens\": 256}'.",
        )
        parser.add_argument(
            "--kept-rule",
            choices=list(KEPT_RULES),
            default=DEFAULT_KEPT_RULE,
            help="Which traces are marked kept: "
            + " ".join(f"{r.name}: {r.source}" for r in KEPT_RULES.values()),
        )
        parser.add_argument("--reasoning", action="store_true")

    def handle(self, *args, **o):
        dataset = Dataset.objects.filter(name=o["dataset"]).first()
        if dataset is None:
            raise CommandError(f"No dataset named {o['dataset']!r}.")
        try:
            ids = run_problems_select(
                dataset=dataset, external_ids=o["problems"] or (), limit=o["limit"]
            )
        except DomainError as exc:
            raise CommandError(exc.message) from None
        try:
            rollout = json.loads(o["rollout"])
        except (ValueError, RecursionError) as exc:  # also a 5,000-digit number, deep nesting
            raise CommandError(f"--rollout is not readable JSON: {exc}") from None
        if not isinstance(rollout, dict):
            raise CommandError("--rollout must be a JSON object of settings.")
        try:
            run = expansion_run_launch(
                settings=RunSettings(
                    name=o["name"] or f"{dataset.name} x{o['samples']}",
                    model_path=o["model"] or str(base_model_dir()),
                    adapter_path=o["adapter"],
                    backend=o["backend"],
                    samples_per_problem=o["samples"],
                    preset=o["preset"],
                    rollout=rollout,
                    kept_rule=o["kept_rule"],
                    chunk_problems=o["chunk"],
                    chunk_tokens=o["chunk_tokens"],
                    reasoning=o["reasoning"],
                ),
                problem_ids=ids,
                launched_by=None,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Queued run #{run.pk} ({len(ids)} problems, {run.chunks.count()} chunks)."
            )
        )
