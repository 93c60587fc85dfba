"""Models of the training app: evaluations and training runs.

Each part has its own headed section; keep them apart.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from curation.models import Dataset, Problem
from dailweb.jobs.models import Job

# =============================================================================================
# Evaluation: pass@k and pass@k against token budget of a base model or a LoRA adapter.
#
# One Evaluation = one model (base, or base + adapter) on a pinned set of problems, sampled
# by one job on the `gpu` queue. Every sample is a row (its text, token count and the
# checkers' verdicts); metrics are computed from the rows when read, so a person's ruling
# on a sample changes them at once.
# =============================================================================================


class EvaluationBackend(models.TextChoices):
    TRANSFORMERS = "transformers", "transformers"
    VLLM = "vllm", "vLLM (with LoRA adapters)"


class EvaluationSplit(models.TextChoices):
    ALL = "all", "All problems of the dataset"
    HELD_OUT = "held_out", "Seeded held-out split of the dataset"
    IDS = "ids", "Listed problem ids"


class Evaluation(models.Model):
    name = models.CharField(max_length=200)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    job = models.OneToOneField(
        Job, null=True, blank=True, on_delete=models.PROTECT, related_name="evaluation"
    )

    # The model.
    base_model_path = models.CharField(max_length=1000)
    adapter_path = models.CharField(max_length=1000, blank=True)  # empty: the base model
    backend = models.CharField(
        max_length=16, choices=EvaluationBackend.choices, default=EvaluationBackend.TRANSFORMERS
    )

    # The problem set (the problems themselves are pinned in EvaluationProblem).
    dataset = models.ForeignKey(
        Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    split = models.CharField(max_length=16, choices=EvaluationSplit.choices)
    split_params = models.JSONField(default=dict, blank=True)  # fraction, seed, limit, ids

    # Sampling and metrics settings (snapshots).
    samples_per_problem = models.PositiveIntegerField()
    ks = models.JSONField()  # sorted list of k
    budgets = models.JSONField()  # sorted token budgets; the largest is max_new_tokens
    temperature = models.FloatField()
    top_p = models.FloatField()
    # Sample from the k most likely tokens only (after temperature, before top-p); None: no
    # top-k (every evaluation before the setting existed).
    top_k = models.PositiveIntegerField(null=True, blank=True)
    seed = models.BigIntegerField(default=0)
    batch_size = models.PositiveIntegerField(default=8)
    prompt_template = models.TextField()
    reasoning = models.BooleanField(default=False)
    # training.engine.evaluation.EVALUATION_PROTOCOLS: "workbench" (plain sampling; every
    # evaluation before protocols were named) or "release" (the paper's eval/eval.py).
    protocol = models.CharField(max_length=16, default="workbench")

    # Training-data overlap (from the adapter's dail-training.json, when it has one).
    training_snapshot = models.CharField(max_length=1000, blank=True)  # the file read, if any
    training_overlap = models.PositiveIntegerField(default=0)
    overlap_allowed = models.BooleanField(default=False)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"evaluation #{self.pk} {self.name}"

    @property
    def max_new_tokens(self) -> int:
        return max(self.budgets)

    @property
    def protocol_description(self) -> str:
        from training.engine.evaluation import EVALUATION_PROTOCOLS

        known = EVALUATION_PROTOCOLS.get(self.protocol)
        return f"{known.label}. {known.source}" if known else f"unknown protocol {self.protocol!r}"

    @property
    def model_label(self) -> str:
        from pathlib import Path

        base = Path(self.base_model_path).name
        return f"{base} + {Path(self.adapter_path).name}" if self.adapter_path else base


class EvaluationProblem(models.Model):
    """One problem of an evaluation, with the answer it was judged against."""

    evaluation = models.ForeignKey(Evaluation, on_delete=models.CASCADE, related_name="problems")
    problem = models.ForeignKey(Problem, on_delete=models.PROTECT, related_name="+")
    answer = models.TextField()  # the problem's answer when the evaluation was created
    position = models.PositiveIntegerField()
    in_training = models.BooleanField(default=False)  # listed in the adapter's training snapshot

    class Meta:
        ordering = ["evaluation_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["evaluation", "problem"], name="eval_problem_unique")
        ]

    def __str__(self) -> str:
        return f"{self.evaluation} / {self.problem}"


class Ruling(models.TextChoices):
    CORRECT = "correct", "Correct"
    INCORRECT = "incorrect", "Incorrect"


class EvaluationSample(models.Model):
    eval_problem = models.ForeignKey(
        EvaluationProblem, on_delete=models.CASCADE, related_name="samples"
    )
    sample_index = models.PositiveIntegerField()
    text = models.TextField()
    token_count = models.PositiveIntegerField()
    finish_reason = models.CharField(max_length=16)  # eos | length | stop (a stop string)
    forced_tokens = models.PositiveIntegerField(default=0)  # of token_count: force-answer pass
    created_at = models.DateTimeField(default=timezone.now)

    # The automatic verdict.
    answer_extracted = models.TextField(blank=True)
    has_answer = models.BooleanField(default=False)  # a \boxed{} was found
    math_verify = models.BooleanField(null=True)  # None: math-verify could not read it
    string_match = models.BooleanField(default=False)
    auto_correct = models.BooleanField(default=False)
    checkers_disagree = models.BooleanField(default=False, db_index=True)

    # A person's ruling overrides the automatic verdict in every metric.
    ruling = models.CharField(max_length=16, choices=Ruling.choices, blank=True)
    ruled_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    ruled_at = models.DateTimeField(null=True, blank=True)
    ruling_note = models.TextField(blank=True)

    class Meta:
        ordering = ["eval_problem_id", "sample_index"]
        constraints = [
            models.UniqueConstraint(
                fields=["eval_problem", "sample_index"], name="eval_sample_unique"
            )
        ]

    def __str__(self) -> str:
        return f"sample {self.sample_index} of {self.eval_problem}"

    @property
    def correct(self) -> bool:
        """The verdict metrics use: the ruling when there is one, else the checkers'."""
        if self.ruling:
            return self.ruling == Ruling.CORRECT
        return self.auto_correct

    @property
    def needs_ruling(self) -> bool:
        return self.checkers_disagree and not self.ruling


