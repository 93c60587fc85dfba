"""`python -m bench train`: the cost of a DAIL training step against a plain LoRA NLL step.

Same model, same LoRA adapter (the release's r = alpha = 32 on all projections), same batch,
one invocation. Each step is a full optimizer step: forward(s), backward, clipping, AdamW.

- step_time_ratio = median DAIL step time / median NLL step time (target <= 1.8), with both
  reference views recomputed (every step of epoch 1; every step without the reference cache).
  step_time_ratio_cached: epochs 2+, whose reference views come from the reference cache;
  step_time_ratio_3_epochs: the average over a release-length (3-epoch) run. The objectives'
  steps are interleaved after warm-up, so drift in machine load hits all of them.
- peak_memory_ratio = peak memory of a DAIL step / of an NLL step (target <= 1.3), where peak
  memory is everything the model run holds (weights, adapter, optimizer state, the step's
  working memory):
    CUDA: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`;
    CPU:  resident set size sampled every millisecond (/proc/self/statm) during the step,
          minus the RSS of the process before the model was loaded (libraries excluded), each
          objective in a fresh child process with glibc's mmap threshold pinned at 64 KiB so
          that freed tensors leave the RSS at once.
  step_memory_ratio compares the step's working memory alone (peak minus before the step).
- tokens/s counts trained response tokens.

Models: the embedded SmolLM2-135M-Instruct (default), a model directory, or `random-0.5b`, a
random-initialised model of Qwen2-0.5B's shape (built from a hand-written Qwen2Config; nothing
is downloaded), in bf16 on CUDA.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import print_table, write_json
from training.engine.reference_cache import ReferenceCache

RANDOM_05B = "random-0.5b"
OBJECTIVES = ("nll", "dail")
PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


@dataclass(frozen=True)
class Shape:
    """One synthetic micro-batch: rows, and the token lengths of each view's prompt and the
    shared response (rows vary a little, so the position maps are not all one slice)."""

    batch: int
    learner_prompt: int
    privileged_prompt: int
    negative_prompt: int
    response: int


# The privileged prompt carries the whole expert solution, so it is the longest; the learner
# prompt is the problem alone; the negative one adds the waypoint hint.
SHAPES = {
    ("cpu", True): Shape(2, 32, 192, 64, 256),
    ("cpu", False): Shape(4, 64, 384, 128, 512),
    ("cuda", True): Shape(4, 128, 768, 256, 1024),
    ("cuda", False): Shape(8, 128, 768, 256, 2048),
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak RSS over a block, sampled every `interval` seconds from a background thread."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def qwen2_05b_config() -> Any:
    """Qwen2-0.5B's published shape, written out by hand (no download)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_cache=False,
    )


def embedded_model_path() -> Path:
    from expansion.engine.embedded_model import (
        embedded_model_dir,
        is_prepared,
        prepare_embedded_model,
    )

    artifacts = Path("data/artifacts")
    path = embedded_model_dir(artifacts)
    return path if is_prepared(path) else prepare_embedded_model(artifacts).path


def build(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any], Any]:
    """(peft model, config, collated batch on the device, device) -- seeded, so every process
    that calls this with the same arguments gets the same weights and the same batch."""
    import torch
    from transformers import AutoModelForCausalLM, set_seed

    from training.engine.config import DailTrainingConfig
    from training.engine.data import DailCollator, TrainingExample
    from training.engine.trainer import attach_lora, resolve_dtype

    device = torch.device(args.device)
    config = DailTrainingConfig(device=device.type)
    dtype = resolve_dtype(config, device)
    set_seed(0)
    if args.model == RANDOM_05B:
        with device:
            base = AutoModelForCausalLM.from_config(qwen2_05b_config(), dtype=dtype)
    else:
        path = embedded_model_path() if args.model is None else Path(args.model)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model = attach_lora(base, config)
    shape = args.shape
    vocab = base.config.vocab_size
    generator = torch.Generator().manual_seed(1)

    def ids(length: int) -> list[int]:
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    examples = [
        TrainingExample(
            ids(shape.learner_prompt - (i % 3) * 4),
            ids(shape.privileged_prompt - (i % 3) * 8),
            ids(shape.negative_prompt - (i % 2) * 4),
            ids(shape.response - (i % 4) * 8),
        )
        for i in range(shape.batch)
    ]
    batch = {
        k: v.to(device) if isinstance(v, torch.Tensor) else v
        for k, v in DailCollator()(examples).items()
    }
    return model, config, batch, device


def make_step(
    model: Any,
    config: Any,
    batch: dict[str, Any],
    objective: str,
    fuse: bool = False,
    cache: Any = None,
) -> Any:
    """One optimizer step of `objective` as a closure (the trainer's loss, AdamW, clipping)."""
    import torch

    from training.engine.trainer import objective_loss

    run_config = dataclasses.replace(config, objective=objective, fuse_reference_forwards=fuse)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=run_config.weight_decay)

    def step() -> dict[str, float]:
        loss, metrics = objective_loss(model, batch, run_config, reference_cache=cache)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, run_config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return metrics

    return step


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(steps: dict[str, Any], device: Any, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved
            _sync(device)
            started = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - started)
    return times


def cuda_memory(step: Any) -> dict[str, float]:
    import torch

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": float(peak), "step_bytes": float(peak - before)}


