"""Evaluation: sample n completions per problem, judge their final answers, and turn the
verdicts into pass@k and pass@k-against-token-budget metrics.

- **Prompts.** The learner's view (`## Problem: ...`) through the model's chat template, with
  one added line asking for the answer in `\\boxed{}` (ours: the answer checker reads the last
  box, and a base model that is not told so rarely writes one). The template is a setting;
  `EVALUATION_TEMPLATES` names the default and `worked-example` (one solved example first, for
  small models that do not write a box even when asked).
- **Sampling** (`generate_completions`): one function per backend behind one switch. The n
  samples of a problem are split into fixed batches of `batch_size` sample indices
  (`sample_batches`); a problem's batch is a `SamplingUnit`, the unit of resumption (a job
  stores a unit's missing samples and never redraws stored ones). One backend call draws
  several units, from one or many problems (`pack_units`: consecutive units up to
  `max_batch_size` sequences), so the batch stays full across problems.
  `transformers`: one `model.generate` over every row of the call, prompts left-padded with
  an attention mask (all rows' prompts end at the same column, so the presence penalty, stop
  strings and the EOS cut see generated tokens only), seeded once per call by
  `call_seed(seed, units)`: the evaluation seed and the keys of the units it holds (problem
  key and batch index). The same problems and settings on the same device give the same
  samples; a resumed evaluation groups its missing units into calls of its own, so their
  samples are drawn with those calls' seeds (the same distribution, not the same draws as an
  uninterrupted run). `vllm` (`generate_completions_vllm`) samples on the engine of
  `expansion.engine.vllm_backend.backends.VllmBackend` (its adapter, if any, via `LoRARequest`): one
  request per sample, seeded by (unit seed `batch_seed(seed, problem key, batch index)`,
  sample index), so a vLLM sample does not depend on which others share its call, and a
  resumed evaluation gets what an uninterrupted one would have. The two backends draw
  different random numbers: the same seed gives different samples on each (the same
  distribution).
- **Top-k** (`SamplingSettings.top_k`, optional): sample from the k most likely tokens only,
  after temperature and before top-p, on both backends; unset means no top-k cut at all
  (transformers gets `top_k=0`, not its default of 50; vLLM gets 0, its "disabled").
- **Protocols** (`EVALUATION_PROTOCOLS`, recorded with each evaluation): `workbench` samples
  with temperature, top-p and the optional top-k only; `release` follows the release's
  `eval/eval.py`: presence penalty 1.5 (on transformers `PresencePenaltyProcessor`, vLLM's
  definition: minus 1.5 on the logits of every token already in the completion, before
  temperature and top-p), the first pass stops at `</think>` (finish reason `stop`; the stop
  string is not part of the text), and every sample without a `\\boxed{` gets a second,
  force-answer pass: the assistant turn continued with its text and "\\n The final answer (in
  \\boxed{}):" for 100 more tokens (same temperature, top-p, top-k and penalty; on vLLM
  seeded per sample, on transformers one more `generate` for all such samples of the call,
  seeded from the call seed). Its tokens are
  counted in the sample's tokens (`forced_tokens` says how many); token budgets cap the first
  pass only.
- **Token counts.** A sample's tokens are the ones it generated before its end-of-sequence
  token (EOS itself not counted); a sample that never emitted EOS used all `max_new_tokens`
  and finished by `length`.
- **Token budgets.** Generated once, with `max_new_tokens` = the largest budget; a lower
  budget B is derived by truncation: a sample counts at B when it is correct *and* used at
  most B tokens. This equals generating with `max_new_tokens = B` for the *finishing* rule
  (sampling of token t does not depend on the limit), but is stricter in one respect: a sample
  that wrote a correct box before B and then kept talking past B counts as unsolved at B (it
  did not finish within the budget), whereas a truncated generation's last box could be read.
- **Answers**: `judge_completion`, the project's one answer checker, lives in
  `expansion.engine.answers` (expansion grades its traces with it too): the last `\\boxed{}`,
  math-verify and a normalised string match against every alternative of the expected answer
  (CHAMP's `A, or equivalently B`, yes/no prose). Samples where the two checks disagree are
  flagged for a person; metrics take a person's ruling when given.
- **Metrics** (`evaluation_metrics`): unbiased pass@k per problem and overall with bootstrap
  intervals (`training.engine.metrics`), the same at every budget, and mean tokens used.

Also here: which problems an adapter was trained on (`adapter_training_problem_ids`, from an
optional `dail-training.json`), whether an adapter belongs to a base model
(`check_adapter_base`), and a seeded held-out split of problem keys.

This module knows nothing about Django or the database: problems are keys and strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expansion.engine.model_views import left_pad
from expansion.engine.prompts import LEARNER_TEMPLATE, PromptTemplates, chat_prompt_text
from expansion.engine.rollout import SEED_MAX, is_plain_int
from expansion.engine.vllm_backend.availability import vllm_unavailable_reason
from training.engine.metrics import PassAtKReport, pass_at_k_report

EVALUATION_TEMPLATE = LEARNER_TEMPLATE + "Put your final answer within \\boxed{}.\n"
# The learner prompt after one worked example of the answer format. The embedded
# SmolLM2-135M almost never writes a `\\boxed{}` answer under EVALUATION_TEMPLATE (0 % pass@1
# on every generated family, `docs/benchmarks/generated_difficulty.json`); shown one short
# solution that ends in a box, it often does, so easy problems become partly solvable and
# base, SFT and DAIL can differ. The example (1 + 2 + 3) is trivial and outside the generated
# families' ranges. Not the default: the paper's prompt has no example.
WORKED_EXAMPLE_TEMPLATE = (
    "## Example\nProblem: Compute $1 + 2 + 3$.\n"
    "Solution: $1 + 2 = 3$, and $3 + 3 = 6$. The answer is $\\boxed{6}$.\n\n"
    "## Problem:\n{problem}\n\n"
    "Write the computation, then the answer in $\\boxed{}$, as in the example.\n"
)
EVALUATION_TEMPLATES = {"default": EVALUATION_TEMPLATE, "worked-example": WORKED_EXAMPLE_TEMPLATE}
TRAINING_SNAPSHOT_FILE = "dail-training.json"
BACKENDS = ("transformers", "vllm")
MAX_SAMPLES = 1024
MAX_NEW_TOKENS = 32768
MAX_BATCH_SIZE = 32  # sequences per backend call, by default (`SamplingSettings`)
MAX_TOP_K = 1000


class EvaluationError(ValueError):
    """Settings or inputs that an evaluation cannot use (the message says why)."""


def check_seed(name: str, seed: object) -> None:
    """Refuse a seed that is not a whole number in [0, SEED_MAX] (the expansion engine's
    bound: seeds are stored in signed 64-bit columns)."""
    if not is_plain_int(seed) or not 0 <= seed <= SEED_MAX:
        raise EvaluationError(f"{name} must be a whole number in [0, {SEED_MAX}]; got {seed!r}")


class BackendUnavailableError(EvaluationError):
    """The chosen sampling backend cannot run here."""


class AdapterError(EvaluationError):
    """An adapter directory that is missing, unreadable, or belongs to another base model."""


# --- Settings --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationProtocol:
    """How samples are drawn beyond temperature and top-p: a named protocol, so numbers can
    be compared with the paper's (`release`) or with earlier workbench evaluations."""

    name: str
    label: str
    source: str
    presence_penalty: float = 0.0  # subtracted from the logits of tokens already generated
    stop_strings: tuple[str, ...] = ()  # the first pass ends at any of these (not kept)
    force_answer: bool = False  # a second pass for samples without `\\boxed{`
    force_answer_prompt: str = "\n The final answer (in \\boxed{}):"
    force_answer_tokens: int = 100