# =============================================================================================
# Training runs: a LoRA adapter trained with the DAIL contrastive objective (or the NLL
# baseline) on an exact snapshot of accepted traces, by one job on the `gpu` queue.
#
# The snapshot is frozen at launch: the training records (problem, solution, s~, templates,
# token ids, shortcut spans) are written to a gzip JSONL file under the run's output directory
# and its SHA-256 is kept here with the trace and problem ids, so later verdicts, span edits or
# problem edits never change a launched run (the job refuses a file whose hash changed).
# Per-step metrics are rows (TrainingMetric) so the page can draw them while the job runs.
# =============================================================================================


class TrainingObjective(models.TextChoices):
    DAIL = "dail", "DAIL contrastive"
    NLL = "nll", "NLL baseline (SFT on the traces)"


# Flags of accepted traces the launch counts and can leave out (conditions:
# training.services.training.trace_flag_q), in display order: flag -> label.
TRACE_FLAGS: dict[str, str] = {
    "incorrect": "incorrect answer",
    "no_answer": "no answer found",
    "truncated": "truncated at the token budget",
    "not_kept": "not kept by the run's kept rule",
}


def data_filter_rows(data_filter: dict) -> list[tuple[str, int, int | None]]:
    """(label, accepted traces with the flag, left out or None when kept in) per flag of a
    run's `data_filter`; empty for runs launched before flags were counted."""
    if not data_filter:
        return []
    flagged = data_filter.get("flagged", {})
    left_out = data_filter.get("left_out", {})
    chosen = set(data_filter.get("leave_out", []))
    return [
        (label, int(flagged.get(flag, 0)), int(left_out.get(flag, 0)) if flag in chosen else None)
        for flag, label in TRACE_FLAGS.items()
    ]


