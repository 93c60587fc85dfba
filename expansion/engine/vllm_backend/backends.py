"""The mixed-policy rollout on vLLM as `RolloutBackend`s: `VllmBackend` and `VllmPerTokenBackend`.

`VllmBackend` owns a vLLM `LLM` (made by `engine.create_engine`, or by `from_model`) and
implements `RolloutBackend`: it resolves and validates the settings, splits the requests into
waves of `config.max_batch_size` (`waves.Wave`: blocks drafted with `generate` and checked by
the other view, or one view's plain sampling when tau = 0 or 1), and sends every request
through `generate`, which attaches the learner's adapter (`set_adapter`, a `LoRARequest` from
`engine.LoraRegistry`; the privileged view runs the base weights) and counts requests per
view. `VllmPerTokenBackend` is the release's loop on the same engine (per token, one request
per view per sequence); it is the R5 baseline of `python -m bench rollout_vllm`.

Departures from the transformers engines (besides float rounding): the normaliser estimate of
`decisions`, and `RolloutStats.forward_passes` counts vLLM `generate` calls, not model forward
passes.

This module knows nothing about tokenizers, prompts or storage; it imports vLLM only inside
the functions that need it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expansion.engine.rollout import (
    VIEWS,
    FinishedCallback,
    ProgressCallback,
    RolloutConfig,
    RolloutError,
    RolloutRequest,
    RolloutResult,
    RolloutStats,
    token_reporter,
    validate_requests,
)
from expansion.engine.vllm_backend.engine import (
    LoraRegistry,
    adapter_rank,
    check_rollout_engine,
    create_engine,
    engine_eos_ids,
)
from expansion.engine.vllm_backend.waves import Wave


@dataclass
class VllmRolloutStats(RolloutStats):
    """`RolloutStats` plus what only the vLLM backends do."""

    requests: int = 0  # vLLM requests submitted
    learner_requests: int = 0  # of which the learner view's
    privileged_requests: int = 0  # of which the privileged view's
    verify_recomputes: int = 0  # checks redone without the prefix cache (rows were cached)
    logprob_rescores: int = 0  # forced one-token requests for log-probs outside the top-N


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
        check_rollout_engine(model_config)
        self.max_logprobs = int(model_config.max_logprobs)
        self.max_model_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())
        self.default_eos_ids = engine_eos_ids(model_config)
        vllm_config = llm.llm_engine.vllm_config
        self.lora_config = getattr(vllm_config, "lora_config", None)
        cache_config = getattr(vllm_config, "cache_config", None)
        caching = bool(getattr(cache_config, "enable_prefix_caching", False))
        self.cache_block_size = int(cache_config.block_size) if caching else 1
        self.adapters = LoraRegistry(self.lora_config)
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

    def set_adapter(self, adapter: str | Path | None) -> None:
        """Let the learner view run base weights + this PEFT adapter (None: base weights)."""
        self.lora_request = None if adapter is None else self.adapters.request_for(adapter)

    # -- the protocol --

    def rollout(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
        score_top_n: int | None = None,
    ) -> list[RolloutResult]:
        """Expand every request (waves of `config.max_batch_size`; `on_finished` is called for
        a wave's requests when the wave ends): block drafting, or one view's sampling when
        tau = 0 or 1 (which, with `score_top_n`, records that view's scores; block drafting
        records none)."""
        return self._run(requests, config, progress, on_finished, False, score_top_n)

    def rollout_per_token(
        self,
        requests: Sequence[RolloutRequest],
        config: RolloutConfig,
        progress: ProgressCallback | None = None,
        on_finished: FinishedCallback | None = None,
    ) -> list[RolloutResult]:
        """Expand every request with the release's loop: one request per token per view."""
        return self._run(requests, config, progress, on_finished, True)

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
        score_top_n: int | None = None,
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
            wave = Wave(self, chunk, config, stats, report, score_top_n)
            finished = wave.run_per_token() if per_token else wave.run()
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
        stats.learner_requests += views.count("learner")
        stats.privileged_requests += views.count("privileged")
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
        score_top_n: int | None = None,  # records no scores: scoring computes every view
    ) -> list[RolloutResult]:
        results = self.backend.rollout_per_token(requests, config, progress, on_finished)
        self.last_stats = self.backend.last_stats
        return results