EVALUATION_PROTOCOLS: dict[str, EvaluationProtocol] = {
    protocol.name: protocol
    for protocol in (
        EvaluationProtocol(
            "workbench",
            "workbench: plain sampling",
            "Ours: temperature, top-p and the optional top-k only, until EOS or the largest "
            "budget.",
        ),
        EvaluationProtocol(
            "release",
            "release: presence penalty 1.5, stop at </think>, force an answer",
            "The release's eval/eval.py: presence_penalty=1.5, stop at </think>, then a second "
            "pass for samples without a \\boxed{ that continues the assistant turn with "
            "'\\n The final answer (in \\\\boxed{}):' for 100 more tokens.",
            presence_penalty=1.5,
            stop_strings=("</think>",),
            force_answer=True,
        ),
    )
}
DEFAULT_PROTOCOL = "workbench"


@dataclass(frozen=True)
class SamplingSettings:
    """How completions are drawn; validated on creation."""

    samples: int  # n per problem
    max_new_tokens: int  # the largest token budget
    temperature: float = 0.6
    top_p: float = 0.95
    # Sample from the k most likely tokens only (after temperature, before top-p); None: no
    # top-k cut (not transformers' default of 50).
    top_k: int | None = None
    seed: int = 0
    batch_size: int = 8
    protocol: str = DEFAULT_PROTOCOL  # a key of EVALUATION_PROTOCOLS
    # The most sequences one backend call holds: units are packed up to it (`pack_units`).
    # Not recorded with an evaluation; on transformers, grouping decides the call seeds.
    max_batch_size: int = MAX_BATCH_SIZE

    @property
    def protocol_spec(self) -> EvaluationProtocol:
        return EVALUATION_PROTOCOLS[self.protocol]

    def __post_init__(self) -> None:
        if self.protocol not in EVALUATION_PROTOCOLS:
            raise EvaluationError(
                f"unknown protocol {self.protocol!r}; choose one of "
                f"{', '.join(EVALUATION_PROTOCOLS)}"
            )
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
        if self.top_k is not None and (
            not is_plain_int(self.top_k) or not 1 <= self.top_k <= MAX_TOP_K
        ):
            raise EvaluationError(
                f"top_k must be empty (no top-k) or a whole number 1..{MAX_TOP_K}; "
                f"got {self.top_k!r}"
            )
        if not 1 <= self.batch_size <= 1024:
            raise EvaluationError(f"batch_size must be 1..1024; got {self.batch_size}")
        if not 1 <= self.max_batch_size <= 4096:
            raise EvaluationError(f"max_batch_size must be 1..4096; got {self.max_batch_size}")
        check_seed("seed", self.seed)


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
    forced_tokens: int = 0  # of token_count: generated by the force-answer pass


