"""The study launch form (validation of what was typed only; `study_plan` decides the rest:
ranges live in the engines' configs and come back as field errors)."""

from __future__ import annotations

import dataclasses
import re

from django import forms

from curation.models import Dataset, DatasetKind
from dailweb.forms import StrictIntegerField, plain_int
from expansion.engine.answers import KEPT_RULES
from expansion.engine.rollout import DEFAULT_ROLLOUT_PRESET, ROLLOUT_PRESETS
from training.engine.config import DailTrainingConfig
from training.engine.evaluation import (
    DEFAULT_PROTOCOL,
    EVALUATION_PROTOCOLS,
    EVALUATION_TEMPLATE,
    SEED_MAX,
)
from training.models import StudyAcceptance
from training.studies.plan import ARMS, StudySettings

# The training settings a study shares across its trained arms (the rest: the form defaults of
# `training_defaults()`; each arm sets its own objective and gamma).
TRAINING_FIELDS = ("epochs", "learning_rate", "effective_batch_size", "max_length", "lora_r")
_CONFIG_HELP = {f.name: f.metadata.get("help", "") for f in dataclasses.fields(DailTrainingConfig)}


def _budgets(value: str) -> list[int]:
    words = [w for w in re.split(r"[\s,;]+", value or "") if w]
    try:
        numbers = [plain_int(w) for w in words]
    except ValueError:
        raise forms.ValidationError("Whole numbers separated by commas, e.g. 128, 256.") from None
    if not numbers:
        raise forms.ValidationError("Give at least one token budget.")
    if any(n < 1 for n in numbers):
        raise forms.ValidationError("Every token budget must be at least 1.")
    return sorted(set(numbers))


class ArmChoiceField(forms.MultipleChoiceField):
    """The arms as checkboxes; each choice's description is shown beside it."""

    def __init__(self, **kwargs) -> None:
        super().__init__(
            choices=[(key, spec.label) for key, spec in ARMS.items()],
            widget=forms.CheckboxSelectMultiple,
            **kwargs,
        )


class StudyLaunchForm(forms.Form):
    """Every `StudySettings` field. Launching needs the `confirm` value that only the Launch
    button of the preview carries (`wants_launch`); any other POST previews the plan."""

    name = forms.CharField(max_length=200)
    dataset = forms.ModelChoiceField(
        Dataset.objects.filter(kind=DatasetKind.VERIFIABLE).order_by("name"),
        empty_label="— choose —",
        help_text="Verifiable datasets only: a study compares pass@k, which needs final answers.",
    )
    base_model_path = forms.CharField(
        max_length=1000,
        label="Base model directory",
        help_text="Every arm starts from this model (expansion, training and evaluation).",
    )
    held_out_fraction = forms.FloatField(
        initial=0.3,
        label="Held-out fraction",
        help_text="This share of the dataset is held out for the evaluations, chosen by a seeded "
        "hash of each problem (the evaluations' split); the rest is trained on.",
    )
    split_seed = StrictIntegerField(min_value=0, max_value=SEED_MAX, initial=0, label="Split seed")
    training_limit = StrictIntegerField(
        min_value=1,
        required=False,
        label="At most this many training problems",
        help_text="Empty: the whole training side (the first in id order otherwise).",
    )
    held_out_limit = StrictIntegerField(
        min_value=1,
        required=False,
        label="At most this many held-out problems",
        help_text="Empty: the whole held-out side.",
    )
    arms = ArmChoiceField(initial=list(ARMS), label="Arms")
    acceptance = forms.ChoiceField(
        choices=StudyAcceptance.choices,
        initial=StudyAcceptance.AUTOMATIC,
        widget=forms.RadioSelect,
        label="Traces trained on",
    )
    preset = forms.ChoiceField(
        label="Rollout preset",
        choices=[(p.name, p.label) for p in ROLLOUT_PRESETS.values()],
        initial=DEFAULT_ROLLOUT_PRESET,
        help_text=" ".join(f"{p.label}: {p.source}" for p in ROLLOUT_PRESETS.values()),
    )
    samples_per_problem = StrictIntegerField(
        min_value=1, initial=2, label="Expansion samples per problem"
    )
    expansion_max_new_tokens = StrictIntegerField(
        min_value=1, initial=256, label="Expansion max new tokens"
    )
    kept_rule = forms.ChoiceField(
        label="Kept rule",
        choices=[(r.name, r.label) for r in KEPT_RULES.values()],
        initial="every_correct",
        help_text=" ".join(f"{r.label}: {r.source}" for r in KEPT_RULES.values()),
    )
    epochs = StrictIntegerField(min_value=1, help_text=_CONFIG_HELP["epochs"])
    learning_rate = forms.FloatField(label="Learning rate", help_text=_CONFIG_HELP["learning_rate"])
    effective_batch_size = StrictIntegerField(
        min_value=1, label="Effective batch", help_text=_CONFIG_HELP["effective_batch_size"]
    )
    max_length = StrictIntegerField(
        min_value=1, label="Maximum length (tokens)", help_text=_CONFIG_HELP["max_length"]
    )
    lora_r = StrictIntegerField(min_value=1, label="LoRA r", help_text=_CONFIG_HELP["lora_r"])
    protocol = forms.ChoiceField(
        choices=[(p.name, p.label) for p in EVALUATION_PROTOCOLS.values()],
        initial=DEFAULT_PROTOCOL,
        label="Evaluation protocol",
        help_text=" ".join(f"{p.label}: {p.source}" for p in EVALUATION_PROTOCOLS.values()),
    )
    evaluation_samples = StrictIntegerField(
        min_value=1,
        initial=8,
        label="Samples per held-out problem (n)",
        help_text="pass@k is reported for every k from 1 to n. Paper: 128.",
    )
    budgets = forms.CharField(
        initial="128, 256",
        label="Token budgets",
        help_text="Sampled once at the largest; lower budgets by truncation.",
    )
    temperature = forms.FloatField(initial=0.6, help_text="Paper: 0.6.")
    top_p = forms.FloatField(initial=0.95, label="Top-p", help_text="Paper: 0.95.")
    top_k = StrictIntegerField(
        min_value=1,
        required=False,
        label="Top-k",
        help_text="Empty: no top-k (the paper's setting).",
    )
    evaluation_seed = StrictIntegerField(
        min_value=0, max_value=SEED_MAX, initial=0, label="Evaluation seed"
    )
    prompt_template = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 5}),
        initial=EVALUATION_TEMPLATE,
        label="Evaluation prompt template",
        help_text="{problem} is replaced by the statement; SFT on the expert solutions trains "
        "after this same prompt.",
    )

    SECTIONS = (
        ("Study", ("name", "dataset", "base_model_path")),
        (
            "Split",
            ("held_out_fraction", "split_seed", "training_limit", "held_out_limit"),
        ),
        ("What is compared", ("arms", "acceptance")),
        ("Expansion", ("preset", "samples_per_problem", "expansion_max_new_tokens", "kept_rule")),
        ("Training (every trained arm)", TRAINING_FIELDS),
        (
            "Evaluation (every arm, on the held-out problems)",
            (
                "protocol",
                "evaluation_samples",
                "budgets",
                "temperature",
                "top_p",
                "top_k",
                "evaluation_seed",
                "prompt_template",
            ),
        ),
    )

    def clean_budgets(self) -> list[int]:
        return _budgets(self.cleaned_data["budgets"])

    def sections(self) -> list[tuple[str, list[forms.BoundField]]]:
        return [(title, [self[name] for name in names]) for title, names in self.SECTIONS]

    def wants_launch(self) -> bool:
        """Only the preview's Launch button (`confirm=yes`) launches."""
        return self.data.get("confirm") == "yes"

    def study_settings(self) -> StudySettings:
        data = self.cleaned_data
        return StudySettings(
            name=data["name"],
            dataset_id=data["dataset"].pk,
            base_model_path=data["base_model_path"],
            held_out_fraction=data["held_out_fraction"],
            split_seed=data["split_seed"],
            arms=tuple(data["arms"]),
            acceptance=data["acceptance"],
            preset=data["preset"],
            samples_per_problem=data["samples_per_problem"],
            expansion_max_new_tokens=data["expansion_max_new_tokens"],
            kept_rule=data["kept_rule"],
            training={name: data[name] for name in TRAINING_FIELDS},
            protocol=data["protocol"],
            evaluation_samples=data["evaluation_samples"],
            budgets=tuple(data["budgets"]),
            temperature=data["temperature"],
            top_p=data["top_p"],
            top_k=data["top_k"],
            evaluation_seed=data["evaluation_seed"],
            prompt_template=data["prompt_template"],
            training_limit=data["training_limit"],
            held_out_limit=data["held_out_limit"],
        )
