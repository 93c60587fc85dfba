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
  no reviewer.
- `overlong_policy` is ours: the release truncates at `max_length`; "skip" is offered too.
- `reference_cache` and `fuse_reference_forwards` are ours (speed; the values are unchanged).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Objective = Literal["dail", "nll"]
KlDirection = Literal["reverse", "forward"]
OverlongPolicy = Literal["truncate", "skip"]
ShortcutPolicy = Literal["drop_pull", "drop_position", "keep"]
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

# The release's per-kind values (DAIL_METHOD.md, "Release hyperparameters").
MODEL_KIND_PRESETS: dict[str, dict[str, int]] = {
    "reasoning": {"epochs": 3, "max_length": 2048},
    "instruct": {"epochs": 5, "max_length": 12288},
}


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


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
        default="drop_pull",
        metadata={
            "help": "Reviewer-marked shortcut tokens: 'drop_pull' leaves them out of the pull "
            "toward PS (NLL: out of the loss) but keeps the push away from NR; "
            "'drop_position' leaves them out of the loss entirely; 'keep' ignores the marks."
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
        metadata={"help": "Traces per forward pass; must divide effective_batch_size."},
    )
    epochs: int = field(default=3, metadata={"help": "Passes over the data (release: 3 / 5)."})
    max_length: int = field(
        default=2048,
        metadata={"help": "Longest view (prompt + response) in tokens (release: 2048 / 12288)."},
    )
    overlong_policy: OverlongPolicy = field(
        default="truncate",
        metadata={
            "help": "A trace whose longest view exceeds max_length: 'truncate' its response, "
            "or 'skip' it. Both are counted in the result."
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
        _choice("objective", self.objective, ("dail", "nll"))
        _choice("kl_direction", self.kl_direction, ("reverse", "forward"))
        _choice("shortcut_policy", self.shortcut_policy, ("drop_pull", "drop_position", "keep"))
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
        """Inverse of `to_dict`; unknown keys are refused so a typo is not silently ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**values)
