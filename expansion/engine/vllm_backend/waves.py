"""The wave algorithm: a batch of sequences expanded together on vLLM until each has finished.

A `Wave` holds up to `max_batch_size` sequences and sends every request of a step as one
batched `generate` (through `VllmBackend.generate`, which attaches the learner's adapter).
Three ways to run it:

- `run` with both views consulted (0 < tau < 1), per cycle:
  1. the *drafting* view generates K tokens (`generate`, `logprobs=N`): vLLM returns its
     top-N raw log-probs at each drafted position, and the drafting logits processor
     (`drafting`) makes it emit the rule's best guess, drawn from the same keyed random
     numbers as the transformers engines (proposer: its first candidate; verifier: its
     acceptable top token, else its fallback sample);
  2. the *checking* view returns its top-N at the K drafted positions, one request per
     sequence, in one of two ways (the backend's `verify`):
     - "prompt_logprobs" (engines without LoRA): it reads the K - 1 first drafts as prompt
       tokens and generates one token (`prompt_logprobs=N`, `logprobs=N`): one prefill pass.
       The prefix cache is read (only the rows of the new tokens are needed), with a cache
       salt per wave so that an earlier rollout of the same requests cannot hide those rows
       (a sequence of the same wave rarely can: such a check is redone without the cache);
     - "decode" (engines with LoRA enabled, whose prompt log-probs fail in vLLM:
       vllm-project/vllm#29955, #51594): it generates the K drafts, forced by the same logits
       processor, returning its raw top-N at each step (K decode steps);
  3. with both views' distributions at every position, the rule (`decisions`) decides each
     position exactly as the transformers engines do; the first position whose outcome
     differs from the draft ends the cycle for that sequence, and the next cycle starts
     after it. The block size adapts with `rollout.adapted_block_size`.
  Each such wave starts by computing every distinct prompt of both views once (samples of a
  problem share them; requests in one engine step do not), and its first block is at least
  one KV cache block long (32 tokens on CPU): a cycle re-reads up to a block of context per
  view.
- `run` with one view consulted (tau = 0: the proposer alone decides; tau = 1: the verifier
  alone, `rollout.single_view`): one `generate` per sequence from that view with the
  remaining token budget, stopping at EOS. The drafting processor's guess is then the
  decision itself, so nothing is checked and the other view is never asked: its log-probs
  are NaN (scoring computes every view's afterwards), as in the transformers fast engine.
- `run_per_token`: the release's loop, per token one request per view per sequence
  (`max_tokens=1`, `logprobs=N`), batched across sequences.

Every engine's commit rules apply (`rollout.token_ending`, `rollout.length_ending`): the
first non-finite position fails its sequence with the other backends' message (vLLM's own NaN
guard may already have replaced NaNs; then nothing is detected), EOS ends it and is not kept,
`max_new_tokens` ends it.

A consulted view's log-prob of a chosen token outside its returned top-N (e.g. the learner's
log-prob of a privileged fallback) is read from the checker's prompt log-probs of the next
cycle when vLLM computed that row, otherwise, after the wave, from one forced one-token
request per such token (`VllmRolloutStats.logprob_rescores`).

This module knows nothing about tokenizers, prompts or storage, nor how the engine was made;
it imports vLLM only inside the functions that build requests.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from expansion.engine.rollout import (
    SOURCE_LEARNER,
    SOURCE_PRIVILEGED,
    VIEWS,
    RolloutConfig,
    RolloutError,
    RolloutRequest,
    RolloutResult,
    ViewScores,
    adapted_block_size,
    finished_result,
    length_ending,
    single_view,
    token_ending,
)
from expansion.engine.vllm_backend.decisions import (
    PositionDecisions,
    decide_positions,
    single_view_decisions,
)
from expansion.engine.vllm_backend.outputs import TopLogprobs, top_logprobs_from_flat

if TYPE_CHECKING:
    from expansion.engine.vllm_backend.backends import VllmBackend, VllmRolloutStats

_wave_ids = itertools.count(1)


@dataclass
class _Sequence:
    """One trace being expanded."""

    request: RolloutRequest
    token_ids: list[int] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)
    draws: list[int] = field(default_factory=list)
    logprobs: dict[str, list[float]] = field(default_factory=lambda: {view: [] for view in VIEWS})
    # (view, index) -> normaliser, for log-probs still to be read from a later request
    missing: dict[tuple[str, int], float] = field(default_factory=dict)
    finish: tuple[str, str | None] | None = None
    view_scores: dict[str, ViewScores] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return len(self.token_ids)


class Wave:
    """Sequences expanded together until each has finished (see the module docstring)."""

    def __init__(
        self,
        backend: VllmBackend,
        requests: list[RolloutRequest],
        config: RolloutConfig,
        stats: VllmRolloutStats,
        report: Callable[[int], None],
        score_top_n: int | None = None,
    ) -> None:
        self.backend = backend
        self.score_top_n = score_top_n
        self.config = config
        self.stats = stats
        self.report = report
        self.sequences = [_Sequence(r) for r in requests]
        self.top_n = config.top_k + len(set(config.forbidden_token_ids))
        self.eos = set(config.eos_token_ids)
        self.proposer_source = SOURCE_LEARNER if config.proposer == "learner" else SOURCE_PRIVILEGED
        draft_view = config.draft_view
        if draft_view == "auto":
            draft_view = "verifier" if config.tau >= 0.5 else "proposer"
        self.drafter = config.proposer if draft_view == "proposer" else config.verifier
        self.checker = config.verifier if self.drafter == config.proposer else config.proposer
        self.consulted: tuple[str, ...] = VIEWS  # a single-view run asks one view only
        # A cycle re-reads up to one KV block of context per view (vLLM caches full blocks
        # only), so blocks shorter than a KV block cost more than they save.
        self.block = min(max(config.block_size, backend.cache_block_size), config.max_block_size)
        self.salt = f"dail-{id(backend):x}-{next(_wave_ids)}"  # see `_check`

    def active(self) -> list[_Sequence]:
        return [s for s in self.sequences if s.finish is None]

    def results(self) -> list[RolloutResult]:
        self._rescore_missing()
        return [
            finished_result(
                s.request,
                self.config,
                s.token_ids,
                s.sources,
                s.draws,
                s.logprobs["learner"],
                s.logprobs["privileged"],
                finish_reason=s.finish[0],  # type: ignore[arg-type,index]
                error=s.finish[1],  # type: ignore[index]
                view_scores=s.view_scores,
            )
            for s in self.sequences
        ]

    def run(self) -> list[RolloutResult]:
        """Expand the wave: one view's sampling when only one is consulted, else blocks."""
        view = single_view(self.config)
        if view is not None:
            return self.run_single_view(view)
        return self.run_blocks()

    def _params(self, **options: Any) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            temperature=0.0,
            detokenize=False,
            skip_special_tokens=False,
            ignore_eos=True,
            flat_logprobs=True,
            **options,
        )

    @staticmethod
    def _prompt(ids: Sequence[int], cache_salt: str | None = None) -> Any:
        from vllm import TokensPrompt

        prompt = TokensPrompt(prompt_token_ids=list(ids))
        if cache_salt is not None:
            prompt["cache_salt"] = cache_salt
        return prompt

    def _draft_params(self, sequence: _Sequence, view: str, max_tokens: int, **options: Any) -> Any:
        """A request in which `view` generates the rule's guesses from `sequence.done` on."""
        from expansion.engine.vllm_backend.drafting import draft_args

        config = self.config
        return self._params(
            max_tokens=max_tokens,
            logprobs=self.top_n,
            extra_args=draft_args(
                role="proposer" if view == config.proposer else "verifier",
                seed=config.seed,
                sequence_key=sequence.request.sequence_key,
                start=sequence.done,
                temperature=config.temperature,
                top_k=config.top_k,
                top_p=config.top_p,
                tau=config.tau,
                acceptance=config.acceptance,
                max_draws=config.max_draws,
                forbidden_token_ids=config.forbidden_token_ids,
            ),
            **options,
        )

    def _block_for(self, sequence: _Sequence) -> int:
        """Tokens to draft, nudged so the drafter's next prompt starts on a cached block.

        vLLM reuses only full KV blocks and recomputes the rest of a prompt: when the drafted
        tokens end one token past a block boundary, the next cycle recomputes one token.
        """
        config = self.config
        remaining = config.max_new_tokens - sequence.done
        block = min(self.block, remaining)
        unit = self.backend.cache_block_size
        if unit <= 1 or block == remaining:
            return block
        length = len(sequence.request.prompt_ids(self.drafter)) + sequence.done
        first = (1 - length) % unit or unit  # smallest k >= 1 with length + k - 1 on a boundary
        aligned = list(range(first, min(2 * block, config.max_block_size, remaining) + 1, unit))
        below = [k for k in aligned if (block + 1) // 2 <= k <= block]
        above = [k for k in aligned if k > block]
        if below:
            return below[-1]
        return above[0] if above else block

    # -- one view --

    def run_single_view(self, view: str) -> list[RolloutResult]:
        """Plain sampling from the one view the rule consults: one request per sequence for
        the whole budget, stopping at EOS, its tokens the rule's keyed choices."""
        self.consulted = (view,)
        config = self.config
        active = self.active()
        budget = config.max_new_tokens
        outputs = self.backend.generate(
            [self._prompt(s.request.prompt_ids(view)) for s in active],
            [self._draft_params(s, view, budget, stop_token_ids=sorted(self.eos)) for s in active],
            [view] * len(active),
        )
        self.stats.cycles += 1
        tokens_done = 0
        for sequence, output in zip(active, outputs, strict=True):
            generated = output.outputs[0]
            count = len(generated.token_ids)
            top = top_logprobs_from_flat(generated.logprobs, 0, count, self.top_n)
            decisions = single_view_decisions(top, view, config)
            decided = 0
            for row in range(count):
                decided += 1
                if not self._commit(sequence, decisions, row):
                    break
            if sequence.finish is None:  # vLLM stopped short of the budget without EOS
                raise RolloutError(
                    f"vLLM returned {count} of {budget} tokens for a sequence without EOS "
                    f"(finish reason {generated.finish_reason!r})"
                )
            self._record_scores(sequence, view, top)
            # The generated tokens are the decisions: every draft matches.
            self.stats.drafted += decided
            self.stats.matched_drafts += decided
            tokens_done += budget
        self.report(tokens_done)
        return self.results()

    # -- the release's loop --

    def run_per_token(self) -> list[RolloutResult]:
        params = self._params(max_tokens=1, logprobs=self.top_n)
        while active := self.active():
            views = [view for _ in active for view in VIEWS]
            prompts = [
                self._prompt(list(s.request.prompt_ids(view)) + s.token_ids)
                for s in active
                for view in VIEWS
            ]
            outputs = self.backend.generate(prompts, [params] * len(prompts), views)
            tops: dict[str, list[TopLogprobs]] = {view: [] for view in VIEWS}
            for output, view in zip(outputs, views, strict=True):
                tops[view].append(
                    top_logprobs_from_flat(output.outputs[0].logprobs, 0, 1, self.top_n)
                )
            decisions = decide_positions(
                {view: TopLogprobs.concat(tops[view]) for view in VIEWS},
                np.array([s.request.sequence_key for s in active], dtype=np.int64),
                np.array([s.done for s in active], dtype=np.int64),
                self.config,
            )
            self.stats.cycles += 1
            tokens_done = 0
            for row, sequence in enumerate(active):
                before = sequence.done
                self._commit(sequence, decisions, row)
                tokens_done += self._progress_of(sequence, before)
            self.report(tokens_done)
        return self.results()

    # -- blocks --

    def run_blocks(self) -> list[RolloutResult]:
        self._warm_prompts()
        while active := self.active():
            self._cycle(active)
        return self.results()

    def _warm_prompts(self) -> None:
        """Compute each distinct prompt of both views once, into the prefix cache.

        The samples of a problem share their prompts, but requests scheduled in the same
        engine step do not share KV blocks: without this, the first cycle would compute
        every prompt once per sample, and the checker its prompt rows' log-probs as well.
        """
        salt = self.salt if self.backend.verify == "prompt_logprobs" else None
        prompts: list[Any] = []
        views: list[str] = []
        for view, cache_salt in ((self.drafter, None), (self.checker, salt)):
            for ids in dict.fromkeys(s.request.prompt_ids(view) for s in self.sequences):
                prompts.append(self._prompt(ids, cache_salt))
                views.append(view)
        self.backend.generate(prompts, [self._params(max_tokens=1)] * len(prompts), views)

    def _cycle(self, active: list[_Sequence]) -> None:
        config, top_n = self.config, self.top_n
        sizes = [self._block_for(s) for s in active]

        # 1. Draft: the drafting view generates each sequence's block (the rule's guesses).
        drafted = self.backend.generate(
            [self._prompt(list(s.request.prompt_ids(self.drafter)) + s.token_ids) for s in active],
            [
                self._draft_params(s, self.drafter, size)
                for s, size in zip(active, sizes, strict=True)
            ],
            [self.drafter] * len(active),
        )
        drafts: list[list[int]] = []
        drafter_tops: list[TopLogprobs] = []
        for output in drafted:
            tokens = list(output.outputs[0].token_ids)
            drafts.append(tokens)
            drafter_tops.append(
                top_logprobs_from_flat(output.outputs[0].logprobs, 0, len(tokens), top_n)
            )
        sizes = [len(d) for d in drafts]

        # 2. Check: the other view reads the drafts and returns its log-probs at each.
        checker_prompts = [
            list(s.request.prompt_ids(self.checker)) + s.token_ids + d[:-1]
            for s, d in zip(active, drafts, strict=True)
        ]
        checker_tops = self._check(active, checker_prompts, sizes, drafts)

        # 3. The rule at every drafted position of every sequence.
        keys = np.concatenate(
            [
                np.full(n, s.request.sequence_key, np.int64)
                for s, n in zip(active, sizes, strict=True)
            ]
        )  # (M,)
        positions = np.concatenate(
            [s.done + np.arange(n) for s, n in zip(active, sizes, strict=True)]
        )  # (M,)
        tops = {
            self.drafter: TopLogprobs.concat(drafter_tops),
            self.checker: TopLogprobs.concat(checker_tops),
        }
        decisions = decide_positions(tops, keys, positions, config)
        self.stats.cycles += 1

        # 4. Commit each sequence up to its first miss.
        offset = 0
        fully_matched = 0
        tokens_done = 0
        for sequence, draft, size in zip(active, drafts, sizes, strict=True):
            before = sequence.done
            matched = 0
            for j in range(size):
                hit = int(decisions.token_ids[offset + j]) == draft[j]
                committed = self._commit(sequence, decisions, offset + j)
                matched += int(hit)
                if not committed or not hit:
                    break
            self.stats.drafted += size
            self.stats.matched_drafts += matched
            fully_matched += int(matched == size)
            tokens_done += self._progress_of(sequence, before)
            offset += size
        self.block = adapted_block_size(
            self.block, fully_matched / max(len(active), 1), config.max_block_size
        )
        self.report(tokens_done)

    def _check(
        self,
        active: list[_Sequence],
        prompts: list[list[int]],
        sizes: list[int],
        drafts: list[list[int]],
    ) -> list[TopLogprobs]:
        """The checker's top-N at each drafted position; redo a request whose rows were cached."""
        top_n = self.top_n
        if self.backend.verify == "decode":
            return self._check_by_decoding(active, drafts)
        cached_params = self._params(
            max_tokens=1, logprobs=top_n, prompt_logprobs=top_n, skip_reading_prefix_cache=False
        )
        # vLLM computes prompt log-probs only after the cached prefix: a block cached by an
        # earlier rollout of the same request would hide rows this check needs, so the checks
        # of a wave get their own prefix cache (a salt). Another sequence of the wave rarely
        # can (only with the same tokens): such a check is redone without the cache below.
        salts = [self.salt] * len(active)
        outputs = self.backend.generate(
            [self._prompt(p, salt) for p, salt in zip(prompts, salts, strict=True)],
            [cached_params] * len(prompts),
            [self.checker] * len(prompts),
        )
        # vLLM computes prompt log-probs only for rows after the cached prefix: row e - 1
        # (which predicts prompt token e) exists when e - 1 >= num_cached_tokens.
        firsts = [
            len(s.request.prompt_ids(self.checker)) + s.done for s in active
        ]  # entry of the first drafted position
        redo = [
            i
            for i, (output, first, size) in enumerate(zip(outputs, firsts, sizes, strict=True))
            if size > 1 and first - 1 < int(output.num_cached_tokens or 0)
        ]
        if redo:
            fresh = self._params(
                max_tokens=1, logprobs=top_n, prompt_logprobs=top_n, skip_reading_prefix_cache=True
            )
            again = self.backend.generate(
                [self._prompt(prompts[i], salts[i]) for i in redo],
                [fresh] * len(redo),
                [self.checker] * len(redo),
            )
            for i, output in zip(redo, again, strict=True):
                outputs[i] = output
            self.stats.verify_recomputes += len(redo)
        tops = []
        for sequence, output, first, size in zip(active, outputs, firsts, sizes, strict=True):
            cached = int(output.num_cached_tokens or 0)
            last = top_logprobs_from_flat(output.outputs[0].logprobs, 0, 1, top_n)
            if size > 1:
                rows = top_logprobs_from_flat(output.prompt_logprobs, first, size - 1, top_n)
                tops.append(TopLogprobs.concat([rows, last]))
            else:
                tops.append(last)
            # The previous cycle's last token: its log-prob may not have been returned then.
            index = sequence.done - 1
            if (self.checker, index) in sequence.missing and first - 2 >= cached:
                previous = top_logprobs_from_flat(output.prompt_logprobs, first - 1, 1, top_n)
                self._fill(sequence, self.checker, index, float(previous.actual_logprobs[0]))
        return tops

    def _check_by_decoding(
        self, active: list[_Sequence], drafts: list[list[int]]
    ) -> list[TopLogprobs]:
        """The checker generates the drafts (forced) and returns its top-N at each step."""
        from expansion.engine.vllm_backend.drafting import force_args

        outputs = self.backend.generate(
            [self._prompt(list(s.request.prompt_ids(self.checker)) + s.token_ids) for s in active],
            [
                self._params(max_tokens=len(d), logprobs=self.top_n, extra_args=force_args(d))
                for d in drafts
            ],
            [self.checker] * len(active),
        )
        tops = []
        for output, draft in zip(outputs, drafts, strict=True):
            if list(output.outputs[0].token_ids) != draft:
                raise RolloutError("vLLM did not follow the forced drafts while checking")
            tops.append(
                top_logprobs_from_flat(output.outputs[0].logprobs, 0, len(draft), self.top_n)
            )
        return tops

    # -- shared --

    def _record_scores(self, sequence: _Sequence, view: str, top: TopLogprobs) -> None:
        """With `score_top_n`, keep what scoring would compute for the view: vLLM's raw
        (temperature 1, unprocessed) log-probs of the trace's tokens and their top-N."""
        n, width = self.score_top_n, top.top_ids.shape[1]
        if n is None or n > width:
            return
        count = sequence.done
        sequence.view_scores[view] = ViewScores(
            logprobs=top.actual_logprobs[:count].astype(np.float32),
            top_ids=top.top_ids[:count, :n].astype(np.int64),
            top_logprobs=top.top_logprobs[:count, :n].astype(np.float32),
        )

    def _commit(self, sequence: _Sequence, decisions: PositionDecisions, row: int) -> bool:
        """Append the decided token at `row` to `sequence` under the commit rules of every
        engine; False when the sequence ends."""
        position = sequence.done
        token = int(decisions.token_ids[row])
        failed = [view for view in self.consulted if not bool(decisions.finite[view][row])]
        ending = token_ending(token, failed, position, self.eos)
        if ending is None:
            accepted = bool(decisions.accepted[row])
            sequence.token_ids.append(token)
            sequence.sources.append(self.proposer_source if accepted else 1 - self.proposer_source)
            sequence.draws.append(int(decisions.draws[row]))
            for view in VIEWS:
                value = float(decisions.logprobs[view][row])
                if np.isnan(value) and view in self.consulted:
                    sequence.missing[(view, position)] = float(decisions.normalizers[view][row])
                sequence.logprobs[view].append(value)
            self.stats.tokens += 1
            self.stats.fallbacks += 0 if accepted else 1
            ending = length_ending(sequence.done, self.config)
        sequence.finish = ending
        return ending is None

    def _progress_of(self, sequence: _Sequence, before: int) -> int:
        if sequence.finish is not None:
            return self.config.max_new_tokens - before
        return sequence.done - before

    def _fill(self, sequence: _Sequence, view: str, index: int, raw_logprob: float) -> None:
        normalizer = sequence.missing.pop((view, index))
        sequence.logprobs[view][index] = raw_logprob / self.config.temperature - normalizer

    def _rescore_missing(self) -> None:
        """Read log-probs that no request returned: one forced one-token request each.

        Teacher forcing (not prompt log-probs) so that it works with LoRA engines too; the
        context is a prefix of what the view already read, so the prefix cache serves it.
        """
        from expansion.engine.vllm_backend.drafting import force_args

        jobs = [(s, view, index) for s in self.sequences for view, index in sorted(s.missing)]
        if not jobs:
            return
        prompts = [
            self._prompt(list(s.request.prompt_ids(view)) + s.token_ids[:index])
            for s, view, index in jobs
        ]
        params = [
            self._params(max_tokens=1, logprobs=0, extra_args=force_args([s.token_ids[index]]))
            for s, _, index in jobs
        ]
        outputs = self.backend.generate(prompts, params, [view for _, view, _ in jobs])
        self.stats.logprob_rescores += len(jobs)
        for (sequence, view, index), output in zip(jobs, outputs, strict=True):
            top = top_logprobs_from_flat(output.outputs[0].logprobs, 0, 1, 0)
            if int(top.actual_ids[0]) != sequence.token_ids[index]:
                raise RolloutError("vLLM did not follow the forced token while rescoring")
            self._fill(sequence, view, index, float(top.actual_logprobs[0]))
