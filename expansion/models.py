"""Expansion runs, their pinned problems and chunks, the traces they produce, and reviewers'
verdicts and shortcut spans.

A trace's per-token data lives in one compact blob (`expansion.engine.trace_format`), never a
row per token; the summary fields beside it (shortcut scores, fallback share, length, answer)
are what the reviewer queue sorts and filters on.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from curation.models import Problem, SolutionVersion
from dailweb.jobs.models import Job
from expansion.engine.answers import kept_rule_description
from expansion.engine.rollout import ROLLOUT_PRESETS


class Backend(models.TextChoices):
    TRANSFORMERS = "transformers", "transformers (batched, block-verified)"
    VLLM = "vllm", "vLLM"


class ExpansionRun(models.Model):
    name = models.CharField(max_length=200)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    model_path = models.CharField(max_length=1000)
    adapter_path = models.CharField(max_length=1000, blank=True)
    backend = models.CharField(max_length=16, choices=Backend.choices, default=Backend.TRANSFORMERS)
    # Snapshots, so a run is reproducible whatever changes later.
    rollout_config = models.JSONField()  # expansion.engine.rollout.RolloutConfig.to_dict()
    # The preset the settings started from and the fields chosen explicitly over it ('' and {}:
    # recorded before presets existed; rollout_config holds the settings used either way).
    rollout_preset = models.CharField(max_length=32, blank=True, default="")
    rollout_overrides = models.JSONField(default=dict, blank=True)
    # expansion.engine.answers.KEPT_RULES; '' = recorded before kept rules were named (every
    # correct trace, reasoning traces graded too; proofs one seeded trace).
    kept_rule = models.CharField(max_length=32, blank=True, default="")
    templates = models.JSONField()  # expansion.engine.prompts.PromptTemplates.to_dict()
    reasoning = models.BooleanField(default=False)
    samples_per_problem = models.PositiveIntegerField()
    chunk_problems = models.PositiveIntegerField(default=4)
    top_n = models.PositiveIntegerField(default=5)
    shortcut_threshold = models.FloatField(default=2.0)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"run #{self.pk} {self.name}"

    @property
    def kept_rule_description(self) -> str:
        return kept_rule_description(self.kept_rule)

    @property
    def rollout_preset_description(self) -> str:
        preset = ROLLOUT_PRESETS.get(self.rollout_preset)
        if preset is None:
            return "none (recorded before presets existed, or launched without one)"
        return f"{preset.label}. {preset.source}"


class RunProblem(models.Model):
    """One problem of a run, pinned to the solution version (and s~) it was expanded with."""

    run = models.ForeignKey(ExpansionRun, on_delete=models.CASCADE, related_name="run_problems")
    problem = models.ForeignKey(Problem, on_delete=models.PROTECT, related_name="+")
    solution_version = models.ForeignKey(
        SolutionVersion, on_delete=models.PROTECT, related_name="+"
    )
    answer = models.TextField(blank=True)
    partial_solution = models.TextField(blank=True)
    position = models.PositiveIntegerField()

    class Meta:
        ordering = ["run_id", "position"]
        constraints = [
            models.UniqueConstraint(fields=["run", "problem"], name="run_problem_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.run} / {self.problem}"


class ExpansionChunk(models.Model):
    """A slice of a run's problems, expanded by one job on the `gpu` queue."""

    run = models.ForeignKey(ExpansionRun, on_delete=models.CASCADE, related_name="chunks")
    index = models.PositiveIntegerField()
    job = models.OneToOneField(Job, on_delete=models.PROTECT, related_name="expansion_chunk")
    run_problems = models.ManyToManyField(RunProblem, related_name="chunks")

    class Meta:
        ordering = ["run_id", "index"]
        constraints = [models.UniqueConstraint(fields=["run", "index"], name="chunk_unique")]

    def __str__(self) -> str:
        return f"{self.run} chunk {self.index}"


class ReviewState(models.TextChoices):
    UNREVIEWED = "unreviewed", "Unreviewed"
    ACCEPTED = "accepted", "Accepted"
    REJECTED = "rejected", "Rejected"
    NEEDS_FIX = "needs_fix", "Needs fix"


class Trace(models.Model):
    run = models.ForeignKey(ExpansionRun, on_delete=models.CASCADE, related_name="traces")
    run_problem = models.ForeignKey(RunProblem, on_delete=models.CASCADE, related_name="traces")
    sample_index = models.PositiveIntegerField()
    data = models.BinaryField()  # expansion.engine.trace_format.encode_trace
    created_at = models.DateTimeField(default=timezone.now)

    # Summary fields for sorting and filtering.
    length = models.PositiveIntegerField(db_index=True)
    fallback_share = models.FloatField(db_index=True)
    shortcut_max = models.FloatField(db_index=True)
    shortcut_mean_positive = models.FloatField()
    shortcut_share = models.FloatField()  # share of tokens above the run's threshold
    finish_reason = models.CharField(max_length=16)
    error = models.TextField(blank=True)
    answer_extracted = models.TextField(blank=True)
    answer_correct = models.BooleanField(null=True)  # None: not graded (proof, reasoning trace)
    checkers_disagree = models.BooleanField(default=False)
    kept = models.BooleanField(db_index=True)  # by the run's kept rule

    # Review (the latest verdict; the full history is in Verdict).
    review_state = models.CharField(
        max_length=16, choices=ReviewState.choices, default=ReviewState.UNREVIEWED, db_index=True
    )
    claimed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    claimed_at = models.DateTimeField(null=True, blank=True)
    revision = models.PositiveIntegerField(default=0)  # bumped by every verdict

    class Meta:
        ordering = ["run_id", "run_problem_id", "sample_index"]
        constraints = [
            models.UniqueConstraint(fields=["run_problem", "sample_index"], name="trace_unique"),
        ]
        indexes = [
            models.Index(fields=["run", "review_state"]),
            models.Index(fields=["review_state", "claimed_at"]),
        ]

    def __str__(self) -> str:
        return f"trace #{self.pk} ({self.run_problem.problem}, sample {self.sample_index})"


class Verdict(models.Model):
    trace = models.ForeignKey(Trace, on_delete=models.CASCADE, related_name="verdicts")
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    decision = models.CharField(max_length=16, choices=ReviewState.choices)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["trace_id", "-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.decision} by {self.reviewer} on {self.trace_id}"


class LiveSpanManager(models.Manager):
    """Spans not deleted: the default manager, so `trace.shortcut_spans`, the page, exports
    and the training snapshot see only live spans without each remembering to filter."""

    def get_queryset(self):
        return super().get_queryset().filter(deleted_at__isnull=True)


class AllSpansManager(models.Manager):
    """Every span, deleted ones included (history)."""


class ShortcutSpan(models.Model):
    """Tokens [start_token, end_token) of a trace that a reviewer marked as a shortcut.

    Deleting keeps the row (`deleted_at`, `deleted_by`) as history; `objects` holds the live
    spans, `all_objects` every span ever marked.
    """

    trace = models.ForeignKey(Trace, on_delete=models.CASCADE, related_name="shortcut_spans")
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+"
    )
    start_token = models.PositiveIntegerField()
    end_token = models.PositiveIntegerField()
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    deleted_at = models.DateTimeField(null=True, blank=True)
    deleted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )

    objects = LiveSpanManager()
    all_objects = AllSpansManager()

    class Meta:
        ordering = ["trace_id", "start_token"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(end_token__gt=models.F("start_token")), name="span_nonempty"
            )
        ]

    def __str__(self) -> str:
        return f"shortcut {self.start_token}-{self.end_token} on {self.trace_id}"
