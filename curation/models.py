"""Datasets, problems, versioned expert solutions and waypoints.

A solution version never changes once saved (services only ever create them); the newest is
the current one. Jobs and traces point at the exact version they used. Waypoints are spans of
one version's body; editing the solution carries them into the new version where their text
still occurs.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class DatasetKind(models.TextChoices):
    VERIFIABLE = "verifiable", "Verifiable (final answers)"
    PROOF = "proof", "Proofs (no final answer)"


class Dataset(models.Model):
    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=16, choices=DatasetKind.choices)
    licence = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Problem(models.Model):
    dataset = models.ForeignKey(Dataset, on_delete=models.PROTECT, related_name="problems")
    external_id = models.CharField(max_length=200)
    # `curation.ordering.natural_sort_key(external_id)`, set at creation: lists sort by it.
    external_id_order = models.CharField(max_length=400, default="", editable=False)
    statement = models.TextField()
    answer = models.TextField(blank=True)  # empty for proofs
    source = models.CharField(max_length=500, blank=True)
    tags = models.JSONField(default=list, blank=True)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Denormalised for the problem list (kept by the services, never edited by hand).
    current_version_number = models.PositiveIntegerField(default=0)
    waypoint_status = models.CharField(max_length=16, default="none", db_index=True)

    class Meta:
        ordering = ["dataset_id", "external_id_order", "external_id"]
        constraints = [
            models.UniqueConstraint(fields=["dataset", "external_id"], name="problem_unique_id")
        ]
        indexes = [
            models.Index(fields=["dataset", "updated_at"]),
            models.Index(fields=["dataset", "external_id_order"], name="problem_natural_order"),
        ]

    def __str__(self) -> str:
        return f"{self.dataset.name}/{self.external_id}"


class WaypointStatus(models.TextChoices):
    NONE = "none", "No waypoints"
    SUGGESTED = "suggested", "Suggested only"
    EXPERT = "expert", "Marked by an expert"


class SolutionVersion(models.Model):
    problem = models.ForeignKey(Problem, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    body = models.TextField()
    answer = models.TextField(blank=True)  # the problem's answer when this version was saved
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    note = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["problem_id", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["problem", "number"], name="solution_version_unique")
        ]

    def __str__(self) -> str:
        return f"{self.problem} v{self.number}"


class WaypointOrigin(models.TextChoices):
    EXPERT = "expert", "Expert"
    SUGGESTED = "suggested", "Suggested"


class Waypoint(models.Model):
    version = models.ForeignKey(SolutionVersion, on_delete=models.CASCADE, related_name="waypoints")
    start = models.PositiveIntegerField()
    end = models.PositiveIntegerField()
    order = models.PositiveIntegerField()
    origin = models.CharField(max_length=16, choices=WaypointOrigin.choices)

    class Meta:
        ordering = ["version_id", "order"]
        constraints = [
            models.UniqueConstraint(fields=["version", "order"], name="waypoint_order_unique"),
            models.CheckConstraint(
                condition=models.Q(end__gt=models.F("start")), name="waypoint_nonempty"
            ),
        ]

    def __str__(self) -> str:
        return f"waypoint {self.order + 1} of {self.version} ({self.start}-{self.end})"

    def text_in(self, body: str) -> str:
        return body[self.start : self.end]

    @property
    def text(self) -> str:
        return self.version.body[self.start : self.end]
