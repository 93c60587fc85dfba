"""Launch a training run from the command line (the same service as the web form)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from dailweb.errors import DomainError
from dailweb.forms import plain_int_argument
from expansion.services import base_model_dir
from training.models import TRACE_FLAGS
from training.services.training import (
    EMBEDDED_SCALE,
    TrainingSettings,
    training_defaults,
    training_run_launch,
)


class Command(BaseCommand):
    help = (
        "Queue a training run on the gpu queue: a LoRA adapter trained on the accepted traces "
        "of the given expansion runs (frozen into a snapshot now). Defaults: the release "
        f"values scaled for the embedded model ({', '.join(f'{k}={v}' for k, v in EMBEDDED_SCALE.items())}); "
        "--release starts from the unscaled release values."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--runs", nargs="+", type=plain_int_argument, required=True, help="Expansion run ids."
        )
        parser.add_argument("--name", default="")
        parser.add_argument(
            "--model", default="", help="Base model directory (default: the base model)."
        )
        parser.add_argument("--objective", choices=["dail", "nll"], default="dail")
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
        start = DailTrainingConfig().to_dict() if o["release"] else training_defaults()
        config = {**start, "objective": o["objective"], **overrides}
        runs = ", ".join(f"#{i}" for i in o["runs"])
        try:
            run = training_run_launch(
                settings=TrainingSettings(
                    name=o["name"] or f"{o['objective']} on runs {runs}",
                    base_model_path=o["model"] or str(base_model_dir()),
                    run_ids=o["runs"],
                    config=config,
                    leave_out=o["leave_out"],
                ),
                launched_by=None,
            )
        except DomainError as exc:
            raise CommandError(exc.message) from exc
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
