"""`python -m bench generated_difficulty`: the base model's pass@1 on each generated family.

The generated dataset (`curation.generated_problems`, loaded by `manage.py
load_generated_problems`) is meant to be partly solvable by the embedded model, so that base,
SFT and DAIL can differ on it; a family is useful when the base model's pass@1 lies roughly
between 5 % and 50 %. This command measures it with the product's own evaluation path:

- prompts: `training.engine.evaluation.evaluation_prompt_ids` (the learner view plus the
  request for a `\\boxed{}` answer, through the model's chat template);
- samples: `generate_completions("transformers", ...)` on the units of `problem_units`
  packed by `pack_units` (up to `max_batch_size` sequences per call), as an evaluation job
  draws them;
- verdicts: `judge_completion`, the product's one answer checker;
- pass@1 and pass@k per family with bootstrap intervals: `training.engine.metrics`;
- two diagnostics beside them (not verdicts): `boxed`, the share of samples with a non-empty `\\boxed{}`
  answer, and `last number right`, the share whose last integer is the answer: together they
  say whether a family fails on arithmetic or on the answer format.

Default workload: 6 problems per family x 8 samples (one batch), 128 new tokens (`--quick`:
3 x 4, 96 tokens), at `SamplingSettings`' defaults (temperature 0.6, top-p 0.95, no top-k:
what an evaluation launched with its defaults draws) and the default prompt template. The
numbers depend on the sampling settings (`--temperature`, `--top-p`, `--top-k`), the prompt
(`--template`, a name of `EVALUATION_TEMPLATES`) and the protocol; all are recorded with the
results.

What was measured (`docs/benchmarks/generated_difficulty.json`): under the default template
the base model solves none of the two-step families (it almost never writes a box, even
under the release protocol's forced answer). Under the `worked-example` template it boxes
about half its answers, and the one-step families `add2`, `mul2` and `sub2` land in the
5-50 % range at temperature 0.3 or 0.6 (`mul2` also at temperature 1 / top-k 20); the
two-step families stay at about 0-3 %. On a shared CPU, `--threads 1` avoids the
oversubscription that made two threads over ten times slower on this project's 2-core
machine; 8 problems x 8 samples x 64 tokens take about 65 s per family there.

Models: the embedded SmolLM2-135M-Instruct (default; prepared under data/artifacts) or a
model directory (`--model`), e.g. to compare an adapter's base.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import print_table, write_json

TARGET_LOW, TARGET_HIGH = 0.05, 0.50


def load(model_arg: str | None, threads: int | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, model path): `model_arg` or the embedded model, on the CPU when
    `threads` is given."""
    from expansion.engine.session import open_model_session

    if threads:
        torch.set_num_threads(threads)
    if model_arg is None:
        from expansion.engine.embedded_model import prepare_embedded_model

        model_arg = str(prepare_embedded_model(Path("data/artifacts")).path)
    # A transformers session starts no engine process: the benchmark's end releases it.
    session = open_model_session(model_arg, device="cpu" if threads else None)
    return session.model, session.tokenizer, model_arg


_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str) -> str | None:
    """The last integer written in a completion (a diagnostic, not the product's checker)."""
    found = _INTEGER.findall(text)
    return found[-1] if found else None