def sample_batches(samples: int, batch_size: int) -> list[range]:
    """The fixed batches of sample indices: [0, b), [b, 2b), ... (the unit of resumption)."""
    return [
        range(start, min(start + batch_size, samples)) for start in range(0, samples, batch_size)
    ]


def batch_seed(seed: int, problem_key: str, batch_index: int) -> int:
    """The torch seed of one batch: stable across runs, processes and resumptions."""
    digest = hashlib.blake2b(f"{seed}\x1f{problem_key}\x1f{batch_index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class SamplingUnit:
    """One prompt's batch of sample indices (a problem's batch of `sample_batches`): the unit
    of resumption. A backend call draws one or more units."""

    key: str  # the problem key and batch index (`unit_key`): names the unit in call seeds
    prompt_ids: tuple[int, ...]
    sample_indices: tuple[int, ...]
    seed: int  # `batch_seed(seed, problem key, batch index)`: vLLM's per-sample seeds


def unit_key(problem_key: str, batch_index: int) -> str:
    return f"{problem_key}#{batch_index}"


def problem_units(
    problem_key: str,
    prompt_ids: Sequence[int],
    settings: SamplingSettings,
    *,
    stored: Collection[int] = (),
) -> list[SamplingUnit]:
    """A problem's units that still miss a sample (a unit is drawn whole; the caller stores
    only the missing ones)."""
    return [
        SamplingUnit(
            key=unit_key(problem_key, batch_index),
            prompt_ids=tuple(int(i) for i in prompt_ids),
            sample_indices=tuple(indices),
            seed=batch_seed(settings.seed, problem_key, batch_index),
        )
        for batch_index, indices in enumerate(sample_batches(settings.samples, settings.batch_size))
        if any(i not in stored for i in indices)
    ]


def pack_units(units: Sequence[SamplingUnit], max_batch_size: int) -> list[list[SamplingUnit]]:
    """Consecutive units grouped into calls of at most `max_batch_size` sequences (a unit
    larger than that is a call on its own)."""
    calls: list[list[SamplingUnit]] = []
    rows = 0
    for unit in units:
        if calls and rows + len(unit.sample_indices) <= max_batch_size:
            calls[-1].append(unit)
            rows += len(unit.sample_indices)
        else:
            calls.append([unit])
            rows = len(unit.sample_indices)
    return calls


def call_seed(seed: int, units: Sequence[SamplingUnit]) -> int:
    """The torch seed of one transformers call: the evaluation seed and the units it holds."""
    return batch_seed(seed, "|".join(unit.key for unit in units), 0)


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


class PresencePenaltyProcessor:
    """vLLM's `presence_penalty` as a transformers logits processor: subtract `penalty` from
    the logits of every token that already occurs in the completion (generated tokens only,
    not the prompt), once however often it occurs. transformers applies custom processors
    before temperature and top-p, as vLLM applies its penalties before them."""

    def __init__(self, penalty: float, prompt_length: int) -> None:
        self.penalty = float(penalty)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids[:, self.prompt_length :]  # (B, t)
        if self.penalty == 0 or generated.shape[1] == 0:
            return scores
        present = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)  # (B, V)
        present.scatter_(1, generated.to(scores.device), True)
        return scores - self.penalty * present.to(scores.dtype)


