"""Launch a training run from the command line (the same service as the web form)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from dailweb.errors import DomainError
from dailweb.forms import plain_int_argument
from expansion.services import base_model_dir
from training.models import TRACE_FLAGS
from training.services.expert_solutions import ExpertSolutionsChoice
from training.services.training import (
    EMBEDDED_SCALE,
    TrainingSettings,
    training_defaults,
    training_run_launch,
    training_source_description,
)


class Command(BaseCommand):
    help = (
        "Queue a training run on the gpu queue: a LoRA adapter trained on the accepted traces "
        "of the given expansion runs, or (--expert-solutions, objective nll) on the expert "
        "solutions of a dataset, frozen into a snapshot now. Defaults: the release "
        f"values scaled for the embedded model ({', '.join(f'{k}={v}' for k, v in EMBEDDED_SCALE.items())}); "
        "--release starts from the unscaled release values."
    )

    def add_arguments(self, parser):
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--runs", nargs="+", type=plain_int_argument, help="Expansion run ids.")
        source.add_argument(
            "--expert-solutions",
            metavar="DATASET",
            help="Train on the current solution of each problem of this dataset (name), after "
            "the evaluation's learner prompt, with the answer boxed where the solution has no "
            "box: the direct-SFT baseline (objective nll; the default objective becomes nll).",
        )
        parser.add_argument(
            "--held-out-fraction",
            type=float,
            default=None,
            help="With --expert-solutions: train only on the training side of the seeded "
            "held-out split evaluations use (this fraction held out). Default: every problem.",
        )
        parser.add_argument(
            "--split-seed",
            type=plain_int_argument,
            default=0,
            help="With --held-out-fraction: the split's seed (default 0).",
        )
        parser.add_argument("--name", default="")
        parser.add_argument(
            "--model", default="", help="Base model directory (default: the base model)."
        )
        parser.add_argument(
            "--objective",
            choices=["dail", "nll"],
            default=None,
            help="Default: dail on traces, nll on expert solutions.",
        )
        parser.add_argument(
            "--config",
            default="{}",
            help='DailTrainingConfig fields as JSON, e.g. \'{"gamma": 0.05, "epochs": 3}\'.',
        )
        parser.add_argument(
            "--leave-out",
            nargs="*",
            default=[],
            choices=list(TRACE_FLAGS),
            help="Leave accepted traces with these flags out of the snapshot "
            f"({'; '.join(f'{k}: {v}' for k, v in TRACE_FLAGS.items())}). Default: none.",
        )
        parser.add_argument(
            "--release",
            action="store_true",
            help="Start from the release values instead of the embedded-model scale.",
        )

    def handle(self, *args, **o):
        from training.engine.config import DailTrainingConfig

        try:
            overrides = json.loads(o["config"])
        except (ValueError, RecursionError) as exc:  # also a 5,000-digit number, deep nesting
            raise CommandError(f"--config is not readable JSON: {exc}") from None
        if not isinstance(overrides, dict):
            raise CommandError("--config must be a JSON object of settings.")
        expert = o["expert_solutions"]
        if not expert and o["held_out_fraction"] is not None:
            raise CommandError("--held-out-fraction applies to --expert-solutions only.")
        objective = o["objective"] or ("nll" if expert else "dail")
        start = DailTrainingConfig().to_dict() if o["release"] else training_defaults()
        config = {**start, "objective": objective, **overrides}
        if expert:
            from curation.models import Dataset

            dataset = Dataset.objects.filter(name=expert).first()
            if dataset is None:
                raise CommandError(f"There is no dataset named {expert!r}.")
            data = {
                "expert_solutions": ExpertSolutionsChoice(
                    dataset_id=dataset.pk,
                    held_out_fraction=o["held_out_fraction"],
                    split_seed=o["split_seed"],
                ),
                "leave_out": o["leave_out"],
            }
            default_name = f"{objective} on the expert solutions of {dataset.name}"
        else:
            data = {"run_ids": o["runs"], "leave_out": o["leave_out"]}
            default_name = f"{objective} on runs {', '.join(f'#{i}' for i in o['runs'])}"
        try:
            run = training_run_launch(
                settings=TrainingSettings(
                    name=o["name"] or default_name,
                    base_model_path=o["model"] or str(base_model_dir()),
                    config=config,
                    **data,
                ),
                launched_by=None,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        if expert:
            self.stdout.write(
                self.style.SUCCESS(
                    f"Queued training run #{run.pk} (job #{run.job_id}): "
                    f"{training_source_description(run)}; {run.examples_used} used, "
                    f"{run.total_steps} steps; output {run.output_dir}."
                )
            )
            return
        left_out = run.data_filter.get("left_out_total", 0)
        overlong = (
            f"{run.overlong_truncated} truncated, {run.overlong_skipped} skipped, "
            f"{run.prompt_too_long} with too long a prompt"
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"Queued training run #{run.pk} (job #{run.job_id}): {run.examples_used} of "
                f"{run.snapshot_traces} accepted traces ({overlong}; {left_out} more accepted "
                f"left out by --leave-out), {run.total_steps} steps; "
                f"output {run.output_dir}."
            )
        )
