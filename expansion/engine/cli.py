"""Command line: expand a JSONL file of problems into traces with all per-token data.

    python -m expansion.engine.cli expand IN.jsonl OUT.jsonl [--model DIR] [--samples 4] ...

Input lines: `{"problem": ..., "solution": ... (a string or a list), "answer": ... (optional),
"problem_id": ... (optional), "waypoints": [...] (optional)}`; the e1 datasets' names
(`problem_id`, `problem`, `solution`) work as they are. Without waypoints, the release's
regex suggestion is used for the partial solution. Every line is checked (and every prompt
built) before any model work starts; a bad line stops the run with its line number.

Output: one JSON line per trace (problem id, sample index, text, finish reason, answer check,
kept flag, shortcut summary, and per-token arrays: ids, character lengths, sources, draws, the
three views' log-probs, PS/NR alternatives), written chunk by chunk
to `OUT.jsonl.partial` and renamed at the end; plus `OUT.run.json` with the settings, prompt
templates, model and statistics. No database is involved.

This module knows nothing about Django; the model, tokenizer and engine come from one
`session.ModelSession` (closed however the run ends), and the work itself is
`pipeline.expand_items` (both shared with the expansion jobs), one chunk of problems at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from expansion.engine.answers import DEFAULT_KEPT_RULE, KEPT_RULES
from expansion.engine.models import ModelLoadError
from expansion.engine.partial_solution import render_partial_solution, suggest_waypoints
from expansion.engine.prompts import (
    PromptError,
    PromptTemplates,
    ViewPrompts,
    build_view_prompts,
)
from expansion.engine.rollout import RolloutConfig, RolloutStats
from expansion.engine.sampling import sequence_key
from expansion.engine.session import ModelSession, open_model_session


class InputError(ValueError):
    """A line of the input file is not a usable problem."""


@dataclass
class Problem:
    line: int
    problem_id: str
    problem: str
    solutions: list[str]
    answer: str | None
    waypoints: list[str]
    waypoints_suggested: bool


def read_problems(path: Path) -> list[Problem]:
    """Parse and check every line (blank lines are skipped)."""
    problems: list[Problem] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
            problems.append(_problem_from(data, number, path))
            if problems[-1].problem_id in seen:
                raise InputError(
                    f"{path}:{number}: duplicate problem_id {problems[-1].problem_id!r}"
                )
            seen.add(problems[-1].problem_id)
    if not problems:
        raise InputError(f"{path}: no problems")
    return problems


def _problem_from(data: Any, number: int, path: Path) -> Problem:
    where = f"{path}:{number}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a JSON object")
    problem = data.get("problem")
    if not isinstance(problem, str) or not problem.strip():
        raise InputError(f"{where}: 'problem' must be a non-empty string")
    solution = data.get("solution")
    solutions = [solution] if isinstance(solution, str) else solution
    if (
        not isinstance(solutions, list)
        or not solutions
        or not all(isinstance(s, str) and s.strip() for s in solutions)
    ):
        raise InputError(f"{where}: 'solution' must be a non-empty string or list of strings")
    answer = data.get("answer")
    if answer is not None and not isinstance(answer, str | int | float):
        raise InputError(f"{where}: 'answer' must be a string")
    answer = str(answer).strip() if answer is not None and str(answer).strip() else None
    waypoints = data.get("waypoints")
    if waypoints is not None and (
        not isinstance(waypoints, list) or not all(isinstance(w, str) for w in waypoints)
    ):
        raise InputError(f"{where}: 'waypoints' must be a list of strings")
    suggested = not waypoints
    if suggested:
        waypoints = suggest_waypoints("\n\n".join(solutions), answer)
    problem_id = data.get("problem_id", data.get("id", f"line-{number}"))
    return Problem(number, str(problem_id), problem, solutions, answer, list(waypoints), suggested)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m expansion.engine.cli", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    expand = commands.add_parser("expand", help="expand problems into traces")
    expand.add_argument("input", type=Path, help="JSONL file of problems")
    expand.add_argument("output", type=Path, help="JSONL file of traces to write")
    expand.add_argument(
        "--model", help="model directory or .gguf file (default: the embedded model)"
    )
    expand.add_argument("--adapter", help="PEFT adapter directory: the learner view")
    expand.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    expand.add_argument(
        "--dtype", help="float32 / bfloat16 / ... (default: bf16 on GPU, fp32 on CPU)"
    )
    expand.add_argument("--samples", type=int, default=4, help="traces per problem (release: 32)")
    expand.add_argument("--templates", type=Path, help="JSON file of prompt templates")
    expand.add_argument(
        "--reasoning", action="store_true", help="open with <think>, forbid </think>"
    )
    expand.add_argument(
        "--max-prompt-tokens", type=int, help="default: context length - max new tokens"
    )
    expand.add_argument("--top-n", type=int, default=5, help="PS/NR alternatives kept per token")
    expand.add_argument("--shortcut-threshold", type=float, default=1.0)
    expand.add_argument(
        "--engine",
        choices=["fast", "reference", "vllm"],
        default="fast",
        help="fast: the batched transformers engine; reference: the per-token oracle; "
        "vllm: blocks drafted and checked on a vLLM engine (scoring stays on transformers)",
    )
    expand.add_argument(
        "--kv-cache-gb",
        type=int,
        default=0,
        help="vllm engine: KV cache in GiB (0: vLLM's default share of the memory)",
    )
    expand.add_argument("--chunk-problems", type=int, default=8, help="problems per rollout chunk")
    expand.add_argument(
        "--kept-rule",
        choices=list(KEPT_RULES),
        default=DEFAULT_KEPT_RULE,
        help="which traces are marked kept: "
        + "; ".join(f"{r.name}: {r.source}" for r in KEPT_RULES.values()),
    )
    expand.add_argument("--quiet", action="store_true", help="no progress bars")
    defaults = RolloutConfig()
    for name, help_text in RolloutConfig.help().items():
        if name in ("eos_token_ids", "forbidden_token_ids"):
            continue
        default = getattr(defaults, name)
        expand.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"rollout_{name}",
            type=type(default),
            default=default,
            help=f"{help_text} (default: {default})",
        )
    return parser


def _rollout_config(args: argparse.Namespace, forbidden: Sequence[int]) -> RolloutConfig:
    settings = {
        k.removeprefix("rollout_"): v for k, v in vars(args).items() if k.startswith("rollout_")
    }
    settings["forbidden_token_ids"] = tuple(forbidden)
    return RolloutConfig(**settings)


def _open_session(args: argparse.Namespace) -> ModelSession:
    """The run's model session: `--model` (default: the embedded model, prepared once),
    `--adapter` as the learner view, the chosen engine."""
    model_path = args.model
    if model_path is None:
        from expansion.engine.embedded_model import prepare_embedded_model

        artifacts = Path(os.environ.get("DAIL_ARTIFACTS_DIR", "data/artifacts"))
        model_path = str(prepare_embedded_model(artifacts).path)
    vllm_options = {"kv_cache_memory_bytes": args.kv_cache_gb << 30} if args.kv_cache_gb else {}
    return open_model_session(
        model_path,
        adapter=args.adapter,
        engine=args.engine,
        device=args.device,
        dtype=args.dtype,
        reasoning=args.reasoning,
        vllm_options=vllm_options,
    )


class _StageBars:
    """One tqdm bar per pipeline stage (rollout tokens, then scored traces x views)."""

    def __init__(self, label: str, quiet: bool) -> None:
        self.label, self.quiet = label, quiet
        self.bars: dict[str, Any] = {}

    def __enter__(self) -> _StageBars:
        return self

    def update(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage not in self.bars:
            self.bars[stage] = tqdm(
                total=total, desc=f"{stage} {self.label}", disable=self.quiet, file=sys.stderr
            )
        bar = self.bars[stage]
        bar.update(done - bar.n)

    def __exit__(self, *exc: object) -> None:
        for bar in self.bars.values():
            bar.close()


def expand(args: argparse.Namespace) -> dict[str, Any]:
    """Run the expansion; returns the run summary (also written to OUT.run.json)."""
    started = time.monotonic()
    problems = read_problems(args.input)
    templates = PromptTemplates()
    if args.templates:
        templates = PromptTemplates.from_dict(json.loads(args.templates.read_text()))
    with _open_session(args) as session:
        # Scoring runs on the transformers model whichever engine rolls out.
        model, tokenizer = session.model, session.tokenizer
        config = _rollout_config(args, session.forbidden_token_ids)
        max_prompt = args.max_prompt_tokens
        if max_prompt is None:
            context = getattr(model.config, "max_position_embeddings", None)
            max_prompt = context - config.max_new_tokens if context else None
            if max_prompt is not None and max_prompt < 1:
                raise InputError(
                    f"max_new_tokens {config.max_new_tokens} leaves no room for prompts"
                )
        prompts, partials = _view_prompts(args, problems, tokenizer, templates, max_prompt)
        backend = session.backend
        stats = type(backend.last_stats)()  # the vLLM backend counts more (requests, ...)
        counts = _write_traces(
            args, session, config, templates, max_prompt, problems, prompts, partials, stats
        )
    summary = {
        "input": str(args.input),
        "output": str(args.output),
        "model": str(session.model_path),
        "adapter": args.adapter,
        "engine": args.engine,
        "samples": args.samples,
        "problems": len(problems),
        "rollout_config": config.to_dict(),
        "templates": templates.to_dict(),
        "reasoning": args.reasoning,
        "kept_rule": args.kept_rule,
        "max_prompt_tokens": max_prompt,
        "counts": counts,
        "stats": {
            **asdict(stats),
            "draft_acceptance": stats.draft_acceptance,
            "fallback_rate": stats.fallback_rate,
        },
        "seconds": time.monotonic() - started,
    }
    run_path = args.output.with_name(args.output.name.removesuffix(".jsonl") + ".run.json")
    run_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _view_prompts(
    args: argparse.Namespace,
    problems: list[Problem],
    tokenizer: Any,
    templates: PromptTemplates,
    max_prompt: int | None,
) -> tuple[list[ViewPrompts], list[str]]:
    """Every problem's three prompts and partial solution, built before any rollout (a
    problem whose prompts cannot be built stops the run with its line number)."""
    prompts: list[ViewPrompts] = []
    partials: list[str] = []
    for problem in problems:
        partial = render_partial_solution(problem.answer, problem.waypoints)
        try:
            prompts.append(
                build_view_prompts(
                    tokenizer,
                    problem.problem,
                    problem.solutions,
                    partial,
                    templates,
                    reasoning=args.reasoning,
                    max_prompt_tokens=max_prompt,
                )
            )
        except PromptError as exc:
            raise InputError(f"{args.input}:{problem.line}: {exc}") from exc
        partials.append(partial)
    return prompts, partials


def _write_traces(
    args: argparse.Namespace,
    session: ModelSession,
    config: RolloutConfig,
    templates: PromptTemplates,
    max_prompt: int | None,
    problems: list[Problem],
    prompts: list[ViewPrompts],
    partials: list[str],
    stats: RolloutStats,
) -> dict[str, int]:
    """Expand the problems chunk by chunk into `OUT.jsonl.partial`, renamed to OUT at the end;
    the backend's statistics are added to `stats`. Returns the counts."""
    from expansion.engine.pipeline import ExpansionItem, expand_items

    backend = session.backend
    counts = {"traces": 0, "kept": 0, "errors": 0, "tokens": 0}
    partial_path = args.output.with_name(args.output.name + ".partial")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with partial_path.open("w", encoding="utf-8") as out:
        for start in range(0, len(problems), args.chunk_problems):
            chunk = list(range(start, min(start + args.chunk_problems, len(problems))))
            items = [
                ExpansionItem(
                    key=problems[i].problem_id,
                    problem=problems[i].problem,
                    solution=problems[i].solutions,
                    partial_solution=partials[i],
                    answer=problems[i].answer,
                )
                for i in chunk
            ]
            label = f"problems {chunk[0] + 1}-{chunk[-1] + 1}/{len(problems)}"
            with _StageBars(label, args.quiet) as bars:
                traces = expand_items(
                    session.model,
                    session.tokenizer,
                    backend,
                    items,
                    config=config,
                    samples=args.samples,
                    templates=templates,
                    reasoning=args.reasoning,
                    top_n=args.top_n,
                    shortcut_threshold=args.shortcut_threshold,
                    max_prompt_tokens=max_prompt,
                    progress=bars.update,
                    kept_rule=args.kept_rule,
                )
            _add_stats(stats, backend.last_stats)
            for trace in traces:
                index = chunk[trace.item_index]
                record = _trace_record(problems[index], trace, prompts[index], partials[index])
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                counts["traces"] += 1
                counts["kept"] += int(trace.kept)
                counts["errors"] += int(trace.finish_reason == "error")
                counts["tokens"] += len(trace.arrays)
    partial_path.replace(args.output)
    return counts