def family_row(
    family: str,
    counts: dict[str, tuple[int, int]],
    tokens: list[int],
    ks: list[int],
    boxed: int,
    last_number_right: int,
) -> dict[str, Any]:
    from training.engine.metrics import pass_at_k_report

    report = pass_at_k_report(counts, ks=ks, seed=0)
    one = report.overall[1]
    in_range = TARGET_LOW <= one.value <= TARGET_HIGH
    row: dict[str, Any] = {
        "family": family,
        "problems": len(counts),
        "samples": sum(n for n, _ in counts.values()),
        "correct": sum(c for _, c in counts.values()),
        "pass@1": one.value,
        "low": one.low,
        "high": one.high,
        "in 5-50%": "yes" if in_range else "no",
        "mean tokens": sum(tokens) / max(1, len(tokens)),
        "boxed": boxed / max(1, len(tokens)),
        "last number right": last_number_right / max(1, len(tokens)),
    }
    for k in ks[1:]:
        row[f"pass@{k}"] = report.overall[k].value
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench generated_difficulty", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="3 problems x 4 samples, 96 tokens")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--model", help="model directory (default: the embedded model)")
    parser.add_argument("--families", help="comma-separated families (default: all)")
    parser.add_argument("--problems", type=int, help="problems per family (default 6)")
    parser.add_argument("--samples", type=int, help="samples per problem (default 8)")
    parser.add_argument("--tokens", type=int, help="max new tokens (default 128)")
    parser.add_argument("--temperature", type=float, help="default: SamplingSettings' (0.6)")
    parser.add_argument("--top-p", type=float, help="default: SamplingSettings' (0.95)")
    parser.add_argument("--top-k", type=int, help="default: none (no top-k cut)")
    parser.add_argument(
        "--template",
        default="default",
        help="evaluation prompt template, a name of EVALUATION_TEMPLATES (default: 'default')",
    )
    parser.add_argument(
        "--protocol", help="evaluation protocol: workbench (default) or release (forces a box)"
    )
    parser.add_argument("--seed", type=int, default=0, help="generator and sampling seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (and run on the CPU)")
    parser.add_argument(
        "--show", type=int, default=0, help="print this many completions per family"
    )
    args = parser.parse_args(argv)

    from curation.generated_problems import family_names, generate_family
    from expansion.engine.answers import judge_completion
    from training.engine.evaluation import (
        EVALUATION_TEMPLATES,
        SamplingSettings,
        evaluation_prompt_ids,
        generate_completions,
        pack_units,
        problem_units,
    )

    problems_per_family = args.problems or (3 if args.quick else 6)
    samples = args.samples or (4 if args.quick else 8)
    settings = SamplingSettings(
        samples=samples,
        max_new_tokens=args.tokens or (96 if args.quick else 128),
        **({} if args.temperature is None else {"temperature": args.temperature}),
        **({} if args.top_p is None else {"top_p": args.top_p}),
        top_k=args.top_k,
        **({} if args.protocol is None else {"protocol": args.protocol}),
        seed=args.seed,
        batch_size=samples,
    )
    if args.template not in EVALUATION_TEMPLATES:
        parser.error(f"--template: choose one of {', '.join(EVALUATION_TEMPLATES)}")
    template = EVALUATION_TEMPLATES[args.template]
    ks = [k for k in (1, 2, 4, 8) if k <= settings.samples]
    model, tokenizer, model_name = load(args.model, args.threads)
    rows = []
    started = time.monotonic()
    for family in family_names(args.families):
        tokens: list[int] = []
        shown = boxed = last_number_right = 0
        problems = {
            problem.problem_id: problem
            for problem in generate_family(family, problems_per_family, args.seed)
        }
        units = [
            unit
            for problem in problems.values()
            for unit in problem_units(
                problem.problem_id,
                evaluation_prompt_ids(tokenizer, problem.statement, template),
                settings,
            )
        ]
        correct = dict.fromkeys(problems, 0)
        for call in pack_units(units, settings.max_batch_size):
            drawn = generate_completions("transformers", model, tokenizer, call, settings=settings)
            for unit, completions in zip(call, drawn, strict=True):
                problem = problems[unit.key.rsplit("#", 1)[0]]
                for completion in completions:
                    verdict = judge_completion(completion.text, problem.answer)
                    correct[problem.problem_id] += int(verdict.correct)
                    tokens.append(completion.token_count)
                    boxed += int(
                        bool(verdict.predicted)
                    )  # an empty box (the forced prompt) is none
                    last_number_right += int(last_integer(completion.text) == problem.answer)
                    if shown < args.show:
                        shown += 1
                        mark = "correct" if verdict.correct else f"got {verdict.predicted!r}"
                        print(f"--- {problem.problem_id} (answer {problem.answer}, {mark})")
                        print(f"{problem.statement}\n>>> {completion.text}")
        counts = {key: (settings.samples, c) for key, c in correct.items()}
        rows.append(family_row(family, counts, tokens, ks, boxed, last_number_right))
        print(f"{family}: pass@1 {rows[-1]['pass@1']:.3f} ({time.monotonic() - started:.0f} s)")
    columns = ["family", "problems", "samples", "correct", "pass@1", "low", "high", "in 5-50%"]
    columns += [f"pass@{k}" for k in ks[1:]] + ["mean tokens", "boxed", "last number right"]
    print_table(
        f"Base model pass@1 per generated family ({model_name}; {settings.samples} samples, "
        f"{settings.max_new_tokens} tokens, T={settings.temperature}, top-p={settings.top_p}, "
        f"top-k={settings.top_k or 'none'}, protocol {settings.protocol}, template "
        f"{args.template})",
        rows,
        columns,
    )
    write_json(
        args.json,
        {
            "benchmark": "generated_difficulty",
            "command": "python -m bench generated_difficulty " + " ".join(argv),
            "model": model_name,
            "generator_seed": args.seed,
            "problems_per_family": problems_per_family,
            "sampling": {
                "samples": settings.samples,
                "max_new_tokens": settings.max_new_tokens,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": settings.top_k,
                "protocol": settings.protocol,
                "template": args.template,
                "prompt_template": template,
                "seed": settings.seed,
            },
            "torch_threads": torch.get_num_threads(),
            "target_pass_at_1": [TARGET_LOW, TARGET_HIGH],
            "seconds": time.monotonic() - started,
            "families": rows,
        },
    )
    return 0