class TrainingRun(models.Model):
    name = models.CharField(max_length=200)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    job = models.OneToOneField(
        Job, null=True, blank=True, on_delete=models.PROTECT, related_name="training_run"
    )

    # What is trained, and how (snapshots).
    base_model_path = models.CharField(max_length=1000)  # resolved
    objective = models.CharField(max_length=8, choices=TrainingObjective.choices)
    config = models.JSONField()  # training.engine.config.DailTrainingConfig.to_dict()

    # The data snapshot.
    source_runs = models.JSONField(default=list)  # [{"id", "name", "model_path", ...}]
    trace_ids = models.JSONField(default=list)
    problem_ids = models.JSONField(default=list)  # database ids (dail-training.json)
    snapshot_file = models.CharField(max_length=1000)
    snapshot_sha256 = models.CharField(max_length=64)
    snapshot_traces = models.PositiveIntegerField(default=0)
    snapshot_spans = models.PositiveIntegerField(default=0)  # reviewer-marked shortcut spans
    excluded = models.JSONField(default=dict, blank=True)  # review state -> traces left out
    # Accepted traces by flag (incorrect, no answer, truncated, not kept), which flags the
    # admin chose to leave out, and how many were: training.services.training.TrainingPlan.
    data_filter = models.JSONField(default=dict, blank=True)

    # What fitting to max_length did (computed at launch, confirmed by the job).
    examples_used = models.PositiveIntegerField(default=0)
    overlong_truncated = models.PositiveIntegerField(default=0)
    overlong_skipped = models.PositiveIntegerField(default=0)
    prompt_too_long = models.PositiveIntegerField(default=0)
    response_tokens_dropped = models.PositiveIntegerField(default=0)
    empty_traces = models.PositiveIntegerField(default=0)

    # Outputs.
    output_dir = models.CharField(max_length=1000)
    total_steps = models.PositiveIntegerField(default=0)
    last_checkpoint = models.CharField(max_length=1000, blank=True)
    adapter_path = models.CharField(max_length=1000, blank=True)  # set when training finished
    final_metrics = models.JSONField(default=dict, blank=True)
    # ||LoRA update||_F of the adapter (training.engine.adapter_motion); None: no adapter yet.
    update_norm = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"training run #{self.pk} {self.name}"

    @property
    def did_not_move(self) -> bool:
        """The adapter's update is (about) zero: it changes nothing about the base model."""
        from training.engine.adapter_motion import did_not_move

        return did_not_move(self.update_norm)

    @property
    def data_filter_rows(self) -> list[tuple[str, int, int | None]]:
        return data_filter_rows(self.data_filter)

    @property
    def loss_normalisation(self) -> str:
        """The run's recorded normalisation (runs stored before the setting: per token)."""
        from training.engine.config import LEGACY_DEFAULTS

        return str(self.config.get("loss_normalisation", LEGACY_DEFAULTS["loss_normalisation"]))

    @property
    def gamma(self) -> float:
        return float(self.config.get("gamma", 0.0))

    @property
    def epochs(self) -> int:
        return int(self.config.get("epochs", 1))

    @property
    def excluded_counts(self) -> list[tuple[str, int]]:
        """Traces left out by review state, in the review states' order (PostgreSQL's jsonb
        does not keep the stored key order)."""
        from expansion.models import ReviewState

        order = {state: i for i, state in enumerate(ReviewState.values)}
        return sorted(self.excluded.items(), key=lambda item: (order.get(item[0], 99), item[0]))

    @property
    def base_model_name(self) -> str:
        from pathlib import Path

        return Path(self.base_model_path).name