def probe_cpu_memory(args: argparse.Namespace, objective: str) -> dict[str, float]:
    """Run one objective's step in a fresh process and read its RSS (see the module docstring)."""
    command = [sys.executable, "-m", "bench", "train", "--probe", objective, *args.passthrough]
    env = {**os.environ, **PROBE_ENV}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe for {objective} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_probe(args: argparse.Namespace) -> int:
    """Child process: RSS before the model, then around one step (after one warm-up step)."""
    import torch  # noqa: F401  (the libraries count as the baseline, not as the run's memory)
    import transformers  # noqa: F401

    libraries = _rss_bytes()
    model, config, batch, _ = build(args)
    step = make_step(model, config, batch, args.probe)
    step()  # warm-up: optimizer state, allocator and kernel caches
    before = _rss_bytes()
    with RssSampler() as sampler:
        step()
    print(json.dumps({"peak_bytes": sampler.peak - libraries, "step_bytes": sampler.peak - before}))
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small batch, few steps")
    parser.add_argument("--json", metavar="FILE", help="write the results here")
    parser.add_argument("--model", metavar="DIR|random-0.5b", help="default: embedded SmolLM2")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available")
    parser.add_argument("--steps", type=int, help="timed steps per objective")
    parser.add_argument("--batch", type=int, help="rows per micro-batch")
    parser.add_argument("--response-tokens", type=int, help="response length")
    parser.add_argument("--probe", choices=OBJECTIVES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SHAPES[(args.device, args.quick)]
    if args.batch:
        shape = dataclasses.replace(shape, batch=args.batch)
    if args.response_tokens:
        shape = dataclasses.replace(shape, response=args.response_tokens)
    args.shape = shape
    args.steps = args.steps or (3 if args.quick else 8)
    # What a memory-probe child needs to rebuild the same model and batch:
    args.passthrough = [
        *(["--quick"] if args.quick else []),
        *(["--model", args.model] if args.model else []),
        *(["--batch", str(args.batch)] if args.batch else []),
        *(["--response-tokens", str(args.response_tokens)] if args.response_tokens else []),
        "--device",
        args.device,
    ]
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.probe:
        return run_probe(args)

    model, config, batch, device = build(args)
    tokens = int(batch["response_mask"].sum())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    cache_dir = tempfile.TemporaryDirectory(prefix="bench-train-cache-")
    cache = ReferenceCache(Path(cache_dir.name), {"model": "bench"})
    steps = {name: make_step(model, config, batch, name) for name in OBJECTIVES}
    # Epochs 2+ of a run: the frozen views' hidden states come from the cache (warm-up fills it).
    steps["dail_cached"] = make_step(model, config, batch, "dail", cache=cache)
    if not args.quick:
        steps["dail_fused"] = make_step(model, config, batch, "dail", fuse=True)
    for step in steps.values():  # warm-up
        step()
    times = time_steps(steps, device, args.steps)
    cache_dir.cleanup()
    if device.type == "cuda":
        memory = {name: cuda_memory(steps[name]) for name in OBJECTIVES}
        memory_method = "torch.cuda.max_memory_allocated (weights + adapter + optimizer + step)"
    else:
        del steps, model, batch
        memory = {name: probe_cpu_memory(args, name) for name in OBJECTIVES}
        memory_method = (
            "peak RSS sampled every 1 ms minus RSS before model load, fresh process per "
            "objective, MALLOC_MMAP_THRESHOLD_=64KiB"
        )

    rows = []
    for name, samples in times.items():
        median = statistics.median(samples)
        row: dict[str, Any] = {
            "objective": name,
            "step_s": median,
            "tokens_per_s": tokens / median,
        }
        if name in memory:
            row["peak_mib"] = memory[name]["peak_bytes"] / 2**20
            row["step_mib"] = memory[name]["step_bytes"] / 2**20
        rows.append(row)
    step_s = {row["objective"]: row["step_s"] for row in rows}
    epochs = config.epochs
    summary = {
        "step_time_ratio": step_s["dail"] / step_s["nll"],
        "step_time_ratio_cached": step_s["dail_cached"] / step_s["nll"],
        f"step_time_ratio_{epochs}_epochs": (step_s["dail"] + (epochs - 1) * step_s["dail_cached"])
        / epochs
        / step_s["nll"],
        "peak_memory_ratio": memory["dail"]["peak_bytes"] / memory["nll"]["peak_bytes"],
        "step_memory_ratio": memory["dail"]["step_bytes"] / memory["nll"]["step_bytes"],
    }
    targets = dict.fromkeys(summary)
    targets.update(step_time_ratio=1.8, peak_memory_ratio=1.3)

    model_name = args.model or "embedded smollm2-135m-instruct"
    title = (
        f"train step, {model_name} on {device.type} ({dtype}), "
        f"B={args.shape.batch}, response {args.shape.response}, prompts "
        f"{args.shape.learner_prompt}/{args.shape.privileged_prompt}/{args.shape.negative_prompt}"
        f" (learner/PS/NR), median of {args.steps} steps"
    )
    print_table(title, rows, ["objective", "step_s", "tokens_per_s", "peak_mib", "step_mib"])
    print_table(
        "DAIL / NLL",
        [{"ratio": k, "value": v, "target": targets[k]} for k, v in summary.items()],
        ["ratio", "value", "target"],
    )
    print(f"memory: {memory_method}")
    write_json(
        args.json,
        {
            "benchmark": "train",
            "model": model_name,
            "device": device.type,
            "dtype": dtype,
            "shape": vars(args.shape),
            "steps": args.steps,
            "rows": rows,
            "times_s": times,
            **summary,
            "targets": targets,
            "memory_method": memory_method,
        },
    )
    return 0
