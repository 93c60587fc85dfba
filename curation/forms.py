"""Curation forms: validation of what people type; services do the work."""

from __future__ import annotations

import json

from django import forms

from curation.models import Dataset, DatasetKind, WaypointOrigin, WaypointStatus
from curation.services.problems import MAX_ANSWER_CHARS
from curation.spans import Span
from dailweb.forms import STORAGE_MAX, StrictIntegerField

TEXTAREA = {"rows": 14, "spellcheck": "true", "class": "source"}


class ProblemFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Search")
    dataset = forms.ModelChoiceField(
        Dataset.objects.all(), required=False, empty_label="all datasets"
    )
    answer = forms.ChoiceField(
        required=False,
        label="Answer",
        choices=[("", "any"), ("yes", "has an answer"), ("no", "no answer")],
    )
    waypoints = forms.ChoiceField(
        required=False, choices=[("", "any waypoints"), *WaypointStatus.choices]
    )
    author = forms.CharField(required=False, label="Author")


class DatasetForm(forms.Form):
    name = forms.CharField(max_length=200)
    kind = forms.ChoiceField(choices=DatasetKind.choices)
    licence = forms.CharField(max_length=200, required=False)
    description = forms.CharField(widget=forms.Textarea(attrs={"rows": 3}), required=False)


class WaypointsField(forms.CharField):
    """Waypoints travel as JSON: [[start, end, origin], ...] in order."""

    widget = forms.HiddenInput

    def to_python(self, value):
        value = super().to_python(value)
        if not value:
            return []
        try:
            items = json.loads(value)
            spans = [
                Span(s, e, o if o in WaypointOrigin.values else WaypointOrigin.EXPERT)
                for s, e, o in items
            ]
        except (ValueError, TypeError, RecursionError) as exc:
            raise forms.ValidationError("The waypoints could not be read.") from exc
        # Offsets are plain whole numbers: not "7", 7.0 or true.
        if not all(_is_offset(span.start) and _is_offset(span.end) for span in spans):
            raise forms.ValidationError("The waypoints could not be read.")
        return spans


def _is_offset(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= STORAGE_MAX


class SolutionForm(forms.Form):
    """The editor: solution body, answer, waypoints (and the body they were marked on)."""

    body = forms.CharField(
        label="Solution (Markdown + LaTeX)", widget=forms.Textarea(attrs=TEXTAREA), strip=False
    )
    answer = forms.CharField(label="Final answer", required=False, max_length=MAX_ANSWER_CHARS)
    note = forms.CharField(label="What changed", required=False, max_length=500)
    waypoints = WaypointsField(required=False)
    waypoints_body = forms.CharField(required=False, strip=False, widget=forms.HiddenInput)
    # The version the editor was opened on: a save is refused when a newer one exists.
    base_version = StrictIntegerField(min_value=0, required=False, widget=forms.HiddenInput)


class ProblemCreateForm(SolutionForm):
    dataset = forms.ModelChoiceField(Dataset.objects.all())
    external_id = forms.CharField(
        label="Problem id",
        required=False,
        max_length=200,
        help_text="Leave empty for an automatic id.",
    )
    statement = forms.CharField(
        label="Problem (Markdown + LaTeX)",
        widget=forms.Textarea(attrs={"rows": 6, "class": "source"}),
        strip=False,
    )
    source = forms.CharField(required=False, max_length=500)
    tags = forms.CharField(required=False, help_text="Comma-separated.")

    field_order = [
        "dataset",
        "external_id",
        "statement",
        "body",
        "answer",
        "source",
        "tags",
        "note",
    ]


class ProblemDetailsForm(forms.Form):
    statement = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6, "class": "source"}), strip=False
    )
    source = forms.CharField(required=False, max_length=500)
    tags = forms.CharField(required=False)


class ImportForm(forms.Form):
    # Empty files reach the import service, which refuses them as the command line does.
    file = forms.FileField(label="JSONL file", allow_empty_file=True)
    dataset = forms.ModelChoiceField(
        Dataset.objects.all(), required=False, empty_label="— a new dataset —"
    )
    new_dataset_name = forms.CharField(required=False, max_length=200, label="New dataset name")
    new_dataset_kind = forms.ChoiceField(
        choices=DatasetKind.choices, required=False, label="New dataset kind"
    )
    only_valid_lines = forms.BooleanField(
        required=False,
        label="Import only the valid lines",
        help_text="Without this, a file with any bad line imports nothing.",
    )

    def clean(self):
        data = super().clean()
        if not data.get("dataset") and not (data.get("new_dataset_name") or "").strip():
            raise forms.ValidationError("Choose a dataset or name a new one.")
        return data


def split_tags(value: str) -> list[str]:
    return [tag.strip() for tag in (value or "").split(",") if tag.strip()]
