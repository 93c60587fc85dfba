"""Forms of evaluations: the launch form and a person's ruling on a sample (validation only;
the services decide)."""

from __future__ import annotations

import re

from django import forms

from curation.models import Dataset
from dailweb.forms import StrictIntegerField, plain_int
from training.engine.evaluation import (
    DEFAULT_PROTOCOL,
    EVALUATION_PROTOCOLS,
    EVALUATION_TEMPLATE,
    MAX_TOP_K,
    SEED_MAX,
)
from training.models import EvaluationBackend, EvaluationSplit, Ruling


def _int_list(value: str, label: str) -> list[int]:
    words = [w for w in re.split(r"[\s,;]+", value or "") if w]
    try:
        numbers = [plain_int(w) for w in words]
    except ValueError:
        raise forms.ValidationError(f"{label}: whole numbers separated by commas.") from None
    if not numbers:
        raise forms.ValidationError(f"{label}: give at least one.")
    if any(n < 1 for n in numbers):
        raise forms.ValidationError(f"{label}: every value must be at least 1.")
    return sorted(set(numbers))


class EvaluationLaunchForm(forms.Form):
    name = forms.CharField(max_length=200)
    base_model_path = forms.CharField(max_length=1000, label="Base model directory")
    adapter_path = forms.CharField(
        max_length=1000,
        required=False,
        label="LoRA adapter directory (optional)",
        widget=forms.TextInput(attrs={"list": "known-adapters"}),
        help_text="Empty: evaluate the base model itself. The adapter's adapter_config.json must "
        "name this base model.",
    )
    backend = forms.ChoiceField(
        choices=EvaluationBackend.choices, initial=EvaluationBackend.TRANSFORMERS
    )
    dataset = forms.ModelChoiceField(
        Dataset.objects.all(), required=False, empty_label="— choose —"
    )
    split = forms.ChoiceField(
        choices=EvaluationSplit.choices, initial=EvaluationSplit.ALL, label="Problem set"
    )
    held_out_fraction = forms.FloatField(
        min_value=0.01,
        max_value=0.99,
        initial=0.2,
        required=False,
        help_text="Held-out split: this share of the dataset, chosen by a seeded hash of each "
        "problem (a problem never changes side when others are added).",
    )
    split_seed = StrictIntegerField(
        min_value=0, max_value=SEED_MAX, initial=0, required=False, label="Split seed"
    )
    problem_ids = forms.CharField(
        required=False,
        label="Problem ids",
        help_text="Listed ids: comma- or space-separated external ids (within the dataset, if one is chosen).",
    )
    limit = StrictIntegerField(
        min_value=1,
        max_value=5000,
        required=False,
        help_text="At most this many problems (the first in id order).",
    )
    samples_per_problem = StrictIntegerField(
        min_value=1,
        max_value=1024,
        initial=8,
        label="Samples per problem (n)",
        help_text="Paper: 128.",
    )
    ks = forms.CharField(
        initial="1, 2, 4, 8", label="k values", help_text="Each k at most n. Paper: 1, 2, 4, … 128."
    )
    budgets = forms.CharField(
        initial="128, 256",
        label="Token budgets",
        help_text="Sampled once with the largest as max_new_tokens; lower budgets by truncation. Paper: 512, 1024, 2048, 4096.",
    )
    temperature = forms.FloatField(
        min_value=0.01, max_value=5, initial=0.6, help_text="Paper: 0.6."
    )
    top_p = forms.FloatField(min_value=0.01, max_value=1, initial=0.95, help_text="Paper: 0.95.")
    top_k = StrictIntegerField(
        min_value=1,
        max_value=MAX_TOP_K,
        required=False,
        label="Top-k",
        help_text="Sample from the k most likely tokens only (after temperature, before top-p). "
        "Empty: no top-k cut (the paper uses none). Evaluations with different top-k are "
        "flagged as not comparable.",
    )
    protocol = forms.ChoiceField(
        choices=[(p.name, p.label) for p in EVALUATION_PROTOCOLS.values()],
        initial=DEFAULT_PROTOCOL,
        required=False,  # absent (older clients): the workbench protocol
        help_text=" ".join(f"{p.label}: {p.source}" for p in EVALUATION_PROTOCOLS.values())
        + " Evaluations under different protocols are flagged as not comparable.",
    )
    seed = StrictIntegerField(min_value=0, max_value=SEED_MAX, initial=0)
    batch_size = StrictIntegerField(
        min_value=1,
        max_value=1024,
        initial=8,
        help_text="Samples generated together (the unit of resumption).",
    )
    prompt_template = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 6}),
        initial=EVALUATION_TEMPLATE,
        help_text="The learner prompt plus a request for a boxed answer; {problem} is replaced by the statement.",
    )
    reasoning = forms.BooleanField(
        required=False, help_text="A reasoning model: the assistant turn starts with <think>."
    )
    allow_training_overlap = forms.BooleanField(
        required=False,
        label="Evaluate anyway on problems from the adapter's training data",
        help_text="Without this, problems listed in the adapter's dail-training.json are refused; with it they are flagged on every page.",
    )

    def clean_ks(self) -> list[int]:
        return _int_list(self.cleaned_data["ks"], "k values")

    def clean_protocol(self) -> str:
        return self.cleaned_data["protocol"] or DEFAULT_PROTOCOL

    def clean_budgets(self) -> list[int]:
        return _int_list(self.cleaned_data["budgets"], "Token budgets")

    def clean(self) -> dict:
        data = super().clean()
        n, ks = data.get("samples_per_problem"), data.get("ks")
        if n and ks and max(ks) > n:
            self.add_error(
                "ks", f"k = {max(ks)} is larger than n = {n}: pass@k needs at least k samples."
            )
        return data


class RulingForm(forms.Form):
    ruling = forms.ChoiceField(
        choices=[("", "no ruling (use the checkers)"), *Ruling.choices], required=False
    )
    note = forms.CharField(required=False, max_length=2000)
    next = forms.CharField(required=False, max_length=500)