class TrainingMetric(models.Model):
    """One optimizer step's metrics (token-weighted over the step's accumulated batch)."""

    run = models.ForeignKey(TrainingRun, on_delete=models.CASCADE, related_name="metrics")
    step = models.PositiveIntegerField()
    epoch = models.FloatField()
    loss = models.FloatField()
    kl_privileged = models.FloatField(null=True, blank=True)  # DAIL only
    kl_negative = models.FloatField(null=True, blank=True)  # DAIL only
    nll = models.FloatField(null=True, blank=True)  # NLL only
    lr = models.FloatField()
    grad_norm = models.FloatField(null=True, blank=True)
    tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["run_id", "step"]
        constraints = [
            models.UniqueConstraint(fields=["run", "step"], name="training_metric_unique")
        ]

    def __str__(self) -> str:
        return f"{self.run} step {self.step}"


# =============================================================================================
# Studies: the paper's comparison run through the product. One Study = a dataset split into
# training and held-out problems (the evaluations' seeded hash split, pinned at creation), an
# expansion run over the training side, one training run per trained arm, and one evaluation
# per arm on the held-out side. The study only orders and records existing jobs (expansion
# chunks, training, evaluation): each step is an ordinary job, cancelled and retried as one;
# `training.studies.services.study_advance` launches the next step when one finishes.
# =============================================================================================


class StudyAcceptance(models.TextChoices):
    AUTOMATIC = "automatic", "Automatic: every kept trace is trained on (no reviewer saw them)"
    REVIEWERS = "reviewers", "Reviewers' verdicts: accepted traces only (the study waits)"


class StudyState(models.TextChoices):
    RUNNING = "running", "Running"
    AWAITING_REVIEW = "awaiting_review", "Waiting for review"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"


class StudyStep(models.TextChoices):
    EXPANSION = "expansion", "Expansion"
    REVIEW = "review", "Review"
    TRAINING = "training", "Training"
    EVALUATION = "evaluation", "Evaluation"
    DONE = "done", "Done"


class Study(models.Model):
    name = models.CharField(max_length=200)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="+")
    base_model_path = models.CharField(max_length=1000)  # resolved
    held_out_fraction = models.FloatField()
    split_seed = models.BigIntegerField(default=0)
    # The split, pinned (database ids, in the dataset's order).
    training_problem_ids = models.JSONField(default=list)
    held_out_problem_ids = models.JSONField(default=list)

    acceptance = models.CharField(max_length=16, choices=StudyAcceptance.choices)
    # Snapshots of what each step is launched with (training.studies.plan.StudySettings).
    expansion_settings = models.JSONField(default=dict)
    training_settings = models.JSONField(default=dict)  # DailTrainingConfig fields, all arms
    evaluation_settings = models.JSONField(default=dict)
    estimate = models.JSONField(default=dict)  # tokens and seconds per step, at creation

    expansion_run = models.OneToOneField(
        "expansion.ExpansionRun",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="study",
    )
    review_done_at = models.DateTimeField(null=True, blank=True)  # reviewers' acceptance only

    state = models.CharField(max_length=16, choices=StudyState.choices, default=StudyState.RUNNING)
    step = models.CharField(max_length=16, choices=StudyStep.choices, default=StudyStep.EXPANSION)
    state_reason = models.TextField(blank=True)  # why it failed, or what it waits for

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "studies"

    def __str__(self) -> str:
        return f"study #{self.pk} {self.name}"

    @property
    def is_active(self) -> bool:
        return self.state in (StudyState.RUNNING, StudyState.AWAITING_REVIEW)


class StudyArm(models.Model):
    """One arm of a study (`training.studies.plan.ARMS`): its training run (none for the
    base model) and its evaluation on the held-out problems."""

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="arms")
    key = models.CharField(max_length=32)
    position = models.PositiveIntegerField()
    training_run = models.OneToOneField(
        TrainingRun, null=True, blank=True, on_delete=models.PROTECT, related_name="study_arm"
    )
    evaluation = models.OneToOneField(
        Evaluation, null=True, blank=True, on_delete=models.PROTECT, related_name="study_arm"
    )
    launch_error = models.TextField(blank=True)  # a step refused at launch (e.g. no data)

    class Meta:
        ordering = ["study_id", "position"]
        constraints = [models.UniqueConstraint(fields=["study", "key"], name="study_arm_unique")]

    def __str__(self) -> str:
        return f"{self.study} / {self.key}"