def _cut_at_stop(
    tokenizer: Any, ids: list[int], stop_strings: Sequence[str]
) -> tuple[list[int], str] | None:
    """(ids up to the token that completes the first stop string, the text before it), or
    None when no stop string occurs. The stop string itself is not part of the text (as in
    vLLM); it may be an ordinary string or a special token (hence the raw decoding)."""

    def stops(length: int) -> bool:
        prefix = tokenizer.decode(ids[:length], skip_special_tokens=False)
        return any(stop in prefix for stop in stop_strings)

    if not ids or not stops(len(ids)):
        return None
    low, high = 1, len(ids)  # the shortest prefix that contains a stop string
    while low < high:
        middle = (low + high) // 2
        if stops(middle):
            high = middle
        else:
            low = middle + 1
    text = tokenizer.decode(ids[:low], skip_special_tokens=True)
    hits = [text.find(stop) for stop in stop_strings if stop in text]
    return ids[:low], text[: min(hits)] if hits else text


def _completion(
    tokenizer: Any, index: int, ids: Sequence[int], ended: bool, protocol: EvaluationProtocol
) -> Completion:
    """A first-pass completion from its generated ids (EOS already removed)."""
    ids = [int(i) for i in ids]
    cut = _cut_at_stop(tokenizer, ids, protocol.stop_strings) if protocol.stop_strings else None
    if cut is not None:
        ids, text = cut
        finish = "stop"
    else:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        finish = "eos" if ended else "length"
    return Completion(
        sample_index=int(index),
        text=text,
        token_count=len(ids),
        finish_reason=finish,
        token_ids=tuple(ids),
    )


def needs_forced_answer(completion: Completion, protocol: EvaluationProtocol) -> bool:
    """The release forces an answer from samples whose text has no `\\boxed{`."""
    return protocol.force_answer and "\\boxed{" not in completion.text


def force_answer_prompt_ids(
    tokenizer: Any, prompt_ids: Sequence[int], completion: Completion, protocol: EvaluationProtocol
) -> list[int]:
    """The prompt of the force-answer pass: the assistant turn continued with the sample's
    text (without a stop string, as the release's text) and the force-answer prompt."""
    tail = completion.text + protocol.force_answer_prompt
    return list(prompt_ids) + list(tokenizer(tail, add_special_tokens=False)["input_ids"])


def _with_forced_answer(
    tokenizer: Any, completion: Completion, forced_ids: Sequence[int], protocol: EvaluationProtocol
) -> Completion:
    forced = [int(i) for i in forced_ids]
    return dataclasses.replace(
        completion,
        text=completion.text
        + protocol.force_answer_prompt
        + tokenizer.decode(forced, skip_special_tokens=True),
        token_count=completion.token_count + len(forced),
        token_ids=completion.token_ids + tuple(forced),
        forced_tokens=len(forced),
    )


def force_answer_seed(seed: int, sample_index: int) -> int:
    """The seed of one sample's force-answer pass (both backends)."""
    return batch_seed(seed, "force-answer", sample_index) & ((1 << 31) - 1)


