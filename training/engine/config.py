"""The settings of one training run: `DailTrainingConfig`.

Every default is the authors' release value where DAIL_METHOD.md gives one (LoRA r = alpha =
32, dropout 0, the seven projection targets, lr 2e-4, 5 warm-up steps, weight decay 0.01,
effective batch 16, gamma 0.1, reverse KL, checkpoint every 50 steps); the epochs and maximum
length differ between reasoning and instruct models, so `for_model_kind` gives both presets.

This module knows nothing about models, tokenizers or devices: it only holds and checks values.
`__post_init__` refuses an out-of-range value with a `ValueError` that names the field.

Departures from the paper and release:
- The learning-rate schedule after warm-up is not stated in DAIL_METHOD.md; `lr_scheduler`
  defaults to "linear" (transformers' default) and is a setting.
- `shortcut_policy` (what reviewer-marked shortcut spans do to the loss) is ours: the paper has
  no reviewer. Its default, "drop_position", leaves marked positions out of the loss; the older
  default "drop_pull" kept only `-gamma * KL(learner || NR)` there, which alone is minimised by
  moving mass to whatever token NR finds least likely (an unbounded push toward junk).
- `overlong_policy` is ours: the release truncates at `max_length`; "skip" is offered too.
- `reference_cache` and `fuse_reference_forwards` are ours (speed; the values are unchanged).
- `loss_normalisation` defaults to the release's "per_sequence" (see `objective.py`);
  "per_token" weighs long traces more and was this product's only behaviour before.

Settings stored before a field existed load with `LEGACY_DEFAULTS` (what those runs did), not
with today's default: a run launched before `loss_normalisation` existed trained per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Objective = Literal["dail", "nll"]
KlDirection = Literal["reverse", "forward"]
OverlongPolicy = Literal["truncate", "skip"]
ShortcutPolicy = Literal["drop_pull", "drop_position", "keep"]
LossNormalisation = Literal["per_sequence", "per_token"]
Precision = Literal["auto", "bf16", "fp32"]
Device = Literal["auto", "cpu", "cuda"]

LORA_TARGETS: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)

# What a stored config that lacks a field did at the time (see the module docstring).
LEGACY_DEFAULTS: dict[str, Any] = {"loss_normalisation": "per_token"}

# The release's per-kind values (DAIL_METHOD.md, "Release hyperparameters").
MODEL_KIND_PRESETS: dict[str, dict[str, int]] = {
    "reasoning": {"epochs": 3, "max_length": 2048},
    "instruct": {"epochs": 5, "max_length": 12288},
}


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


# The trainer seeds numpy (`transformers.set_seed`), which takes 32-bit seeds; the signed
# 32-bit range keeps every library that gets the seed in range.
SEED_MAX = 2**31 - 1


def _check_types(config: object) -> None:
    """Refuse values of the wrong type by the field's annotation: settings also arrive as JSON
    (`--config`), where "7", 7.5 or true must not pass for a whole number."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        kind = str(f.type).replace(" ", "")
        if kind in ("int", "int|None"):
            ok = (value is None and kind == "int|None") or (
                isinstance(value, int) and not isinstance(value, bool)
            )
            if not ok:
                raise ValueError(f"{f.name} must be a whole number; got {value!r}")
        elif kind == "float":
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ValueError(f"{f.name} must be a number; got {value!r}")
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{f.name} must be true or false; got {value!r}")


def _at_least(name: str, value: float, low: float) -> None:
    if not value >= low:  # also refuses NaN
        raise ValueError(f"{name} must be >= {low}; got {value!r}")


