"""Forms for launching jobs from the dashboard (validation only; services do the work)."""

from __future__ import annotations

from django import forms

from dailweb.forms import StrictIntegerField
from dailweb.jobs.builtin_kinds import WORKER_CHECK_MAX_STEPS
from dailweb.jobs.models import JobState
from dailweb.jobs.registry import QUEUES, job_kinds


class LaunchForm(forms.Form):
    """Base of every dashboard launch form: launching needs the `confirm` field that the
    page's Launch button carries (`<button name="confirm" value="yes">`), so a bare or empty
    POST to a launch URL starts nothing, even for a job that takes no settings."""

    CONFIRM_MESSAGE = "Nothing was launched: press the Launch button to confirm."

    def clean(self) -> dict:
        data = super().clean()
        try:
            forms.BooleanField(required=True).clean(self.data.get("confirm"))
        except forms.ValidationError:
            raise forms.ValidationError(self.CONFIRM_MESSAGE, code="unconfirmed") from None
        return data


class WorkerCheckForm(LaunchForm):
    queue = forms.ChoiceField(choices=[(q, q) for q in QUEUES], initial="default")
    steps = StrictIntegerField(min_value=1, max_value=WORKER_CHECK_MAX_STEPS, initial=20)
    seconds_per_step = forms.FloatField(min_value=0, max_value=60, initial=0.5)


class JobFilterForm(forms.Form):
    state = forms.ChoiceField(choices=[("", "any state"), *JobState.choices], required=False)
    kind = forms.ChoiceField(required=False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["kind"].choices = [("", "any kind")] + [
            (kind.name, kind.label) for kind in job_kinds()
        ]
