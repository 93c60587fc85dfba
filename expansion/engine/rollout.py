"""The rollout interface every backend implements: settings, requests, results, the protocol.

A backend turns `RolloutRequest`s (token ids of the learner and privileged prompts plus a
sequence key) into `RolloutResult`s (plain numpy arrays) under one `RolloutConfig`. Two
backends live beside this module: the per-token reference loop (`rollout_reference`) and the
batched speculative engine (`rollout_fast`); a vLLM backend can implement the same protocol.

This module knows nothing about tokenizers, prompts, problems or storage: requests are ids.

Departures from the release (arXiv 2602.02405, authors' code): EOS ends a trace and is not
part of it (as in the release), and its reason is kept (`finish_reason`); `max_new_tokens`
counts the trace's tokens. `RolloutConfig`'s own defaults (tau = 0.8, top-k 20, R = 5,
temperature 1.0, top-p 1.0, learner proposes) are the mixed-policy setting; runs launched from
the web form or `launch_expansion` start from a named preset (`ROLLOUT_PRESETS`; default
`release_dail`, tau = 1.0), each citing the release file it comes from. In the release,
tau = 0.8 is `prob_threshold_non_reasoning` of `data_generation/conf/generate.yaml` (reasoning
models: 1.0), and its `train/training_file_utils.py` trains the `dail` method on the ratio-1.0
data (0.8 feeds its `off_policy_distillation` baseline); 0.8 is not the release's DAIL default.

Reproducibility: a seed fixes the keyed random numbers (`sampling.py`), so in float32/float64
a run equals the per-token reference whatever the engine, block and batch settings. In
bfloat16 (the GPU default) the logits depend on how the forward passes are shaped (block size,
batch, KV-cache layout, kernels), so a probability near tau or a near-tie can flip: a seed is
reproducible only with the same engine, block and batch settings (and the same hardware).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from numbers import Integral
from typing import Any, Literal, Protocol, TypeGuard

import numpy as np

SOURCE_LEARNER = 0
SOURCE_PRIVILEGED = 1
VIEWS = ("learner", "privileged")

FinishReason = Literal["eos", "length", "error"]
ProgressCallback = Callable[[int, int], None]
# on_finished([(request_index, result), ...]): a backend calls it with the requests whose
# traces became final together (the fast engine after each cycle; others per batch or wave),
# each request exactly once.
FinishedCallback = Callable[[list[tuple[int, "RolloutResult"]]], None]


def token_reporter(progress: ProgressCallback | None, total: int) -> Callable[[int], None]:
    """`report(tokens_done)`: adds up the tokens the engines finish and calls
    `progress(done, total)` with the running sum (nothing when `progress` is None)."""
    reported = [0]

    def report(tokens_done: int) -> None:
        reported[0] += tokens_done
        if progress is not None:
            progress(reported[0], total)

    return report


class RolloutError(ValueError):
    """A rollout setting or request is invalid."""


# Seeds are stored in signed 64-bit columns and mixed as uint64 (`sampling.py`): a larger seed
# would wrap onto a smaller one (2^64 would draw exactly what 0 draws), so it is refused.
SEED_MAX = 2**63 - 1


def is_plain_int(value: object) -> TypeGuard[int]:
    """An int that is not a bool (settings arrive from JSON, where true is no number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_plain_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_token_id(value: object) -> bool:
    # Token ids also come from tokenizers and numpy arrays, hence Integral.
    return isinstance(value, Integral) and not isinstance(value, bool) and int(value) >= 0


_INT_SETTINGS = (
    "top_k", "max_draws", "max_new_tokens", "seed", "block_size", "max_block_size",
    "max_batch_size",
)  # fmt: skip
_NUMBER_SETTINGS = ("tau", "temperature", "top_p")


@dataclass(frozen=True)
class RolloutConfig:
    """Settings of one expansion run (snapshot them with `to_dict`)."""

    tau: float = field(
        default=0.8,
        metadata={"help": "Accept a candidate when the verifier's probability is >= tau [0, 1]."},
    )
    proposer: Literal["learner", "privileged"] = field(
        default="learner",
        metadata={"help": "Which view draws candidates; the other verifies and falls back."},
    )
    top_k: int = field(default=20, metadata={"help": "Both views are restricted to their top-k."})
    max_draws: int = field(
        default=5, metadata={"help": "Candidates drawn (R) before falling back to the verifier."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Applied to both views' logits before top-k/top-p."}
    )
    top_p: float = field(
        default=1.0, metadata={"help": "Nucleus cut over the renormalised top-k (0, 1]."}
    )
    max_new_tokens: int = field(default=2048, metadata={"help": "Longest trace, in tokens."})
    eos_token_ids: tuple[int, ...] = field(
        default=(), metadata={"help": "Tokens that end a trace (empty: the model's own)."}
    )
    forbidden_token_ids: tuple[int, ...] = field(
        default=(), metadata={"help": "Tokens never produced, e.g. </think> for reasoning models."}
    )
    acceptance: Literal["full", "top_k"] = field(
        default="full",
        metadata={
            "help": "Verifier probability compared with tau: full softmax (release) or "
            "renormalised top-k."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the keyed random numbers."})
    block_size: int = field(
        default=8, metadata={"help": "Fast engine: tokens drafted per verification (initial)."}
    )
    max_block_size: int = field(
        default=32,
        metadata={"help": "Fast engine: the block grows up to this while drafts are accepted."},
    )
    draft_view: Literal["auto", "proposer", "verifier"] = field(
        default="auto",
        metadata={
            "help": "Fast engine: which view drafts (speed only; results are identical). "
            "auto = verifier when tau >= 0.5."
        },
    )
    max_batch_size: int = field(
        default=32, metadata={"help": "Fast engine: sequences decoded together."}
    )

    def __post_init__(self) -> None:
        for name in _INT_SETTINGS:
            if not is_plain_int(getattr(self, name)):
                raise RolloutError(f"{name} must be a whole number, got {getattr(self, name)!r}")
        for name in _NUMBER_SETTINGS:
            if not is_plain_number(getattr(self, name)):
                raise RolloutError(f"{name} must be a number, got {getattr(self, name)!r}")
        for name in ("eos_token_ids", "forbidden_token_ids"):
            ids = getattr(self, name)
            if isinstance(ids, str | bytes) or not all(_is_token_id(t) for t in ids):
                raise RolloutError(f"{name} must be a list of token ids, got {ids!r}")
        checks: list[tuple[bool, str]] = [
            (0 <= self.seed <= SEED_MAX, f"seed must be in [0, {SEED_MAX}], got {self.seed}"),
            (0.0 <= self.tau <= 1.0, f"tau must be in [0, 1], got {self.tau}"),
            (self.proposer in VIEWS, f"proposer must be one of {VIEWS}, got {self.proposer!r}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (
                1 <= self.max_draws <= 127,
                f"max_draws (retries) must be in [1, 127], got {self.max_draws}",
            ),
            (self.temperature > 0.0, f"temperature must be > 0, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.acceptance in ("full", "top_k"), f"unknown acceptance {self.acceptance!r}"),
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (
                self.max_block_size >= self.block_size,
                f"max_block_size ({self.max_block_size}) must be >= block_size ({self.block_size})",
            ),
            (
                self.draft_view in ("auto", "proposer", "verifier"),
                f"unknown draft_view {self.draft_view!r}",
            ),
            (self.max_batch_size >= 1, f"max_batch_size must be >= 1, got {self.max_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise RolloutError(message)
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        object.__setattr__(
            self, "forbidden_token_ids", tuple(int(t) for t in self.forbidden_token_ids)
        )

    @property
    def verifier(self) -> str:
        return "privileged" if self.proposer == "learner" else "learner"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        data["forbidden_token_ids"] = list(self.forbidden_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RolloutConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RolloutError(f"unknown rollout settings: {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Setting name -> help text (for forms and CLIs)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


_RELEASE_SAMPLING = {
    "proposer": "learner",
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 20,
    "max_draws": 5,
    "acceptance": "full",
}
_SAMPLING_SOURCE = (
    "Learner proposes, R = 5 draws, top-k 20 (data_generation/conf/generate.yaml of the "
    "release); temperature 1 and no top-p because the release drew from the top-20 "
    "log-probabilities its engine returned before temperature and top-p. max_new_tokens is "
    "set separately (release: 256 for reasoning models, 2048 for instruct models)."
)


@dataclass(frozen=True)
class RolloutPreset:
    """A named starting point for a run's rollout settings, with where it comes from."""

    name: str
    label: str
    settings: dict[str, Any]  # the RolloutConfig fields it fixes
    source: str


ROLLOUT_PRESETS: dict[str, RolloutPreset] = {
    preset.name: preset
    for preset in (
        RolloutPreset(
            "release_dail",
            "release DAIL data: tau 1.0",
            {"tau": 1.0, **_RELEASE_SAMPLING},
            "The data the release trains DAIL on: train/training_file_utils.py reads the "
            "ratio = 1.0 generation for the dail method, i.e. pure sampling from the privileged "
            "view (generate.yaml: prob_threshold_reasoning 1.0). " + _SAMPLING_SOURCE,
        ),
        RolloutPreset(
            "mixed_policy",
            "mixed policy: tau 0.8",
            {"tau": 0.8, **_RELEASE_SAMPLING},
            "The release's generation default for non-reasoning models "
            "(generate.yaml: prob_threshold_non_reasoning 0.8); training_file_utils.py feeds "
            "these traces to its off_policy_distillation baseline. " + _SAMPLING_SOURCE,
        ),
        RolloutPreset(
            "pure_learner",
            "pure learner: tau 0",
            {"tau": 0.0, **_RELEASE_SAMPLING},
            "Every candidate is accepted: plain sampling from the learner (the paper's v1 text "
            "reports tau = 0, with the directions the other way round). " + _SAMPLING_SOURCE,
        ),
    )
}
DEFAULT_ROLLOUT_PRESET = "release_dail"


def preset_rollout_config(preset: str, overrides: dict[str, Any] | None = None) -> RolloutConfig:
    """`RolloutConfig` defaults <- the preset's settings <- explicit overrides ('' = no preset)."""
    if preset and preset not in ROLLOUT_PRESETS:
        raise RolloutError(f"unknown preset {preset!r}; choose one of {', '.join(ROLLOUT_PRESETS)}")
    base = dict(ROLLOUT_PRESETS[preset].settings) if preset else {}
    return RolloutConfig.from_dict(base | dict(overrides or {}))


@dataclass(frozen=True)
class RolloutRequest:
    """One trace to expand: both views' prompts (chat template applied) and its random key."""

    learner_prompt_ids: tuple[int, ...]
    privileged_prompt_ids: tuple[int, ...]
    sequence_key: int

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "learner_prompt_ids", tuple(int(t) for t in self.learner_prompt_ids)
        )
        object.__setattr__(
            self, "privileged_prompt_ids", tuple(int(t) for t in self.privileged_prompt_ids)
        )
        if not self.learner_prompt_ids or not self.privileged_prompt_ids:
            raise RolloutError("a rollout request needs non-empty learner and privileged prompts")

    def prompt_ids(self, view: str) -> tuple[int, ...]:
        return self.learner_prompt_ids if view == "learner" else self.privileged_prompt_ids


@dataclass(frozen=True)
class ViewScores:
    """One view's scores of a trace's tokens, as `scoring` computes them after the rollout:
    log-softmax of the raw logits (temperature 1, no token removed) at the chosen token, and
    the view's most likely alternatives. An engine that consulted the view at every token
    records them on the way (`RolloutBackend.rollout(score_top_n=N)`), which spares scoring
    a prefill of that view. The fast engine computes them from the very logits scoring would
    (`scoring.normalised_top`); vLLM (tau 0 / 1) returns its own raw log-probs, equal up to
    its kernels' rounding."""

    logprobs: np.ndarray  # (T,) float32
    top_ids: np.ndarray  # (T, N) int64, most likely first
    top_logprobs: np.ndarray  # (T, N) float32


@dataclass
class RolloutResult:
    """One finished trace. Arrays have one entry per generated token (EOS excluded).

    `sources` says which view sampled each token (SOURCE_LEARNER / SOURCE_PRIVILEGED); a token
    from the verifier is a fallback. Log-probs are full-softmax log-probs at the rollout
    temperature, taken when the token was chosen (forbidden tokens removed). `view_scores`
    holds the `ViewScores` of the views the engine consulted at every token when asked for
    them (empty otherwise: scoring computes every view).
    """

    sequence_key: int
    proposer: str
    token_ids: np.ndarray  # (T,) int64
    sources: np.ndarray  # (T,) int8
    draws: np.ndarray  # (T,) int8
    learner_logprobs: np.ndarray  # (T,) float32
    privileged_logprobs: np.ndarray  # (T,) float32
    finish_reason: FinishReason
    error: str | None = None
    view_scores: dict[str, ViewScores] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def fallbacks(self) -> np.ndarray:
        """(T,) bool: tokens sampled from the verifier after R rejected candidates."""
        proposer_source = SOURCE_LEARNER if self.proposer == "learner" else SOURCE_PRIVILEGED
        return self.sources != proposer_source

    @property
    def fallback_share(self) -> float:
        return float(self.fallbacks.mean()) if len(self) else 0.0


@dataclass
class RolloutStats:
    """What a backend did (for benchmarks and logs)."""

    tokens: int = 0  # trace tokens produced
    fallbacks: int = 0
    drafted: int = 0  # fast engine: tokens drafted
    matched_drafts: int = 0  # fast engine: drafts equal to the rule's outcome
    forward_passes: int = 0
    cycles: int = 0
    seconds: float = 0.0

    @property
    def draft_acceptance(self) -> float:
        return self.matched_drafts / self.drafted if self.drafted else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class RolloutBackend(Protocol):
    """Anything that expands requests into traces under the DAIL rule."""

    last_stats: RolloutStats

    def rollout(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
        score_top_n: int | None = None,
    ) -> list[RolloutResult]:
        """Expand every request. With `score_top_n`, a backend that can records the
        `ViewScores` (with that many alternatives) of the views it consulted at every token;
        one that cannot leaves `view_scores` empty."""
        ...


def finished_result(
    request: RolloutRequest,
    config: RolloutConfig,
    token_ids: list[int],
    sources: list[int],
    draws: list[int],
    learner_logprobs: list[float],
    privileged_logprobs: list[float],
    finish_reason: FinishReason,
    error: str | None = None,
    view_scores: dict[str, ViewScores] | None = None,
) -> RolloutResult:
    """Pack per-token lists into a result's arrays."""
    return RolloutResult(
        sequence_key=request.sequence_key,
        proposer=config.proposer,
        token_ids=np.asarray(token_ids, dtype=np.int64),
        sources=np.asarray(sources, dtype=np.int8),
        draws=np.asarray(draws, dtype=np.int8),
        learner_logprobs=np.asarray(learner_logprobs, dtype=np.float32),
        privileged_logprobs=np.asarray(privileged_logprobs, dtype=np.float32),
        finish_reason=finish_reason,
        error=error,
        view_scores=view_scores or {},
    )


def non_finite_message(views: Sequence[str], position: int) -> str:
    """The error of a sequence whose logits went NaN/inf (same text from every backend)."""
    names = " and ".join(v for v in VIEWS if v in views)
    plural = "views" if len(views) > 1 else "view"
    return f"non-finite logits (NaN or inf) from the {names} {plural} at position {position}"


def single_view(config: RolloutConfig) -> str | None:
    """The one view a run consults, or None when the rule needs both: tau = 0 accepts every
    first candidate (the proposer alone decides), tau = 1 always falls back (the verifier
    alone). Such runs cost what plain sampling from that view costs."""
    if config.tau <= 0.0:
        return config.proposer
    if config.tau >= 1.0:
        return config.verifier
    return None


# --- The commit rules: how a decided token ends (or extends) a sequence, for every engine ---

Ending = tuple[FinishReason, str | None]  # (finish_reason, error message or None)


def token_ending(
    token: int, failed_views: Sequence[str], position: int, eos_token_ids: Collection[int]
) -> Ending | None:
    """Whether the token decided at `position` ends its sequence, before it is appended.

    Non-finite logits from any consulted view end it with an error (the token is not kept);
    an EOS token ends it with "eos" (not kept either: traces hold the reasoning, not the
    terminator); otherwise None, and the caller appends the token.
    """
    if failed_views:
        return ("error", non_finite_message(failed_views, position))
    if token in eos_token_ids:
        return ("eos", None)
    return None


def length_ending(tokens_kept: int, config: RolloutConfig) -> Ending | None:
    """After appending: a sequence holding `max_new_tokens` tokens ends with "length"."""
    return ("length", None) if tokens_kept >= config.max_new_tokens else None


def adapted_block_size(block: int, fully_matched_share: float, max_block_size: int) -> int:
    """The next draft block: doubled (up to the maximum) when at least 90 % of the sequences
    had every drafted token equal to the rule's outcome (whether accepted or a fallback),
    halved (down to 1) when fewer than half did; unchanged in between. Speed only: the
    tokens do not depend on it."""
    if fully_matched_share >= 0.9:
        return min(block * 2, max_block_size)
    if fully_matched_share < 0.5:
        return max(block // 2, 1)
    return block


def validate_requests(requests: Sequence[RolloutRequest], vocab_size: int) -> None:
    """Token ids must index the model's vocabulary."""
    for index, request in enumerate(requests):
        for view in VIEWS:
            ids = request.prompt_ids(view)
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise RolloutError(
                    f"request {index}: {view} prompt has token ids outside the model's "
                    f"vocabulary of {vocab_size}"
                )
