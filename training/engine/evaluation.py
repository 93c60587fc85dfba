"""Evaluation: sample n completions per problem, judge their final answers, and turn the
verdicts into pass@k and pass@k-against-token-budget metrics.

- **Prompts.** The learner's view (`## Problem: ...`) through the model's chat template, with
  one added line asking for the answer in `\\boxed{}` (ours: the answer checker reads the last
  box, and a base model that is not told so rarely writes one). The template is a setting.
- **Sampling** (`generate_completions`): one function per backend behind one switch.
  `transformers` is implemented here: the n samples of a problem are split into fixed
  batches of `batch_size` copies of the same prompt (no padding needed) and each batch is
  seeded from `(seed, problem key, batch index)`. The same settings on the same device give
  the same samples, and a resumed job that regenerates only its missing batches gets what an
  uninterrupted one would have. `vllm` (`generate_completions_vllm`) samples on the engine of
  `expansion.engine.backend_vllm.VllmBackend` (its adapter, if any, via `LoRARequest`): one
  request per sample, seeded from (batch seed, sample index), so a sample does not depend on
  which others share its batch. The two backends draw different random numbers: the same
  seed gives different samples on each (the same distribution).
- **Token counts.** A sample's tokens are the ones it generated before its end-of-sequence
  token (EOS itself not counted); a sample that never emitted EOS used all `max_new_tokens`
  and finished by `length`.
- **Token budgets.** Generated once, with `max_new_tokens` = the largest budget; a lower
  budget B is derived by truncation: a sample counts at B when it is correct *and* used at
  most B tokens. This equals generating with `max_new_tokens = B` for the *finishing* rule
  (sampling of token t does not depend on the limit), but is stricter in one respect: a sample
  that wrote a correct box before B and then kept talking past B counts as unsolved at B (it
  did not finish within the budget), whereas a truncated generation's last box could be read.
- **Answers** (`judge_answer`): the last `\\boxed{}` (`expansion.engine.answers`), checked by
  math-verify and by a normalised string match against every alternative of the expected
  answer. CHAMP-style answers are free-form: `C(10, 5), or equivalently 252` gives two
  alternatives (`C(a, b)` is also read as `\\binom{a}{b}`), and a yes/no answer matches a box
  that starts with the same word (`No, it is not possible`). Samples where math-verify and the
  string match disagree are flagged for a person; metrics take a person's ruling when given.
- **Metrics** (`evaluation_metrics`): unbiased pass@k per problem and overall with bootstrap
  intervals (`training.engine.metrics`), the same at every budget, and mean tokens used.

Also here: which problems an adapter was trained on (`adapter_training_problem_ids`, from an
optional `dail-training.json`), whether an adapter belongs to a base model
(`check_adapter_base`), and a seeded held-out split of problem keys.

This module knows nothing about Django or the database: problems are keys and strings.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expansion.engine.answers import check_answer, last_boxed_answer
from expansion.engine.backend_vllm import vllm_unavailable_reason
from expansion.engine.prompts import LEARNER_TEMPLATE, PromptTemplates, chat_prompt_text
from training.engine.metrics import PassAtKReport, pass_at_k_report

EVALUATION_TEMPLATE = LEARNER_TEMPLATE + "Put your final answer within \\boxed{}.\n"
TRAINING_SNAPSHOT_FILE = "dail-training.json"
BACKENDS = ("transformers", "vllm")
MAX_SAMPLES = 1024
MAX_NEW_TOKENS = 32768


class EvaluationError(ValueError):
    """Settings or inputs that an evaluation cannot use (the message says why)."""


class BackendUnavailableError(EvaluationError):
    """The chosen sampling backend cannot run here."""


class AdapterError(EvaluationError):
    """An adapter directory that is missing, unreadable, or belongs to another base model."""


# --- Settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn; validated on creation."""

    samples: int  # n per problem
    max_new_tokens: int  # the largest token budget
    temperature: float = 0.6
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.samples <= MAX_SAMPLES:
            raise EvaluationError(
                f"samples per problem must be 1..{MAX_SAMPLES}; got {self.samples}"
            )
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise EvaluationError(
                f"max_new_tokens must be 1..{MAX_NEW_TOKENS}; got {self.max_new_tokens}"
            )
        if not 0 < self.temperature <= 5:
            raise EvaluationError(f"temperature must be in (0, 5]; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EvaluationError(f"top_p must be in (0, 1]; got {self.top_p}")
        if not 1 <= self.batch_size <= 1024:
            raise EvaluationError(f"batch_size must be 1..1024; got {self.batch_size}")
        if self.seed < 0:
            raise EvaluationError(f"seed must be >= 0; got {self.seed}")


def validate_ks(ks: Sequence[int], samples: int) -> list[int]:
    """Sorted distinct ks, each 1 <= k <= n (pass@k needs at least k samples)."""
    chosen = sorted(set(int(k) for k in ks))
    if not chosen:
        raise EvaluationError("choose at least one k")
    too_large = [k for k in chosen if k > samples]
    if too_large:
        raise EvaluationError(
            f"k = {', '.join(map(str, too_large))} is larger than n = {samples} samples per "
            "problem; pass@k needs at least k samples"
        )
    if chosen[0] < 1:
        raise EvaluationError(f"k must be at least 1; got {chosen[0]}")
    return chosen


def validate_budgets(budgets: Sequence[int]) -> list[int]:
    """Sorted distinct token budgets, each 1..MAX_NEW_TOKENS; the largest is max_new_tokens."""
    chosen = sorted(set(int(b) for b in budgets))
    if not chosen:
        raise EvaluationError("choose at least one token budget")
    if chosen[0] < 1 or chosen[-1] > MAX_NEW_TOKENS:
        raise EvaluationError(f"token budgets must be 1..{MAX_NEW_TOKENS}; got {chosen}")
    return chosen


# --- Prompts ---------------------------------------------------------------------------------


def evaluation_prompt_ids(
    tokenizer: Any, problem: str, template: str = EVALUATION_TEMPLATE, reasoning: bool = False
) -> list[int]:
    """Token ids of the learner prompt for `problem` (chat template, assistant turn open)."""
    templates = PromptTemplates(learner=template)
    if not problem.strip():
        raise EvaluationError("the problem statement is empty")
    text = chat_prompt_text(
        tokenizer, templates.user_turn("learner", problem.strip()), reasoning, templates
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


# --- Sampling --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    sample_index: int
    text: str
    token_count: int  # generated tokens before EOS (EOS not counted)
    finish_reason: str  # "eos" or "length"
    token_ids: tuple[int, ...] = ()  # the counted tokens


def sample_batches(samples: int, batch_size: int) -> list[range]:
    """The fixed batches of sample indices: [0, b), [b, 2b), ... (the unit of resumption)."""
    return [
        range(start, min(start + batch_size, samples)) for start in range(0, samples, batch_size)
    ]


def batch_seed(seed: int, problem_key: str, batch_index: int) -> int:
    """The torch seed of one batch: stable across runs, processes and resumptions."""
    digest = hashlib.blake2b(f"{seed}\x1f{problem_key}\x1f{batch_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


def backend_unavailable_reason(backend: str) -> str:
    if backend == "transformers":
        return ""
    if backend == "vllm":
        return vllm_unavailable_reason()
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    ids = [int(i) for i in ids if i is not None]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise EvaluationError("the model and tokenizer name no end-of-sequence token")
    return ids


class _StepCallback:
    """A transformers stopping criterion that never stops: it reports each decoding step (and
    lets the callback raise, e.g. to cancel a job mid-batch)."""

    def __init__(self, prompt_length: int, on_step: Callable[[int], None]) -> None:
        self.prompt_length = prompt_length
        self.on_step = on_step

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.on_step(input_ids.shape[1] - self.prompt_length)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate_completions_transformers(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    sample_indices: Sequence[int],
    *,
    settings: SamplingSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> list[Completion]:
    """One batch: `len(sample_indices)` completions of one prompt with `model.generate`."""
    from transformers import StoppingCriteriaList

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    batch = len(sample_indices)
    input_ids = torch.tensor([list(prompt_ids)] * batch, dtype=torch.long, device=device)  # (B, P)
    criteria = StoppingCriteriaList([_StepCallback(input_ids.shape[1], on_step)] if on_step else [])
    torch.manual_seed(seed)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=0,  # no top-k cut: only temperature and top_p, as configured
        max_new_tokens=settings.max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        stopping_criteria=criteria,
    )
    generated = output[:, input_ids.shape[1] :].cpu()  # (B, T)
    is_eos = torch.isin(generated, torch.tensor(eos))  # (B, T)
    completions = []
    for row, index in enumerate(sample_indices):
        hits = torch.nonzero(is_eos[row]).flatten()
        count = int(hits[0]) if hits.numel() else generated.shape[1]
        completions.append(
            Completion(
                sample_index=int(index),
                text=tokenizer.decode(generated[row, :count], skip_special_tokens=True),
                token_count=count,
                finish_reason="eos" if hits.numel() else "length",
                token_ids=tuple(generated[row, :count].tolist()),
            )
        )
    return completions


def sample_seed(batch_seed_value: int, sample_index: int) -> int:
    """The vLLM seed of one sample of a batch (see the module docstring)."""
    return batch_seed(batch_seed_value, "sample", sample_index) & ((1 << 31) - 1)


def generate_completions_vllm(
    sampler: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    sample_indices: Sequence[int],
    *,
    settings: SamplingSettings,
    seed: int,
) -> list[Completion]:
    """One batch on vLLM: `sampler` is a `backend_vllm.VllmBackend`, whose adapter (if set)
    samples as the learner. The whole batch is one `generate` call."""
    from vllm import SamplingParams, TokensPrompt

    eos = set(sampler.default_eos_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    if not eos:
        raise EvaluationError("the model and tokenizer name no end-of-sequence token")
    params = [
        SamplingParams(
            temperature=settings.temperature,
            top_p=settings.top_p,
            max_tokens=settings.max_new_tokens,
            seed=sample_seed(seed, int(index)),
            stop_token_ids=sorted(eos),
            detokenize=False,
        )
        for index in sample_indices
    ]
    prompt = TokensPrompt(prompt_token_ids=list(prompt_ids))
    outputs = sampler.generate([prompt] * len(params), params, ["learner"] * len(params))
    completions = []
    for index, output in zip(sample_indices, outputs, strict=True):
        ids = list(output.outputs[0].token_ids)
        ended = bool(ids) and ids[-1] in eos
        if ended:
            ids = ids[:-1]  # EOS itself is not counted (as with transformers)
        completions.append(
            Completion(
                sample_index=int(index),
                text=tokenizer.decode(ids, skip_special_tokens=True),
                token_count=len(ids),
                finish_reason="eos" if ended else "length",
                token_ids=tuple(ids),
            )
        )
    return completions


def generate_completions(
    backend: str,
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[int],
    sample_indices: Sequence[int],
    *,
    settings: SamplingSettings,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> list[Completion]:
    """The sampling switch: one batch of completions from the chosen backend (`model` is the
    transformers model, or for "vllm" a `backend_vllm.VllmBackend`)."""
    if backend == "transformers":
        return generate_completions_transformers(
            model,
            tokenizer,
            prompt_ids,
            sample_indices,
            settings=settings,
            seed=seed,
            on_step=on_step,
        )
    if backend == "vllm":
        return generate_completions_vllm(
            model, tokenizer, prompt_ids, sample_indices, settings=settings, seed=seed
        )
    raise BackendUnavailableError(
        f"The {backend} backend cannot run evaluations: {backend_unavailable_reason(backend)}."
    )


# --- Answers ---------------------------------------------------------------------------------

_EQUIVALENTLY = re.compile(r"\s*,?\s*(?:or\s+)?(?:equivalently|i\.e\.)\s*,?\s*", re.IGNORECASE)
_BINOMIAL = re.compile(r"\bC\(\s*([\w+\-*/^ ]+?)\s*,\s*([\w+\-*/^ ]+?)\s*\)")
_YES_NO = re.compile(r"^(yes|no)\b", re.IGNORECASE)


def answer_alternatives(answer: str) -> list[str]:
    """The forms an answer may take: CHAMP's `A, or equivalently B` gives A and B, and each
    `C(a, b)` also reads as `\\binom{a}{b}`."""
    parts = [p.strip().strip("$").strip() for p in _EQUIVALENTLY.split(answer) if p.strip()]
    forms: list[str] = []
    for part in parts or [answer.strip()]:
        forms.append(part)
        binomial = _BINOMIAL.sub(r"\\binom{\1}{\2}", part)
        if binomial != part:
            forms.append(binomial)
    return list(dict.fromkeys(forms))


_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf)\{([^{}]*)\}")


def _yes_no(answer: str) -> str | None:
    """'yes' or 'no' when the answer starts with that word (`\\text{No}, never` -> 'no')."""
    plain = _TEXT_COMMAND.sub(r"\1", answer).strip().strip("$").strip().lower()
    match = _YES_NO.match(plain)
    return match.group(1) if match else None


@dataclass(frozen=True)
class AnswerVerdict:
    predicted: str | None  # the last boxed answer, None when there is none
    math_verify: bool | None  # None: math-verify could read no alternative
    string_match: bool  # normalised string (or yes/no) match with some alternative
    correct: bool  # either checker says so
    disagreement: bool  # the two checkers disagree: a person should look


def judge_answer(predicted: str | None, expected: str) -> AnswerVerdict:
    """Compare a predicted final answer with every alternative of the expected one."""
    if predicted is None or not predicted.strip():
        return AnswerVerdict(predicted, None, False, False, False)
    expected_forms = answer_alternatives(expected)
    predicted_forms = answer_alternatives(predicted)
    symbolic: bool | None = None
    string_match = False
    for guess in predicted_forms:
        for gold in expected_forms:
            check = check_answer(guess, gold)
            string_match = string_match or check.string_match
            if check.math_verify is not None:
                symbolic = bool(symbolic) or check.math_verify
    expected_word = _yes_no(expected_forms[0]) if len(expected_forms) == 1 else None
    if expected_word is not None and _yes_no(predicted) == expected_word:
        string_match = True
    correct = string_match or bool(symbolic)
    disagreement = symbolic is not None and symbolic != string_match
    return AnswerVerdict(predicted, symbolic, string_match, correct, disagreement)


def judge_completion(text: str, expected: str) -> AnswerVerdict:
    """Judge the last `\\boxed{}` answer of a completion."""
    return judge_answer(last_boxed_answer(text), expected)


# --- Metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleOutcome:
    correct: bool  # after a person's ruling, when there is one
    tokens: int


def correct_within_budget(outcome: SampleOutcome, budget: int) -> bool:
    """Counted at budget B: correct and used at most B tokens (see the module docstring)."""
    return outcome.correct and outcome.tokens <= budget


@dataclass(frozen=True)
class ProblemSummary:
    samples: int
    correct: int
    mean_tokens: float
    correct_by_budget: dict[int, int]


@dataclass(frozen=True)
class EvaluationMetrics:
    ks: tuple[int, ...]
    budgets: tuple[int, ...]
    overall: PassAtKReport  # every sample, judged without a budget
    by_budget: dict[int, PassAtKReport]
    problems: dict[str, ProblemSummary]
    mean_tokens: float
    mean_tokens_correct: float | None
    samples: int
    correct_samples: int
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: curves as lists of {k|budget, value, low, high}."""

        def estimate(e: Any) -> dict[str, float]:
            return {"value": e.value, "low": e.low, "high": e.high}

        return {
            "ks": list(self.ks),
            "budgets": list(self.budgets),
            "confidence": self.confidence,
            "problems": len(self.problems),
            "samples": self.samples,
            "correct_samples": self.correct_samples,
            "mean_tokens": self.mean_tokens,
            "mean_tokens_correct": self.mean_tokens_correct,
            "pass_at_k": [{"k": k, **estimate(self.overall.overall[k])} for k in self.ks],
            "budget_curves": {
                str(k): [
                    {"budget": b, **estimate(self.by_budget[b].overall[k])} for b in self.budgets
                ]
                for k in self.ks
            },
            "per_problem": {
                key: {
                    "samples": summary.samples,
                    "correct": summary.correct,
                    "mean_tokens": summary.mean_tokens,
                    "pass_at_k": {
                        str(k): estimate(self.overall.per_problem[key][k]) for k in self.ks
                    },
                    "correct_by_budget": {str(b): c for b, c in summary.correct_by_budget.items()},
                }
                for key, summary in self.problems.items()
            },
        }


def evaluation_metrics(
    outcomes: Mapping[str, Sequence[SampleOutcome]],
    ks: Sequence[int],
    budgets: Sequence[int],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> EvaluationMetrics:
    """pass@k (overall and per problem, with intervals) at full length and at each budget."""
    if not outcomes or any(not samples for samples in outcomes.values()):
        raise EvaluationError("every problem needs at least one judged sample")
    ks = tuple(validate_ks(ks, min(len(s) for s in outcomes.values())))
    budgets = tuple(validate_budgets(budgets))

    def report(correct: Callable[[SampleOutcome], bool]) -> PassAtKReport:
        counts = {key: (len(s), sum(map(correct, s))) for key, s in outcomes.items()}
        return pass_at_k_report(counts, ks, confidence=confidence, resamples=resamples, seed=seed)

    overall = report(lambda o: o.correct)
    by_budget = {b: report(lambda o, b=b: correct_within_budget(o, b)) for b in budgets}
    problems = {
        key: ProblemSummary(
            samples=len(samples),
            correct=sum(o.correct for o in samples),
            mean_tokens=float(np.mean([o.tokens for o in samples])),
            correct_by_budget={
                b: sum(correct_within_budget(o, b) for o in samples) for b in budgets
            },
        )
        for key, samples in outcomes.items()
    }
    every = [o for samples in outcomes.values() for o in samples]
    right = [o.tokens for o in every if o.correct]
    return EvaluationMetrics(
        ks=ks,
        budgets=budgets,
        overall=overall,
        by_budget=by_budget,
        problems=problems,
        mean_tokens=float(np.mean([o.tokens for o in every])),
        mean_tokens_correct=float(np.mean(right)) if right else None,
        samples=len(every),
        correct_samples=len(right),
        confidence=confidence,
    )


# --- Adapters --------------------------------------------------------------------------------


def _adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    path = Path(adapter_path)
    if not path.exists():
        raise AdapterError(f"No adapter at {path}: the path does not exist.")
    config_file = path / "adapter_config.json"
    if not path.is_dir() or not config_file.is_file():
        raise AdapterError(
            f"{path} is not a PEFT adapter directory: it has no adapter_config.json."
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterError(f"Cannot read {config_file}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{config_file} does not hold a JSON object.")
    return config


def adapter_base_model(adapter_path: str | Path) -> str:
    """The `base_model_name_or_path` an adapter was trained on."""
    base = _adapter_config(adapter_path).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter_path}/adapter_config.json names no base model.")
    return str(base)


def check_adapter_base(adapter_path: str | Path, base_path: str | Path) -> None:
    """Refuse an adapter whose base model is not `base_path` (compared as resolved paths)."""
    named = adapter_base_model(adapter_path)
    chosen = Path(base_path).resolve()
    if not Path(named).exists():
        raise AdapterError(
            f"The adapter {adapter_path} was trained on {named!r}, which is not a local path, so "
            f"it cannot be confirmed to be the chosen base model {chosen}."
        )
    if Path(named).resolve() != chosen:
        raise AdapterError(
            f"The adapter {adapter_path} belongs to the base model {Path(named).resolve()}, not "
            f"to the chosen base model {chosen}."
        )


@dataclass(frozen=True)
class TrainingProblems:
    """The problems an adapter's training snapshot contained, from `dail-training.json`."""

    source: Path
    problem_ids: frozenset[int] = field(default_factory=frozenset)


def adapter_training_problem_ids(adapter_path: str | Path) -> TrainingProblems | None:
    """The problem ids of an adapter's training snapshot, or None when it records none.

    Reads `dail-training.json` inside the adapter directory (beside adapter_config.json), else
    in its parent (the training run's output directory). Format:
    `{"problem_ids": [12, 57, ...]}` (database ids of the problems; other keys are ignored).
    A file that exists but cannot be read is an error, never silently "no overlap"."""
    path = Path(adapter_path)
    for candidate in (path / TRAINING_SNAPSHOT_FILE, path.parent / TRAINING_SNAPSHOT_FILE):
        if candidate.is_file():
            break
    else:
        return None
    try:
        data = json.loads(candidate.read_text())
        raw = data["problem_ids"]
        if not isinstance(raw, list):
            raise TypeError("problem_ids is not a list")
        ids = frozenset(int(i) for i in raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AdapterError(
            f"Cannot read the training snapshot {candidate}: {exc!s} (expected "
            '{"problem_ids": [ids, ...]}).'
        ) from exc
    return TrainingProblems(source=candidate, problem_ids=ids)


# --- Splits ----------------------------------------------------------------------------------


def in_held_out_split(problem_key: str, fraction: float, seed: int) -> bool:
    """Whether a problem falls in the seeded held-out split (`fraction` of problems).

    A hash of (seed, key), so a problem's side never changes when others are added."""
    if not 0 < fraction < 1:
        raise EvaluationError(f"the held-out fraction must be in (0, 1); got {fraction}")
    digest = hashlib.blake2b(f"{seed}\x1fsplit\x1f{problem_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
