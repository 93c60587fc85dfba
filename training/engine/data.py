"""Training examples and the collator that lines the three views up.

A `TrainingExample` is token ids only: the learner, privileged and negative-reference prompts
(three different prompts, each already rendered through the model's chat template and ending
where the assistant turn begins) and the shared response `r`, plus an optional per-token
shortcut mask from the reviewer. A learner-only example (`TrainingExample.learner_only`: no
privileged or negative prompt, e.g. an expert solution as the response) trains with the NLL
objective only; the collator refuses it when the reference views are read. This module knows
nothing about text, chat templates or models: whoever builds the examples owns the tokenizer.

Layout. Each view v is one right-padded batch of `prompt_v + response`. The logits that predict
response token t sit at position `len(prompt_v) - 1 + t` of view v; the collator returns those
indices as `(B, T)` "position" maps, so gathering each view's logits at its map gives three
`(B, T, V)` tensors whose rows describe the same response token. Padding sits after every real
token, so a causal model needs no attention mask for these batches (no real token can see a
later position); the trainer relies on that.

Over-long traces are handled once, before training (`fit_to_length`), and counted:
"truncate" cuts the response so the longest view fits `max_length`; "skip" drops the trace.
A trace whose prompt alone leaves no room for a single response token is dropped either way.

Departure from the release: the release truncates; "skip" and the counts are ours.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import Tensor

VIEWS: tuple[str, ...] = ("learner", "privileged", "negative")


@dataclass(frozen=True)
class TrainingExample:
    """One kept trace, as token ids of the three prompts and the shared response."""

    learner_prompt_ids: tuple[int, ...]
    privileged_prompt_ids: tuple[int, ...]
    negative_prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    shortcut_mask: tuple[bool, ...] | None = None  # per response token: reviewer-marked shortcut
    example_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("learner_prompt_ids", "privileged_prompt_ids", "negative_prompt_ids"):
            object.__setattr__(self, name, tuple(int(i) for i in getattr(self, name)))
        if not self.learner_prompt_ids:
            raise ValueError("learner_prompt_ids is empty: the learner needs a prompt")
        reference_views = (self.privileged_prompt_ids, self.negative_prompt_ids)
        if any(reference_views) and not all(reference_views):
            raise ValueError(
                "privileged_prompt_ids and negative_prompt_ids are both given or both empty "
                "(a learner-only example)"
            )
        response = tuple(int(i) for i in self.response_ids)
        if not response:
            raise ValueError("response_ids is empty")
        object.__setattr__(self, "response_ids", response)
        if self.shortcut_mask is not None:
            marks = tuple(bool(m) for m in self.shortcut_mask)
            if len(marks) != len(response):
                raise ValueError(
                    f"shortcut_mask has {len(marks)} entries for {len(response)} response tokens"
                )
            object.__setattr__(self, "shortcut_mask", marks)

    @classmethod
    def learner_only(
        cls, prompt_ids: Sequence[int], response_ids: Sequence[int], example_id: str | None = None
    ) -> TrainingExample:
        """An example with the learner view alone (e.g. an expert solution as the response):
        it trains with the NLL objective only; the collator refuses it for DAIL."""
        return cls(tuple(prompt_ids), (), (), tuple(response_ids), None, example_id)

    @property
    def is_learner_only(self) -> bool:
        return not self.privileged_prompt_ids

    def prompt(self, view: str) -> tuple[int, ...]:
        return getattr(self, f"{view}_prompt_ids")  # type: ignore[no-any-return]

    @cached_property
    def reference_key(self) -> str:
        """What the frozen PS and NR outputs depend on: their prompts and the response."""
        digest = hashlib.sha256()
        for part in (self.privileged_prompt_ids, self.negative_prompt_ids, self.response_ids):
            digest.update(repr(part).encode())
        return digest.hexdigest()[:40]

    def longest_view(self, views: Sequence[str] = VIEWS) -> int:
        return max(len(self.prompt(v)) for v in views) + len(self.response_ids)


@dataclass
class OverlongCounts:
    """What `fit_to_length` did to the traces that did not fit."""

    truncated: int = 0  # traces whose response was cut
    skipped: int = 0  # traces dropped because they were too long ("skip" policy)
    prompt_too_long: int = 0  # traces dropped because a prompt alone fills max_length
    response_tokens_dropped: int = 0  # tokens cut from truncated responses

    def as_dict(self) -> dict[str, int]:
        return {
            "truncated": self.truncated,
            "skipped": self.skipped,
            "prompt_too_long": self.prompt_too_long,
            "response_tokens_dropped": self.response_tokens_dropped,
        }


def views_for(objective: str) -> tuple[str, ...]:
    """The views an objective reads: NLL trains on the learner view alone."""
    return ("learner",) if objective == "nll" else VIEWS


def fit_to_length(
    examples: Iterable[TrainingExample],
    max_length: int,
    policy: str,
    views: Sequence[str] = VIEWS,
) -> tuple[list[TrainingExample], OverlongCounts]:
    """Make every used view fit `max_length` tokens, by the "truncate" or "skip" policy."""
    if policy not in ("truncate", "skip"):
        raise ValueError(f"policy must be 'truncate' or 'skip'; got {policy!r}")
    kept: list[TrainingExample] = []
    counts = OverlongCounts()
    for example in examples:
        if example.longest_view(views) <= max_length:
            kept.append(example)
            continue
        room = max_length - max(len(example.prompt(v)) for v in views)
        if room < 1:
            counts.prompt_too_long += 1
        elif policy == "skip":
            counts.skipped += 1
        else:
            counts.truncated += 1
            counts.response_tokens_dropped += len(example.response_ids) - room
            marks = example.shortcut_mask
            kept.append(
                TrainingExample(
                    example.learner_prompt_ids,
                    example.privileged_prompt_ids,
                    example.negative_prompt_ids,
                    example.response_ids[:room],
                    None if marks is None else marks[:room],
                    example.example_id,
                )
            )
    return kept, counts


def examples_fingerprint(examples: Sequence[TrainingExample]) -> str:
    """A hash of every token id and mark, so a resumed run can refuse different data."""
    digest = hashlib.sha256()
    for example in examples:
        for part in (
            example.learner_prompt_ids,
            example.privileged_prompt_ids,
            example.negative_prompt_ids,
            example.response_ids,
            example.shortcut_mask or (),
        ):
            digest.update(repr(part).encode())
        digest.update(b"|")
    return digest.hexdigest()


def right_padded(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """One view's batch: `input_ids` (B, L) right-padded, `positions` (B, T) index map.

    `positions[i, t]` is the index of the logit that predicts response token t of row i
    (clamped into the row for t past the row's response; those entries are masked anyway)."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    rows = len(prompts)
    longest_response = max(len(r) for r in responses)
    input_ids = torch.full((rows, width), pad_token_id, dtype=torch.long)  # (B, L)
    for i, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        input_ids[i, : lengths[i]] = torch.tensor([*prompt, *response], dtype=torch.long)
    prompt_lengths = torch.tensor([len(p) for p in prompts])  # (B,)
    steps = torch.arange(longest_response)  # (T,)
    positions = (prompt_lengths[:, None] - 1 + steps[None, :]).clamp(max=width - 1)  # (B, T)
    return input_ids, positions


@dataclass
class DailCollator:
    """Builds the batch of each view plus the shared response tensors.

    Returns a dict with, for each view v in `views`, `{v}_input_ids` (B, L_v) and
    `{v}_positions` (B, T); `response_ids` (B, T), `response_mask` (B, T) bool and
    `shortcut_mask` (B, T) bool (all False where the reviewer marked nothing); and, when the
    reference views are in, `reference_keys` (a list of B strings, for the reference cache).
    """

    pad_token_id: int = 0
    views: tuple[str, ...] = field(default=VIEWS)

    def __call__(self, examples: Sequence[TrainingExample]) -> dict[str, Any]:
        if self.views != ("learner",):
            for example in examples:
                if example.is_learner_only:
                    raise ValueError(
                        f"example {example.example_id or '?'} has the learner view only (no "
                        "privileged or negative prompt): it trains with the NLL objective, "
                        "not with DAIL"
                    )
        responses = [e.response_ids for e in examples]
        batch: dict[str, Any] = {}
        for view in self.views:
            prompts = [e.prompt(view) for e in examples]
            ids, positions = right_padded(prompts, responses, self.pad_token_id)
            batch[f"{view}_input_ids"] = ids  # (B, L_v)
            batch[f"{view}_positions"] = positions  # (B, T)
        longest = max(len(r) for r in responses)
        response_ids = torch.full((len(examples), longest), self.pad_token_id)  # (B, T)
        response_mask = torch.zeros(len(examples), longest, dtype=torch.bool)  # (B, T)
        shortcut_mask = torch.zeros(len(examples), longest, dtype=torch.bool)  # (B, T)
        for i, example in enumerate(examples):
            size = len(example.response_ids)
            response_ids[i, :size] = torch.tensor(example.response_ids)
            response_mask[i, :size] = True
            if example.shortcut_mask is not None:
                shortcut_mask[i, :size] = torch.tensor(example.shortcut_mask)
        batch.update(
            response_ids=response_ids, response_mask=response_mask, shortcut_mask=shortcut_mask
        )
        if "privileged" in self.views:
            batch["reference_keys"] = [e.reference_key for e in examples]
        return batch
