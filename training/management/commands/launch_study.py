"""Launch a study from the command line (the same service as the web form)."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from dailweb.errors import DomainError
from dailweb.forms import plain_int_argument
from expansion.engine.answers import DEFAULT_KEPT_RULE, KEPT_RULES
from expansion.engine.rollout import DEFAULT_ROLLOUT_PRESET, ROLLOUT_PRESETS
from expansion.services import base_model_dir
from training.engine import evaluation as evaluation_engine
from training.models import StudyAcceptance
from training.studies.plan import ARMS, StudySettings, duration_text, study_plan
from training.studies.services import study_launch


def _ints(text: str) -> list[int]:
    try:
        return [plain_int_argument(part) for part in text.replace(",", " ").split()]
    except Exception as exc:
        raise CommandError(f"Expected whole numbers separated by commas: {text!r}.") from exc


class Command(BaseCommand):
    help = (
        "Create a study: expand the training side of a dataset's seeded held-out split, train "
        "the chosen arms (base model, SFT on the expert solutions, NLL on the traces, DAIL "
        "gamma 0.1, DAIL gamma 0) and evaluate each on the held-out side; prints the cost "
        "estimate first. --dry-run prints the plan and queues nothing."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="Dataset name.")
        parser.add_argument("--name", default="")
        parser.add_argument("--model", default="", help="Base model directory.")
        parser.add_argument("--held-out-fraction", type=float, default=0.3)
        parser.add_argument("--split-seed", type=plain_int_argument, default=0)
        parser.add_argument("--training-limit", type=plain_int_argument, default=None)
        parser.add_argument("--held-out-limit", type=plain_int_argument, default=None)
        parser.add_argument(
            "--arms", nargs="+", choices=list(ARMS), default=list(ARMS), help="Default: all."
        )
        parser.add_argument(
            "--acceptance",
            choices=StudyAcceptance.values,
            default=StudyAcceptance.AUTOMATIC,
            help="automatic: every kept trace is trained on, no review; reviewers: the study "
            "waits until the review is said to be done and trains on accepted traces.",
        )
        parser.add_argument(
            "--preset", choices=list(ROLLOUT_PRESETS), default=DEFAULT_ROLLOUT_PRESET
        )
        parser.add_argument("--samples", type=plain_int_argument, default=2)
        parser.add_argument("--expansion-tokens", type=plain_int_argument, default=256)
        parser.add_argument("--kept-rule", choices=list(KEPT_RULES), default=DEFAULT_KEPT_RULE)
        parser.add_argument(
            "--training",
            default="{}",
            help="Training settings shared by the arms (JSON), e.g. '{\"epochs\": 2}'.",
        )
        parser.add_argument(
            "--protocol",
            choices=list(evaluation_engine.EVALUATION_PROTOCOLS),
            default=evaluation_engine.DEFAULT_PROTOCOL,
        )
        parser.add_argument("--n", type=plain_int_argument, default=8, help="Samples per problem.")
        parser.add_argument("--budgets", default="128,256", help="Token budgets, e.g. 128,256.")
        parser.add_argument("--temperature", type=float, default=0.6)
        parser.add_argument("--top-p", type=float, default=0.95)
        parser.add_argument("--top-k", type=plain_int_argument, default=None)
        parser.add_argument("--seed", type=plain_int_argument, default=0)
        parser.add_argument(
            "--template",
            choices=list(evaluation_engine.EVALUATION_TEMPLATES),
            default="default",
            help="The evaluation's learner template by name (worked-example: one solved "
            "example first, for small models that do not write a box when asked); the SFT arm "
            "trains on the same prompt.",
        )
        parser.add_argument(
            "--prompt-template-file",
            default="",
            help="A file holding the evaluation's learner template (instead of --template).",
        )
        parser.add_argument("--dry-run", action="store_true")

    def handle(self, *args, **o):
        from curation.models import Dataset

        dataset = Dataset.objects.filter(name=o["dataset"]).first()
        if dataset is None:
            raise CommandError(f"There is no dataset named {o['dataset']!r}.")
        try:
            training = json.loads(o["training"])
        except (ValueError, RecursionError) as exc:
            raise CommandError(f"--training is not readable JSON: {exc}") from None
        if not isinstance(training, dict):
            raise CommandError("--training must be a JSON object of settings.")
        template = evaluation_engine.EVALUATION_TEMPLATES[o["template"]]
        if o["prompt_template_file"]:
            try:
                with open(o["prompt_template_file"], encoding="utf-8") as handle:
                    template = handle.read()
            except OSError as exc:
                raise CommandError(f"Cannot read the template file: {exc}") from None
        settings = StudySettings(
            name=o["name"] or f"study of {dataset.name}",
            dataset_id=dataset.pk,
            base_model_path=o["model"] or str(base_model_dir()),
            held_out_fraction=o["held_out_fraction"],
            split_seed=o["split_seed"],
            training_limit=o["training_limit"],
            held_out_limit=o["held_out_limit"],
            arms=o["arms"],
            acceptance=o["acceptance"],
            preset=o["preset"],
            samples_per_problem=o["samples"],
            expansion_max_new_tokens=o["expansion_tokens"],
            kept_rule=o["kept_rule"],
            training=training,
            protocol=o["protocol"],
            evaluation_samples=o["n"],
            budgets=_ints(o["budgets"]),
            temperature=o["temperature"],
            top_p=o["top_p"],
            top_k=o["top_k"],
            evaluation_seed=o["seed"],
            prompt_template=template,
        )
        try:
            plan = study_plan(settings=settings)
            self._print_plan(plan)
            if o["dry_run"]:
                self.stdout.write("Dry run: nothing was queued.")
                return
            study = study_launch(settings=settings, launched_by=None)
        except DomainError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(
            self.style.SUCCESS(
                f"Study #{study.pk} {study.name}: {study.get_step_display()} queued."
            )
        )

    def _print_plan(self, plan) -> None:
        estimate = plan.estimate
        self.stdout.write(
            f"{plan.dataset.name}: {len(plan.training_problems)} training and "
            f"{len(plan.held_out_problems)} held-out problems; arms: "
            f"{', '.join(a.label for a in plan.arms)}"
        )
        for step, seconds in estimate["seconds"].items():
            self.stdout.write(
                f"  {step:<10} {estimate['tokens'][step]:>12,} tokens  ≈ {duration_text(seconds)}"
                f"  (at {estimate['tokens_per_second'][step]} tokens/s)"
            )
        self.stdout.write(
            f"  total      ≈ {duration_text(estimate['total_seconds'])} on one worker"
        )