def _generate_rows(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    settings: SamplingSettings,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    on_step: Callable[[int], None] | None = None,
) -> list[tuple[list[int], bool]]:
    """One sample per prompt with one `model.generate` over all of them: (ids before EOS,
    ended by EOS) per row. Prompts are left-padded (attention mask 0 on the padding), so
    every row's prompt ends at the same column P and `[:, P:]` is exactly what was generated
    (what the presence penalty, the stop strings and the EOS cut look at)."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    device = next(model.parameters()).device
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    input_ids, valid = left_pad([list(p) for p in prompts], device, pad)  # (B, P)
    prompt_length = input_ids.shape[1]
    criteria = StoppingCriteriaList([_StepCallback(prompt_length, on_step)] if on_step else [])
    penalty = settings.protocol_spec.presence_penalty
    processors = LogitsProcessorList(
        [PresencePenaltyProcessor(penalty, prompt_length)] if penalty else []
    )
    extra: dict[str, Any] = (
        {"stop_strings": list(stop_strings), "tokenizer": tokenizer} if stop_strings else {}
    )
    output = model.generate(
        input_ids=input_ids,
        attention_mask=valid.long(),
        do_sample=True,
        temperature=settings.temperature,
        top_p=settings.top_p,
        # transformers' 0 disables top-k (None would fall back to its default of 50)
        top_k=settings.top_k or 0,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=pad,
        stopping_criteria=criteria,
        logits_processor=processors,
        **extra,
    )
    generated = output[:, prompt_length:].cpu()  # (B, T)
    is_eos = torch.isin(generated, torch.tensor(eos))  # (B, T)
    result = []
    for row in range(generated.shape[0]):
        hits = torch.nonzero(is_eos[row]).flatten()
        count = int(hits[0]) if hits.numel() else generated.shape[1]
        result.append((generated[row, :count].tolist(), bool(hits.numel())))
    return result


def _by_unit(units: Sequence[SamplingUnit], rows: Sequence[Any]) -> list[list[Any]]:
    """Split a call's rows (units' samples in order) back into one list per unit."""
    result, start = [], 0
    for unit in units:
        result.append(list(rows[start : start + len(unit.sample_indices)]))
        start += len(unit.sample_indices)
    if start != len(rows):
        raise EvaluationError(f"the backend returned {len(rows)} samples for {start} requests")
    return result


@torch.no_grad()
def generate_completions_transformers(
    model: Any,
    tokenizer: Any,
    units: Sequence[SamplingUnit],
    *,
    settings: SamplingSettings,
    on_step: Callable[[int], None] | None = None,
) -> list[list[Completion]]:
    """One call: every unit's samples in one `model.generate` (one row per sample, prompts
    left-padded), seeded by `call_seed`; then (release protocol) one more `generate` for all
    samples without a box, seeded from the call seed too. Completions per unit, in order."""
    protocol = settings.protocol_spec
    seed = call_seed(settings.seed, units)
    torch.manual_seed(seed)
    rows = _generate_rows(
        model,
        tokenizer,
        [unit.prompt_ids for unit in units for _ in unit.sample_indices],
        settings=settings,
        max_new_tokens=settings.max_new_tokens,
        stop_strings=protocol.stop_strings,
        on_step=on_step,
    )
    completions = [
        [
            _completion(tokenizer, index, ids, ended, protocol)
            for index, (ids, ended) in zip(unit.sample_indices, unit_rows, strict=True)
        ]
        for unit, unit_rows in zip(units, _by_unit(units, rows), strict=True)
    ]
    forced = [
        (u, s)
        for u, unit_completions in enumerate(completions)
        for s, completion in enumerate(unit_completions)
        if needs_forced_answer(completion, protocol)
    ]
    if forced:
        torch.manual_seed(force_answer_seed(seed, 0))  # the call's force-answer pass
        answers = _generate_rows(
            model,
            tokenizer,
            [
                force_answer_prompt_ids(tokenizer, units[u].prompt_ids, completions[u][s], protocol)
                for u, s in forced
            ],
            settings=settings,
            max_new_tokens=protocol.force_answer_tokens,
        )
        for (u, s), (ids, _ended) in zip(forced, answers, strict=True):
            completions[u][s] = _with_forced_answer(tokenizer, completions[u][s], ids, protocol)
    return completions


def sample_seed(batch_seed_value: int, sample_index: int) -> int:
    """The vLLM seed of one sample of a unit (see the module docstring)."""
    return batch_seed(batch_seed_value, "sample", sample_index) & ((1 << 31) - 1)


def vllm_sampling_kwargs(
    settings: SamplingSettings,
    *,
    seed: int,
    max_tokens: int,
    stop_token_ids: Sequence[int],
    first_pass: bool = True,
) -> dict[str, Any]:
    """The `vllm.SamplingParams` arguments of one sample under the evaluation's protocol (stop
    strings only on the first pass; they need detokenisation)."""
    protocol = settings.protocol_spec
    stop = list(protocol.stop_strings) if first_pass else []
    kwargs: dict[str, Any] = {
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k or 0,  # vLLM's 0 disables top-k (its default)
        "max_tokens": max_tokens,
        "seed": seed,
        "stop_token_ids": sorted(stop_token_ids),
        "detokenize": bool(stop),
    }
    if protocol.presence_penalty:
        kwargs["presence_penalty"] = protocol.presence_penalty
    if stop:
        kwargs["stop"] = stop
    return kwargs


def generate_completions_vllm(
    sampler: Any,
    tokenizer: Any,
    units: Sequence[SamplingUnit],
    *,
    settings: SamplingSettings,
) -> list[list[Completion]]:
    """One call on vLLM: `sampler` is a `vllm_backend.backends.VllmBackend`, whose adapter (if set)
    samples as the learner. Every unit's samples are one `generate` call, each request seeded
    by `sample_seed(unit.seed, index)` (and the force-answer passes of the release protocol
    one more call, seeded by `force_answer_seed(unit.seed, index)`), so a sample does not
    depend on which units share its call. Completions per unit, in order."""
    from vllm import SamplingParams, TokensPrompt

    protocol = settings.protocol_spec
    eos = set(sampler.default_eos_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    if not eos:
        raise EvaluationError("the model and tokenizer name no end-of-sequence token")

    def ids_of(output: Any) -> tuple[list[int], bool]:
        ids = list(output.outputs[0].token_ids)
        ended = bool(ids) and ids[-1] in eos
        return (ids[:-1] if ended else ids), ended  # EOS itself is not counted

    prompts, params = [], []
    for unit in units:
        prompt = TokensPrompt(prompt_token_ids=list(unit.prompt_ids))
        for index in unit.sample_indices:
            prompts.append(prompt)
            params.append(
                SamplingParams(
                    **vllm_sampling_kwargs(
                        settings,
                        seed=sample_seed(unit.seed, int(index)),
                        max_tokens=settings.max_new_tokens,
                        stop_token_ids=eos,
                    )
                )
            )
    outputs = sampler.generate(prompts, params, ["learner"] * len(params))
    completions = [
        [
            _completion(tokenizer, index, *ids_of(output), protocol)
            for index, output in zip(unit.sample_indices, unit_outputs, strict=True)
        ]
        for unit, unit_outputs in zip(units, _by_unit(units, outputs), strict=True)
    ]
    forced = [
        (u, s)
        for u, unit_completions in enumerate(completions)
        for s, completion in enumerate(unit_completions)
        if needs_forced_answer(completion, protocol)
    ]
    if forced:
        forced_prompts = [
            TokensPrompt(
                prompt_token_ids=force_answer_prompt_ids(
                    tokenizer, units[u].prompt_ids, completions[u][s], protocol
                )
            )
            for u, s in forced
        ]
        forced_params = [
            SamplingParams(
                **vllm_sampling_kwargs(
                    settings,
                    seed=force_answer_seed(units[u].seed, completions[u][s].sample_index),
                    max_tokens=protocol.force_answer_tokens,
                    stop_token_ids=eos,
                    first_pass=False,
                )
            )
            for u, s in forced
        ]
        answers = sampler.generate(forced_prompts, forced_params, ["learner"] * len(forced))
        for (u, s), output in zip(forced, answers, strict=True):
            completions[u][s] = _with_forced_answer(
                tokenizer, completions[u][s], ids_of(output)[0], protocol
            )
    return completions


def generate_completions(
    backend: str,
    model: Any,
    tokenizer: Any,
    units: Sequence[SamplingUnit],
    *,
    settings: SamplingSettings,
    on_step: Callable[[int], None] | None = None,
) -> list[list[Completion]]:
    """The sampling switch: one backend call drawing every unit's samples (`model` is the
    transformers model, or for "vllm" a `vllm_backend.backends.VllmBackend`); a list of completions
    per unit, in the units' order. `on_step` (transformers) hears each decoding step and may
    raise to stop the call."""
    if backend not in BACKENDS:
        raise BackendUnavailableError(
            f"The {backend} backend cannot run evaluations: {backend_unavailable_reason(backend)}."
        )
    if not units:
        return []
    if backend == "transformers":
        return generate_completions_transformers(
            model, tokenizer, units, settings=settings, on_step=on_step
        )
    return generate_completions_vllm(model, tokenizer, units, settings=settings)


# --- Metrics ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleOutcome:
    correct: bool  # after a person's ruling, when there is one
    tokens: int  # every generated token, the force-answer pass's included
    forced_tokens: int = 0  # of `tokens`: the force-answer pass (release protocol)


def correct_within_budget(outcome: SampleOutcome, budget: int) -> bool:
    """Counted at budget B: correct and used at most B tokens (see the module docstring). The
    budget caps the first pass; the release's force-answer pass comes on top of it."""
    return outcome.correct and outcome.tokens - outcome.forced_tokens <= budget


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
    check_seed("the split seed", seed)
    digest = hashlib.blake2b(f"{seed}\x1fsplit\x1f{problem_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction
