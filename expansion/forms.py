"""Forms for launching expansion runs and for the reviewer (validation only)."""

from __future__ import annotations

from django import forms

from curation.models import Dataset
from expansion.engine.rollout import RolloutConfig
from expansion.models import Backend, ReviewState
from expansion.services.models import vllm_launch_refusal

_DEFAULTS = RolloutConfig.defaults()


def label_unavailable_vllm(field: forms.ChoiceField) -> str:
    """Label the "vllm" choice of a backend field "not available: why" where vLLM cannot run
    here (launching it is refused by the services as well); returns the reason, '' if none."""
    reason = vllm_launch_refusal()
    if reason:
        field.choices = [
            (value, f"{label} — not available: {reason}" if value == "vllm" else label)
            for value, label in field.choices
        ]
    return reason


class RunLaunchForm(forms.Form):
    name = forms.CharField(max_length=200)
    dataset = forms.ModelChoiceField(
        Dataset.objects.all(), required=False, empty_label="— choose —"
    )
    problem_ids = forms.CharField(
        required=False,
        label="Or these problem ids",
        help_text="Comma- or space-separated external ids (within the dataset, if one is chosen).",
    )
    limit = forms.IntegerField(
        min_value=1, max_value=5000, required=False, help_text="At most this many problems."
    )
    model_path = forms.CharField(max_length=1000, label="Model directory")
    adapter_path = forms.CharField(
        max_length=1000, required=False, label="LoRA adapter as learner (optional)"
    )
    backend = forms.ChoiceField(choices=Backend.choices, initial=Backend.TRANSFORMERS)
    samples_per_problem = forms.IntegerField(min_value=1, max_value=256, initial=4)
    tau = forms.FloatField(
        min_value=0,
        max_value=1,
        initial=_DEFAULTS.get("tau", 0.8),
        help_text="0: pure learner sampling; 1: always the privileged view.",
    )
    proposer = forms.ChoiceField(
        label="Direction",
        choices=[
            ("learner", "learner proposes, privileged verifies"),
            ("privileged", "privileged proposes, learner verifies"),
        ],
        initial=_DEFAULTS["proposer"],
    )
    temperature = forms.FloatField(
        min_value=0.01, max_value=5, initial=_DEFAULTS.get("temperature", 1.0)
    )
    top_p = forms.FloatField(min_value=0.01, max_value=1, initial=_DEFAULTS.get("top_p", 1.0))
    top_k = forms.IntegerField(min_value=1, max_value=1000, initial=_DEFAULTS.get("top_k", 20))
    max_draws = forms.IntegerField(
        min_value=1, max_value=100, initial=_DEFAULTS.get("max_draws", 5)
    )
    max_new_tokens = forms.IntegerField(min_value=1, max_value=32768, initial=256)
    seed = forms.IntegerField(min_value=0, initial=0)
    chunk_problems = forms.IntegerField(
        min_value=1, max_value=1000, initial=4, label="Problems per chunk"
    )
    reasoning = forms.BooleanField(
        required=False, help_text="A reasoning model: the assistant turn starts with <think>."
    )
    require_answers = forms.BooleanField(
        required=False, initial=True, help_text="Refuse verifiable problems without a final answer."
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vllm_unavailable = label_unavailable_vllm(self.fields["backend"])

    def rollout_settings(self) -> dict:
        data = self.cleaned_data
        keys = (
            "tau",
            "proposer",
            "temperature",
            "top_p",
            "top_k",
            "max_draws",
            "max_new_tokens",
            "seed",
        )
        return {k: data[k] for k in keys if k in _DEFAULTS}


class TraceFilterForm(forms.Form):
    run = forms.IntegerField(required=False, widget=forms.HiddenInput)
    problem = forms.CharField(required=False)
    state = forms.ChoiceField(required=False, choices=[("", "any verdict"), *ReviewState.choices])
    correct = forms.ChoiceField(
        required=False, choices=[("", "any answer"), ("yes", "correct"), ("no", "wrong")]
    )
    kept = forms.ChoiceField(
        required=False, choices=[("", "kept or not"), ("yes", "kept"), ("no", "not kept")]
    )
    min_shortcut = forms.FloatField(required=False, label="Shortcut ≥")
    min_fallback = forms.FloatField(required=False, min_value=0, max_value=1, label="Fallback ≥")
    sort = forms.ChoiceField(
        required=False,
        choices=[
            ("shortcut", "max shortcut ↓"),
            ("shortcut_mean", "mean shortcut ↓"),
            ("shortcut_share", "share above threshold ↓"),
            ("fallback", "fallback share ↓"),
            ("length", "longest"),
            ("short", "shortest"),
            ("problem", "problem order"),
            ("newest", "newest"),
        ],
    )


class VerdictForm(forms.Form):
    decision = forms.ChoiceField(
        choices=[(s, label) for s, label in ReviewState.choices if s != ReviewState.UNREVIEWED]
    )
    note = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    base_revision = forms.IntegerField(min_value=0)


class SpanForm(forms.Form):
    start_token = forms.IntegerField(min_value=0)
    end_token = forms.IntegerField(min_value=1)
    note = forms.CharField(required=False, max_length=2000)
