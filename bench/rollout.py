"""`python -m bench rollout`: throughput of the mixed-policy rollout engines.

Ratios are measured in one run, on one model, with one token budget (EOS is forbidden in every
engine, so every sequence produces exactly the budget):

- R1 = fast rollout, 1 sequence  /  plain `model.generate` sampling 1 sequence (tokens/s);
  target >= 0.85: two views cost about as much as one.
- R2 = fast rollout, 32 sequences (8 problems x 4 samples)  /  plain `generate`, 1 sequence
  (tokens/s); target >= 8.
- R3 = fast rollout on the 32 sequences  /  the reference per-token loop (both views queried
  once per token, one sequence at a time, as the release does) on the same sequences;
  target >= 4. With --quick the reference runs on the first 4 of the 32 sequences (its
  tokens/s does not depend on how many it runs, one after the other).
  Budgets: 64 tokens per sequence with --quick on CPU (128 without), 128 / 512 on CUDA.
- R4 / R5 compare the vLLM backend with plain vLLM `generate` and with a per-token vLLM loop
  (see `bench/rollout_vllm.py`): where vLLM is installed and the model is a directory, this
  command runs that benchmark too, on the same model, workload and token budget, and puts its
  ratios in the same table and JSON (`--no-vllm` leaves it out).

Beside them: the fast engine's draft acceptance (drafted tokens equal to the rule's outcome),
its fallback rate (tokens sampled from the verifier), and the share of tokens the reference
and fast engines agree on (float rounding can flip a near-tie; bf16 flips more).

Models: the embedded SmolLM2-135M-Instruct (default; prepared under data/artifacts), a model
directory, or `random-0.5b`: a random-initialised model of Qwen2-0.5B's shape, built from a
hand-written config (no download), bf16 on CUDA. With a random model, prompts are random ids
and next-token distributions are nearly flat, so every token is a fallback and the verifier's
drafts are always right: a best case for drafting, a worst case for nothing.

Timings alternate between engines round by round (median of the rounds; single sequences
three times per round), so drift in machine load hits all of them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import print_table, write_json

RANDOM_05B = "random-0.5b"
TARGETS = {"R1": 0.85, "R2": 8.0, "R3": 4.0}

PROBLEMS = [
    (
        "Find all real $x$ with $x^2 - 5x + 6 = 0$.",
        "Factor: $(x-2)(x-3)=0$, so $x=2$ or $x=3$.",
        "2, 3",
    ),
    (
        "What is the sum of the first 100 positive integers?",
        "Pair $k$ with $101-k$: 50 pairs of 101, so $\\boxed{5050}$.",
        "5050",
    ),
    (
        "How many divisors does 360 have?",
        "$360 = 2^3 \\cdot 3^2 \\cdot 5$, so $(3+1)(2+1)(1+1) = \\boxed{24}$.",
        "24",
    ),
    (
        "Compute $2^{10} \\bmod 7$.",
        "$2^3 = 8 \\equiv 1$, so $2^{10} = 2^9 \\cdot 2 \\equiv 2$. Answer $\\boxed{2}$.",
        "2",
    ),
    ("Solve $3x + 7 = 22$.", "Subtract 7: $3x = 15$, so $x = \\boxed{5}$.", "5"),
    (
        "Find the remainder of $17^{2}$ divided by 5.",
        "$17 \\equiv 2$, $2^2 = 4$, so $\\boxed{4}$.",
        "4",
    ),
    (
        "What is the area of a right triangle with legs 6 and 8?",
        "Area $= 6 \\cdot 8 / 2 = \\boxed{24}$.",
        "24",
    ),
    (
        "Prove that the product of two odd numbers is odd.",
        "$(2a+1)(2b+1) = 2(2ab+a+b)+1$, which is odd.",
        "",
    ),
]


@dataclass
class Workload:
    learner_prompts: list[list[int]]  # one per problem
    privileged_prompts: list[list[int]]
    samples: int
    budget: int
    eos_ids: tuple[int, ...]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(model_arg: str | None, device: str | None, dtype: str | None) -> tuple[Any, Any, str]:
    from expansion.engine.models import load_model, random_model_like

    if model_arg == RANDOM_05B:
        return random_model_like("qwen2-0.5b", device=device, dtype=dtype), None, RANDOM_05B
    if model_arg is None:
        from expansion.engine.embedded_model import prepare_embedded_model

        model_arg = str(prepare_embedded_model(Path("data/artifacts")).path)
    model, tokenizer = load_model(model_arg, device=device, dtype=dtype)
    return model, tokenizer, model_arg


def make_workload(model: Any, tokenizer: Any, samples: int, budget: int) -> Workload:
    from expansion.engine.model_views import default_eos_token_ids
    from expansion.engine.partial_solution import render_partial_solution, suggest_waypoints
    from expansion.engine.prompts import build_view_prompts

    eos = default_eos_token_ids(model)
    if tokenizer is None:  # random model: random prompts of realistic lengths
        rng = np.random.default_rng(0)
        vocab = model.config.vocab_size
        learner = [rng.integers(0, vocab, size=60 + 8 * i).tolist() for i in range(len(PROBLEMS))]
        privileged = [
            rng.integers(0, vocab, size=300 + 16 * i).tolist() for i in range(len(PROBLEMS))
        ]
        return Workload(learner, privileged, samples, budget, eos)
    learner, privileged = [], []
    for problem, solution, answer in PROBLEMS:
        partial = render_partial_solution(
            answer or None, suggest_waypoints(solution, answer or None)
        )
        prompts = build_view_prompts(tokenizer, problem, solution, partial)
        learner.append(prompts.learner_ids)
        privileged.append(prompts.privileged_ids)
    return Workload(learner, privileged, samples, budget, eos)


def requests_for(work: Workload, problems: int | None = None) -> list[Any]:
    from expansion.engine.rollout import RolloutRequest
    from expansion.engine.sampling import sequence_key

    count = len(work.learner_prompts) if problems is None else problems
    return [
        RolloutRequest(work.learner_prompts[p], work.privileged_prompts[p], sequence_key(p, s))
        for p in range(count)
        for s in range(work.samples)
    ]


def time_generate(model: Any, work: Workload, device: torch.device) -> float:
    """Tokens/s of plain sampling (top-k 20, temperature 1) of one sequence."""
    ids = torch.tensor([work.learner_prompts[0]], device=device)
    _sync(device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            top_k=20,
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=work.budget,
            min_new_tokens=work.budget,
            pad_token_id=work.eos_ids[0] if work.eos_ids else 0,
        )
    _sync(device)
    made = out.shape[1] - ids.shape[1]
    return made / (time.perf_counter() - started)


def time_backend(
    backend: Any, requests: list[Any], config: Any, device: torch.device
) -> tuple[float, Any, list[Any]]:
    _sync(device)
    started = time.perf_counter()
    results = backend.rollout(requests, config)
    _sync(device)
    seconds = time.perf_counter() - started
    tokens = sum(len(r) for r in results)
    return tokens / seconds, backend.last_stats, results


def agreement(reference: list[Any], fast: list[Any]) -> float:
    """Share of reference tokens in the common prefix of each pair of traces."""
    same = total = 0
    for a, b in zip(reference, fast, strict=False):
        n = min(len(a), len(b))
        differ = np.flatnonzero(a.token_ids[:n] != b.token_ids[:n])
        same += int(differ[0]) if differ.size else n
        total += len(a)
    return same / total if total else 1.0


def measure_vllm(
    model_arg: str | None,
    model_name: str,
    budget: int,
    rounds: int,
    quick: bool,
    tau: float | None,
) -> tuple[dict[str, Any], str]:
    """R4 / R5 from `bench.rollout_vllm` on the same model and budget: (its JSON, why not)."""
    import importlib.util
    import json
    import tempfile

    if importlib.util.find_spec("vllm") is None:
        return {}, "vLLM is not installed"
    if model_arg == RANDOM_05B:
        return {}, "vLLM needs a model directory, not a random-initialised model"
    from bench import rollout_vllm

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "vllm.json"
        argv = ["--model", model_name, "--tokens", str(budget), "--rounds", str(rounds)]
        argv += ["--json", str(out)] + (["--quick"] if quick else [])
        argv += ["--tau", str(tau)] if tau is not None else []
        rollout_vllm.main(argv)
        return json.loads(out.read_text()), ""


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench rollout", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--quick", action="store_true", help="short budget, reference on 4 sequences"
    )
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--model", help=f"model directory, or {RANDOM_05B} (default: embedded)")
    parser.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    parser.add_argument("--dtype", help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--tau", type=float, default=None, help="default: the rollout default")
    parser.add_argument("--tokens", type=int, help="token budget per sequence")
    parser.add_argument("--rounds", type=int, help="timing rounds (median)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-vllm", action="store_true", help="do not measure R4 / R5")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from expansion.engine.rollout import RolloutConfig
    from expansion.engine.rollout_fast import TransformersBackend
    from expansion.engine.rollout_reference import ReferenceBackend

    model, tokenizer, model_name = load(args.model, args.device, args.dtype)
    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    # Long enough that reading the two prompts (the privileged one carries the solution) is
    # not most of the work; expansion budgets are 256-2,048 tokens.
    budget = args.tokens or ((128 if args.quick else 512) if gpu else (64 if args.quick else 128))
    rounds = args.rounds or (1 if args.quick else 3)
    reference_sequences = 4 if args.quick else None
    work = make_workload(model, tokenizer, samples=4, budget=budget)
    config = RolloutConfig(max_new_tokens=budget, forbidden_token_ids=work.eos_ids)
    if args.tau is not None:
        config = replace(config, tau=args.tau)
    all_requests = requests_for(work)  # 8 problems x 4 samples = 32 sequences
    one = all_requests[:1]
    reference_requests = all_requests[:reference_sequences] if reference_sequences else all_requests
    fast = TransformersBackend(model)
    reference = ReferenceBackend(model)

    # Warm-up (CUDA kernels, allocator, lazy imports) on a short budget.
    warm = replace(config, max_new_tokens=min(8, budget))
    fast.rollout(all_requests[:2], warm)
    reference.rollout(one, warm)
    time_generate(model, replace(work, budget=min(8, budget)), device)

    measured: dict[str, list[float]] = {
        "generate_1": [],
        "fast_1": [],
        "fast_32": [],
        "reference": [],
    }
    stats_32 = None
    results_32: list[Any] = []
    results_ref: list[Any] = []
    for _ in range(rounds):
        # Single sequences are cheap: three alternating pairs per round.
        for _ in range(3):
            measured["generate_1"].append(time_generate(model, work, device))
            measured["fast_1"].append(time_backend(fast, one, config, device)[0])
        rate, stats_32, results_32 = time_backend(fast, all_requests, config, device)
        measured["fast_32"].append(rate)
    # The reference is slow: one timing (its per-token cost hardly varies).
    rate, ref_stats, results_ref = time_backend(reference, reference_requests, config, device)
    measured["reference"].append(rate)
    median = {k: statistics.median(v) for k, v in measured.items()}
    ratios = {
        "R1": median["fast_1"] / median["generate_1"],
        "R2": median["fast_32"] / median["generate_1"],
        "R3": median["fast_32"] / median["reference"],
    }
    agree = agreement(results_ref, results_32[: len(results_ref)])
    notes = {
        "R1": "fast rollout 1 seq / generate 1 seq",
        "R2": "fast rollout 32 seq / generate 1 seq",
        "R3": f"fast 32 seq / reference loop ({len(reference_requests)} seq, one at a time)",
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
    vllm_result, vllm_note = (
        ({}, "left out (--no-vllm)")
        if args.no_vllm
        else (measure_vllm(args.model, model_name, budget, rounds, args.quick, args.tau))
    )
    from bench.rollout_vllm import TARGETS as VLLM_TARGETS

    vllm_notes = {
        "R4": "vLLM block rollout / plain vLLM generate, 32 seq",
        "R5": "vLLM block rollout / per-token vLLM loop, 32 seq",
    }
    for name in ("R4", "R5"):
        value = vllm_result.get("ratios", {}).get(name)
        rows.append(
            {
                "metric": name,
                "value": value,
                "target": f">= {VLLM_TARGETS[name]}",
                "met": "" if value is None else ("yes" if value >= VLLM_TARGETS[name] else "NO"),
                "what": vllm_notes[name] if value is not None else f"not measured: {vllm_note}",
            }
        )
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    title = (
        f"Rollout throughput: {model_name} on {device.type} ({dtype}), {budget} tokens per sequence, "
        f"tau={config.tau}, proposer={config.proposer}, top-k={config.top_k}, R={config.max_draws}"
    )
    print_table(title, rows, ["metric", "value", "target", "met", "what"])
    rates = [
        {"engine": "generate, 1 seq", "tokens/s": median["generate_1"]},
        {"engine": "fast rollout, 1 seq", "tokens/s": median["fast_1"]},
        {"engine": "fast rollout, 32 seq", "tokens/s": median["fast_32"]},
        {
            "engine": f"reference loop, {len(reference_requests)} seq",
            "tokens/s": median["reference"],
        },
    ]
    print_table("Tokens per second (median of rounds)", rates, ["engine", "tokens/s"])
    beside = [
        {"quantity": "draft acceptance (fast, 32 seq)", "value": stats_32.draft_acceptance},
        {"quantity": "fallback rate (fast, 32 seq)", "value": stats_32.fallback_rate},
        {"quantity": "fallback rate (reference)", "value": ref_stats.fallback_rate},
        {
            "quantity": "forward passes per token (fast, 32 seq)",
            "value": stats_32.forward_passes / max(stats_32.tokens, 1),
        },
        {"quantity": "tokens identical to the reference", "value": agree},
    ]
    print_table("Beside the ratios", beside, ["quantity", "value"])
    write_json(
        args.json,
        {
            "benchmark": "rollout",
            "model": model_name,
            "device": device.type,
            "dtype": dtype,
            "quick": args.quick,
            "tokens_per_sequence": budget,
            "rounds": rounds,
            "rollout_config": config.to_dict(),
            "tokens_per_second": median,
            "tokens_per_second_rounds": measured,
            "ratios": ratios,
            "targets": TARGETS,
            "draft_acceptance": stats_32.draft_acceptance,
            "fallback_rate": stats_32.fallback_rate,
            "reference_fallback_rate": ref_stats.fallback_rate,
            "reference_sequences": len(reference_requests),
            "agreement_with_reference": agree,
            "vllm": vllm_result or {"not_measured": vllm_note},
        },
    )
    return 0
