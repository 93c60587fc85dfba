"""Forms for launching expansion runs and for the reviewer (validation only)."""

from __future__ import annotations

import json

from django import forms

from curation.models import Dataset
from dailweb.forms import StrictIntegerField
from expansion.engine.answers import DEFAULT_KEPT_RULE, KEPT_RULES
from expansion.engine.rollout import DEFAULT_ROLLOUT_PRESET, ROLLOUT_PRESETS, SEED_MAX
from expansion.models import Backend, ReviewState
from expansion.services.models import vllm_launch_refusal
from expansion.services.runs import DEFAULT_CHUNK_TOKENS, MAX_CHUNK_TOKENS

PRESET_FIELDS = ("tau", "proposer", "temperature", "top_p", "top_k", "max_draws")


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
    limit = StrictIntegerField(
        min_value=1, max_value=5000, required=False, help_text="At most this many problems."
    )
    model_path = forms.CharField(max_length=1000, label="Model directory")
    adapter_path = forms.CharField(
        max_length=1000, required=False, label="LoRA adapter as learner (optional)"
    )
    backend = forms.ChoiceField(choices=Backend.choices, initial=Backend.TRANSFORMERS)
    samples_per_problem = StrictIntegerField(min_value=1, max_value=256, initial=4)
    preset = forms.ChoiceField(
        label="Rollout preset",
        choices=[(p.name, p.label) for p in ROLLOUT_PRESETS.values()],
        initial=DEFAULT_ROLLOUT_PRESET,
        help_text=" ".join(f"{p.label}: {p.source}" for p in ROLLOUT_PRESETS.values())
        + " The six settings below are blank to take the preset's value; a value typed there "
        "overrides it (the run records the preset and the overrides).",
    )
    tau = forms.FloatField(
        min_value=0,
        max_value=1,
        required=False,
        help_text="0: pure learner sampling; 1: always the privileged view. Blank: the preset's.",
    )
    proposer = forms.ChoiceField(
        label="Direction",
        required=False,
        choices=[
            ("", "from the preset"),
            ("learner", "learner proposes, privileged verifies"),
            ("privileged", "privileged proposes, learner verifies"),
        ],
    )
    temperature = forms.FloatField(min_value=0.01, max_value=5, required=False)
    top_p = forms.FloatField(min_value=0.01, max_value=1, required=False)
    top_k = StrictIntegerField(min_value=1, max_value=1000, required=False)
    max_draws = StrictIntegerField(min_value=1, max_value=100, required=False)
    max_new_tokens = StrictIntegerField(min_value=1, max_value=32768, initial=256)
    seed = StrictIntegerField(min_value=0, max_value=SEED_MAX, initial=0)
    chunk_tokens = StrictIntegerField(
        min_value=1,
        max_value=MAX_CHUNK_TOKENS,
        initial=DEFAULT_CHUNK_TOKENS,
        label="Work per chunk (tokens)",
        help_text="Problems × samples × max new tokens in one chunk job, so that every chunk "
        "takes about as long on any worker. Keep it at least max batch size × max new tokens "
        "so the engine's batch stays full. This CPU (~60 tokens/s): 65,536 ≈ 18 minutes; a GPU "
        'with vLLM: millions (see the README, "Sizing chunks").',
    )
    reasoning = forms.BooleanField(
        required=False, help_text="A reasoning model: the assistant turn starts with <think>."
    )
    require_answers = forms.BooleanField(
        required=False, initial=True, help_text="Refuse verifiable problems without a final answer."
    )
    kept_rule = forms.ChoiceField(
        label="Kept rule",
        choices=[(r.name, r.label) for r in KEPT_RULES.values()],
        initial=DEFAULT_KEPT_RULE,
        help_text=" ".join(f"{r.label}: {r.source}" for r in KEPT_RULES.values())
        + " Every trace is stored either way; the rule marks which are kept.",
    )

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vllm_unavailable = label_unavailable_vllm(self.fields["backend"])
        # Blank preset fields show the chosen preset's value (js/run_launch.js follows changes).
        chosen = ROLLOUT_PRESETS.get(self.data.get("preset") or "", None)
        values = (chosen or ROLLOUT_PRESETS[DEFAULT_ROLLOUT_PRESET]).settings
        for name in PRESET_FIELDS:
            widget = self.fields[name].widget
            if name != "proposer":
                widget.attrs["placeholder"] = f"preset: {values[name]}"
        self.fields["preset"].widget.attrs["data-presets"] = json.dumps(
            {p.name: {k: p.settings[k] for k in PRESET_FIELDS} for p in ROLLOUT_PRESETS.values()}
        )

    def rollout_settings(self) -> dict:
        """The rollout fields given explicitly (overrides of the preset)."""
        data = self.cleaned_data
        chosen = {k: data[k] for k in PRESET_FIELDS if data.get(k) not in (None, "")}
        return chosen | {"max_new_tokens": data["max_new_tokens"], "seed": data["seed"]}


class TraceFilterForm(forms.Form):
    run = StrictIntegerField(required=False, widget=forms.HiddenInput)
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
    base_revision = StrictIntegerField(min_value=0)
    # Accepting a trace with a wrong, missing or cut-off answer needs this (the service checks).
    confirm_incorrect = forms.BooleanField(required=False)


class SpanForm(forms.Form):
    start_token = StrictIntegerField(min_value=0)
    end_token = StrictIntegerField(min_value=1)
    note = forms.CharField(required=False, max_length=2000)