@dataclass
class DailTrainingConfig:
    """One training run's settings (the release defaults; see the module docstring)."""

    objective: Objective = field(
        default="dail",
        metadata={"help": "'dail': the contrastive objective; 'nll': plain SFT on the traces."},
    )
    gamma: float = field(
        default=0.1,
        metadata={
            "help": "Cheating penalty: weight of the push away from the negative reference. "
            "0 gives plain distillation toward the privileged view. Must be in [0, 1): at 1 "
            "and above the reverse-KL objective has no minimum."
        },
    )
    kl_direction: KlDirection = field(
        default="reverse",
        metadata={
            "help": "'reverse': KL(M_theta||M_PS) - gamma*KL(M_theta||M_NR) (release); "
            "'forward': KL(M_PS||M_theta) - gamma*KL(M_NR||M_theta)."
        },
    )
    shortcut_policy: ShortcutPolicy = field(
        default="drop_position",
        metadata={
            "help": "Reviewer-marked shortcut tokens: 'drop_position' (default) leaves them out "
            "of the loss entirely; 'drop_pull' leaves them out of the pull toward PS but keeps "
            "the push away from NR, which alone drives mass toward NR's least likely token "
            "(NLL: out of the loss); 'keep' ignores the marks."
        },
    )
    loss_normalisation: LossNormalisation = field(
        default="per_sequence",
        metadata={
            "help": "'per_sequence' (release): mean over each trace's response positions, then "
            "mean over the traces of the accumulated batch, so every trace weighs the same; "
            "'per_token': mean over all response tokens of the accumulated batch, so long "
            "traces weigh more."
        },
    )
    lora_r: int = field(default=32, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (alpha/r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_targets: tuple[str, ...] = field(
        default=LORA_TARGETS,
        metadata={"help": "Module names that get a LoRA adapter (the release: all projections)."},
    )
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (AdamW)."})
    warmup_steps: int = field(default=5, metadata={"help": "Linear warm-up, in optimizer steps."})
    lr_scheduler: str = field(
        default="linear",
        metadata={"help": "transformers scheduler name after warm-up (linear, cosine, constant)."},
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    effective_batch_size: int = field(
        default=16,
        metadata={"help": "Traces per optimizer step (micro-batch x gradient accumulation)."},
    )
    micro_batch_size: int = field(
        default=1,
        metadata={"help": "Traces per forward pass; must divide the effective batch."},
    )
    epochs: int = field(default=3, metadata={"help": "Passes over the data (release: 3 / 5)."})
    max_length: int = field(
        default=2048,
        metadata={"help": "Longest view (prompt + response) in tokens (release: 2048 / 12288)."},
    )
    overlong_policy: OverlongPolicy = field(
        default="truncate",
        metadata={
            "help": "A trace whose longest view exceeds the maximum length: 'truncate' its "
            "response, or 'skip' it. Both are counted in the result."
        },
    )
    checkpoint_every: int = field(
        default=50, metadata={"help": "Save a resumable checkpoint every N optimizer steps."}
    )
    checkpoints_to_keep: int | None = field(
        default=2, metadata={"help": "Most recent checkpoints kept on disk (None: all)."}
    )
    seed: int = field(default=42, metadata={"help": "Seeds LoRA init, data order and dropout."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Gradient clipping norm (0 disables clipping)."}
    )
    precision: Precision = field(
        default="auto",
        metadata={"help": "'auto': bf16 on a CUDA GPU that supports it, fp32 on CPU."},
    )
    device: Device = field(default="auto", metadata={"help": "'auto': CUDA when available."})
    fuse_reference_forwards: bool = field(
        default=False,
        metadata={
            "help": "Run the privileged and negative-reference views as one batch of 2B rows "
            "padded to the longer view, instead of two forwards. Helps small batches on a GPU; "
            "costs the padding otherwise."
        },
    )
    reference_cache: bool = field(
        default=True,
        metadata={
            "help": "Keep the frozen views' final hidden states on disk after epoch 1, so later "
            "epochs skip their forwards (exact; see reference_cache.py)."
        },
    )
    reference_cache_limit_gb: float = field(
        default=20.0,
        metadata={"help": "Use the reference cache only if it needs at most this many GB."},
    )

    def __post_init__(self) -> None:
        _check_types(self)
        if not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [0, {SEED_MAX}]; got {self.seed!r}")
        _choice("objective", self.objective, ("dail", "nll"))
        _choice("kl_direction", self.kl_direction, ("reverse", "forward"))
        _choice("shortcut_policy", self.shortcut_policy, ("drop_pull", "drop_position", "keep"))
        _choice("loss_normalisation", self.loss_normalisation, ("per_sequence", "per_token"))
        _choice("overlong_policy", self.overlong_policy, ("truncate", "skip"))
        _choice("precision", self.precision, ("auto", "bf16", "fp32"))
        _choice("device", self.device, ("auto", "cpu", "cuda"))
        if not 0.0 <= self.gamma < 1.0:
            raise ValueError(f"gamma must be in [0, 1); got {self.gamma!r}")
        for name in ("lora_r", "lora_alpha", "effective_batch_size", "micro_batch_size"):
            _at_least(name, getattr(self, name), 1)
        for name in ("epochs", "checkpoint_every"):
            _at_least(name, getattr(self, name), 1)
        _at_least("max_length", self.max_length, 2)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _at_least("max_grad_norm", self.max_grad_norm, 0.0)
        _at_least("reference_cache_limit_gb", self.reference_cache_limit_gb, 0.0)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1); got {self.lora_dropout!r}")
        if not 0.0 < self.learning_rate < 1.0:
            raise ValueError(f"learning_rate must be in (0, 1); got {self.learning_rate!r}")
        if self.effective_batch_size % self.micro_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) must divide "
                f"effective_batch_size ({self.effective_batch_size})"
            )
        if self.checkpoints_to_keep is not None:
            _at_least("checkpoints_to_keep", self.checkpoints_to_keep, 1)
        self.lora_targets = tuple(self.lora_targets)
        if not self.lora_targets:
            raise ValueError("lora_targets must name at least one module")

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.effective_batch_size // self.micro_batch_size

    def planned_steps(self, examples: int) -> int:
        """Optimizer steps transformers' Trainer takes on `examples` traces: per epoch,
        ceil(ceil(examples / micro_batch_size) / gradient_accumulation_steps), times epochs."""
        batches = math.ceil(examples / self.micro_batch_size)
        return math.ceil(batches / self.gradient_accumulation_steps) * self.epochs

    def check_warmup(self, planned_steps: int) -> None:
        """Refuse a warm-up that is not shorter than the planned steps (`ValueError` naming
        `warmup_steps`). The rule: warmup_steps == 0 or warmup_steps < planned_steps.

        Why: transformers' warm-up schedules give the learning rate lr * s / warmup_steps at
        optimizer step s = 0, 1, ... (0 at the first step), and reach the full rate only at
        step s = warmup_steps. With warmup_steps >= planned steps a one-step run trains at
        learning rate 0 (an adapter that never moved), and a longer one never leaves warm-up."""
        if self.warmup_steps and self.warmup_steps >= planned_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be shorter than the "
                f"{planned_steps} planned optimizer step(s), or 0: the first step of a warm-up "
                "runs at learning rate 0, so this run would train little or nothing"
            )

    @classmethod
    def for_model_kind(cls, kind: str, **overrides: Any) -> DailTrainingConfig:
        """The release preset for a 'reasoning' or 'instruct' model, with `overrides` applied."""
        _choice("kind", kind, tuple(MODEL_KIND_PRESETS))
        return cls(**{**MODEL_KIND_PRESETS[kind], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists)."""
        values = dataclasses.asdict(self)
        values["lora_targets"] = list(self.lora_targets)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DailTrainingConfig:
        """Inverse of `to_dict`; unknown keys are refused so a typo is not silently ignored.
        A missing key in `LEGACY_DEFAULTS` gets the value runs stored before it existed used."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**{**LEGACY_DEFAULTS, **values})
