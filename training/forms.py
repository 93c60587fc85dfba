"""Forms of training runs (validation only; the services decide)."""

from __future__ import annotations

from django import forms

from curation.models import Dataset
from dailweb.forms import StrictIntegerField
from training.engine.config import LORA_TARGETS, SEED_MAX
from training.models import TRACE_FLAGS, TrainingObjective
from training.services.expert_solutions import EXPERT_SOURCE, ExpertSolutionsChoice


class ExpansionRunChoiceField(forms.ModelMultipleChoiceField):
    def label_from_instance(self, obj) -> str:
        accepted = getattr(obj, "accepted_count", None)
        counts = (
            f" — {accepted} accepted of {obj.trace_count} traces" if accepted is not None else ""
        )
        flagged = [
            f"{getattr(obj, f'accepted_{flag}', 0)} {label}"
            for flag, label in TRACE_FLAGS.items()
            if getattr(obj, f"accepted_{flag}", 0)
        ]
        if flagged:
            counts += f" (of those accepted: {', '.join(flagged)})"
        return f"#{obj.pk} {obj.name}{counts} · {obj.model_path}"


def _release(value: object) -> str:
    return f"Release: {value}."


TRACES_SOURCE = "traces"


class TrainingLaunchForm(forms.Form):
    """A training run's settings. Initial values are the release defaults scaled for the
    embedded model (`training.services.training.EMBEDDED_SCALE`); help texts give the release
    values. Range checks here catch typos early; the engine's config validates the rest."""

    name = forms.CharField(max_length=200)
    data_source = forms.ChoiceField(
        choices=[
            (TRACES_SOURCE, "Accepted traces of expansion runs (DAIL or NLL)"),
            (
                EXPERT_SOURCE,
                "Expert solutions of a dataset (NLL only: supervised fine-tuning on the "
                "solutions, the paper's direct-SFT baseline)",
            ),
        ],
        initial=TRACES_SOURCE,
        required=False,  # not posted: the traces (the form before this choice existed)
        widget=forms.RadioSelect,
        label="Data source",
    )
    expansion_runs = ExpansionRunChoiceField(
        queryset=None,
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Data: accepted traces of these expansion runs",
        help_text="Frozen at launch: traces accepted later, or rejected later, do not change "
        "the run. Rejected, unreviewed and needs-fix traces are never used.",
    )
    dataset = forms.ModelChoiceField(
        Dataset.objects.order_by("name"),
        required=False,
        empty_label="— choose —",
        label="Data: expert solutions of this dataset",
        help_text="The current solution version of each problem, frozen at launch, after the "
        "evaluation's learner prompt; the answer is appended in \\boxed{} where the solution "
        "has no box (the answer checker reads the last box). Problems without a solution are "
        "left out and counted.",
    )
    held_out_fraction = forms.FloatField(
        min_value=0.01,
        max_value=0.99,
        required=False,
        label="Held-out fraction (expert solutions)",
        help_text="Empty: every problem of the dataset. Else only the training side of the "
        "seeded held-out split that evaluations use with the same fraction and seed, so an "
        "evaluation on the held-out split never sees a training problem.",
    )
    split_seed = StrictIntegerField(
        min_value=0,
        max_value=SEED_MAX,
        required=False,
        initial=0,
        label="Split seed (expert solutions)",
    )
    base_model_path = forms.CharField(
        max_length=1000,
        label="Base model directory",
        help_text="Must be the model the chosen runs were expanded with (paths compared resolved).",
    )
    objective = forms.ChoiceField(choices=TrainingObjective.choices, initial="dail")
    gamma = forms.FloatField(
        min_value=0,
        max_value=0.999,
        label="gamma (cheating penalty)",
        help_text="Weight of the push away from the negative reference; 0 = plain distillation "
        "toward the privileged view. Must be below 1. " + _release(0.1),
    )
    kl_direction = forms.ChoiceField(
        choices=[
            ("reverse", "reverse: KL(θ‖PS) − γ·KL(θ‖NR)"),
            ("forward", "forward: KL(PS‖θ) − γ·KL(NR‖θ)"),
        ],
        label="KL direction",
        help_text=_release("reverse"),
    )
    leave_out = forms.MultipleChoiceField(
        choices=(),
        required=False,
        widget=forms.CheckboxSelectMultiple,
        label="Leave these accepted traces out of the snapshot",
        help_text="Counts per run are beside each run above; a trace can carry several flags. "
        "Default: none left out — reviewers confirmed each acceptance, and the automatic "
        "answer check can be wrong where a person is right. The choice and the counts left out "
        "are recorded on the run. The release trains DAIL on the first correct trace per "
        "problem (instruct models) or one ungraded trace (reasoning models, often cut at 256 "
        "tokens).",
    )
    shortcut_policy = forms.ChoiceField(
        choices=[
            ("drop_position", "drop_position: marked tokens leave the loss (default)"),
            (
                "drop_pull",
                "drop_pull: marked tokens are not pulled toward PS, still pushed from NR",
            ),
            ("keep", "keep: ignore the reviewers' marks"),
        ],
        label="Reviewer-marked shortcut spans",
        help_text="drop_position (default): marked tokens get no gradient at all, so the model "
        "learns nothing there, neither the shortcut nor anything else. drop_pull: only the push "
        "−γ·KL(θ‖NR) acts on marked tokens; alone it is minimised by moving probability to "
        "whatever token the negative reference finds least likely (usually junk), so it can "
        "teach nonsense there (NLL: the tokens leave the loss). keep: marked tokens train like "
        "any other, shortcut included. The paper has no reviewer, so none of these is the "
        "release's.",
    )
    loss_normalisation = forms.ChoiceField(
        choices=[
            ("per_sequence", "per sequence: every trace weighs the same (release)"),
            ("per_token", "per token: long traces weigh more"),
        ],
        label="Loss normalisation",
        help_text="per_sequence: the mean over each trace's response tokens, then the mean over "
        "the traces of the effective batch — the release's (batch 1 per device, a per-sequence "
        "batchmean, averaged by gradient accumulation). per_token: the mean over all response "
        "tokens of the effective batch, so a trace twice as long counts twice (runs launched "
        "before this setting existed trained this way).",
    )
    lora_r = StrictIntegerField(min_value=1, max_value=1024, label="LoRA r", help_text=_release(32))
    lora_alpha = StrictIntegerField(
        min_value=1, max_value=4096, label="LoRA alpha", help_text=_release(32)
    )
    lora_dropout = forms.FloatField(
        min_value=0, max_value=0.99, label="LoRA dropout", help_text=_release(0)
    )
    lora_targets = forms.MultipleChoiceField(
        choices=[(t, t) for t in LORA_TARGETS],
        widget=forms.CheckboxSelectMultiple,
        label="LoRA targets",
        help_text="Release: all seven projections.",
    )
    learning_rate = forms.FloatField(
        min_value=1e-8, max_value=0.5, label="Learning rate", help_text=_release("2e-4")
    )
    warmup_steps = StrictIntegerField(
        min_value=0,
        max_value=100000,
        label="Warm-up steps",
        help_text="Must be 0 or fewer than the planned optimizer steps = ceil(ceil(traces / "
        "micro-batch) / accumulation) × epochs (“Check data and steps” shows them): the first "
        "warm-up step runs at learning rate 0, so a run that never leaves warm-up trains "
        "little or nothing. " + _release(5),
    )
    lr_scheduler = forms.ChoiceField(
        choices=[(s, s) for s in ("linear", "cosine", "constant", "constant_with_warmup")],
        label="Schedule after warm-up",
        help_text="Not stated by the paper; transformers' default is linear.",
    )
    weight_decay = forms.FloatField(min_value=0, max_value=1, help_text=_release(0.01))
    effective_batch_size = StrictIntegerField(
        min_value=1,
        max_value=4096,
        label="Effective batch (traces per step)",
        help_text=_release(16),
    )
    micro_batch_size = StrictIntegerField(
        min_value=1,
        max_value=256,
        label="Micro-batch",
        help_text="Traces per forward pass; must divide the effective batch.",
    )
    epochs = StrictIntegerField(
        min_value=1, max_value=100, help_text="Release: 3 (reasoning) / 5 (instruct)."
    )
    max_length = StrictIntegerField(
        min_value=16,
        max_value=131072,
        label="Maximum length (tokens)",
        help_text="Longest view: prompt + trace. Release: 2048 (reasoning) / 12288 (instruct).",
    )
    overlong_policy = forms.ChoiceField(
        choices=[("truncate", "truncate the trace"), ("skip", "skip the trace")],
        label="Traces longer than that",
        help_text="Counted and shown either way. The release truncates.",
    )
    checkpoint_every = StrictIntegerField(
        min_value=1, max_value=100000, label="Checkpoint every (steps)", help_text=_release(50)
    )
    seed = StrictIntegerField(min_value=0, max_value=SEED_MAX)

    CONFIG_FIELDS = (
        "objective", "gamma", "kl_direction", "shortcut_policy", "loss_normalisation",
        "lora_r", "lora_alpha",
        "lora_dropout", "lora_targets", "learning_rate", "warmup_steps", "lr_scheduler",
        "weight_decay", "effective_batch_size", "micro_batch_size", "epochs", "max_length",
        "overlong_policy", "checkpoint_every", "seed",
    )  # fmt: skip

    def __init__(self, *args, **kwargs) -> None:
        from django.db.models import Count, Q

        from expansion.models import ExpansionRun
        from training.services.training import accepted_flag_annotations

        super().__init__(*args, **kwargs)
        self.fields["expansion_runs"].queryset = ExpansionRun.objects.annotate(
            trace_count=Count("traces"),
            accepted_count=Count("traces", filter=Q(traces__review_state="accepted")),
            **accepted_flag_annotations(),
        ).order_by("-created_at", "-id")
        self.fields["leave_out"].choices = list(TRACE_FLAGS.items())

    def clean_data_source(self) -> str:
        return self.cleaned_data["data_source"] or TRACES_SOURCE

    def data_values(self) -> dict:
        """The data source as `TrainingSettings` fields (run_ids, leave_out, expert_solutions):
        only the chosen source's fields count."""
        data = self.cleaned_data
        if data["data_source"] == EXPERT_SOURCE:
            dataset = data["dataset"]
            seed = data["split_seed"]
            return {
                "run_ids": (),
                "leave_out": (),
                "expert_solutions": ExpertSolutionsChoice(
                    dataset_id=dataset.pk if dataset else None,
                    held_out_fraction=data["held_out_fraction"],
                    split_seed=0 if seed is None else seed,
                ),
            }
        return {
            "run_ids": [r.pk for r in data["expansion_runs"]],
            "leave_out": data["leave_out"],
            "expert_solutions": None,
        }

    def config_values(self) -> dict:
        """The engine's settings from the cleaned data (DailTrainingConfig field names)."""
        values = {name: self.cleaned_data[name] for name in self.CONFIG_FIELDS}
        values["lora_targets"] = list(values["lora_targets"])
        return values

    def clean(self) -> dict:
        data = super().clean()
        if not self.errors:
            from training.engine.config import DailTrainingConfig

            try:
                DailTrainingConfig.from_dict(self.config_values())
            except ValueError as exc:
                name = str(exc).split(" ", 1)[0]
                self.add_error(name if name in self.fields else None, str(exc))
        return data