def _add_stats(total: RolloutStats, part: RolloutStats) -> None:
    for name, value in asdict(part).items():
        setattr(total, name, getattr(total, name) + value)


def _rounded(values: Any, digits: int = 4) -> list[Any]:
    return [round(float(v), digits) for v in values]


def _trace_record(
    problem: Problem, trace: Any, prompts: ViewPrompts, partial: str
) -> dict[str, Any]:
    arrays = trace.arrays
    return {
        "problem_id": problem.problem_id,
        "sample_index": trace.sample_index,
        "sequence_key": sequence_key(problem.problem_id, trace.sample_index),
        "text": arrays.text,
        "finish_reason": trace.finish_reason,
        "error": trace.error,
        "n_tokens": len(arrays),
        "fallback_share": trace.fallback_share,
        "kept": trace.kept,
        "answer": None if trace.answer_check is None else asdict(trace.answer_check),
        "shortcut": asdict(trace.shortcut),
        "prompt": {
            "partial_solution": partial,
            "waypoints_suggested": problem.waypoints_suggested,
            "solutions_used": prompts.solutions_used,
            "solution_truncated": prompts.solution_truncated,
        },
        "tokens": {
            "ids": arrays.token_ids.tolist(),
            "char_lengths": arrays.char_lengths.tolist(),
            "sources": arrays.sources.tolist(),
            "draws": arrays.draws.tolist(),
            "learner_logprobs": _rounded(arrays.learner_logprobs),
            "privileged_logprobs": _rounded(arrays.privileged_logprobs),
            "negative_logprobs": _rounded(arrays.negative_logprobs),
            "privileged_top_ids": arrays.privileged_top_ids.tolist(),
            "privileged_top_logprobs": [_rounded(r) for r in arrays.privileged_top_logprobs],
            "negative_top_ids": arrays.negative_top_ids.tolist(),
            "negative_top_logprobs": [_rounded(r) for r in arrays.negative_top_logprobs],
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = expand(args)
    except (InputError, PromptError, ValueError, FileNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    print(
        f"wrote {counts['traces']} traces ({counts['kept']} kept, {counts['errors']} errors, "
        f"{counts['tokens']} tokens) to {summary['output']} in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    from expansion.engine.vllm_backend.availability import exit_after_engine

    exit_after_engine(main())
