"""`python -m bench jobs [--quick] [--json FILE]`: the jobs against the engines they drive.

Runs an expansion chunk through the real job code (`expansion_chunk_execute`: database rows,
prompts, rollout, scoring under three views, trace encoding and storage; no web server, no
Celery) on a throw-away SQLite database, and, in the same invocation on the same model,
problems and settings, the engine alone. Ratios (tokens/s end to end over the engine's
tokens/s, both at the same `max_batch_size`):

- J1 = expansion job / fast rollout of the same sequences, 2 samples per problem over 16 CHAMP
  problems (8 with --quick), for tau = 1.0 (the default preset, release DAIL data) and
  tau = 0.8 (mixed policy); target >= 0.8. The job's time starts after its model is loaded;
  the engine records the scores of the views it consults, as the job asks it to.
- J1 ceiling = the most J1 can be on this machine: the engine's time over the engine's time
  plus `score_traces` on its traces (the views the engine did not consult; the job cannot
  store a trace without them). J1 close to its ceiling means the job adds nothing else.
- J3 = fast rollout at tau = 1 / plain `model.generate` sampling of the privileged prompts in
  one left-padded batch (top-k 20, temperature 1), same sequences; target >= 0.95.
- J2 = evaluation job (`evaluation_execute`: prompts, sampling in calls of up to
  `max_batch_size` sequences across problems, judging, storage) / plain `model.generate` of
  the same prompts (each problem's prompt `samples` times), `max_batch_size` left-padded rows
  at a time, same temperature, top-p and token budget; target >= 0.8. An evaluation cannot
  forbid EOS, so the job's tokens are the ones it stored (the sum of `EvaluationSample.
  token_count`; a row that ended early idles in its batch), while `generate` runs every row
  to the budget (`min_new_tokens`). The job's time starts after its model is loaded.

With `--backend vllm` the jobs run on vLLM (as a run or evaluation launched with the vLLM
backend does) and J1 / J2 compare them with the vLLM rollout backend alone and with plain vLLM
sampling, each on an engine started as the job starts its own (start-up not timed, one engine
alive at a time); the job scores with the transformers model, as it does in production.

In J1 and J3 EOS is forbidden, so every sequence produces exactly the token budget and the
engines do the same work. Timings alternate between the job and the engine round by round
(median of the rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import print_table, write_json
from bench.web import setup_django

TARGETS = {"J1": 0.8, "J2": 0.8, "J3": 0.95}


def _champ_problems(count: int) -> list[Any]:
    from curation.models import Problem
    from curation.services.champ import champ_load
    from expansion.services.runs import PROBLEM_ORDER

    champ_load()
    return list(Problem.objects.order_by(*PROBLEM_ORDER)[:count])


def _launch_run(
    model_dir: str,
    problems: list[Any],
    rollout: dict[str, Any],
    samples: int,
    backend: str = "transformers",
):
    """A run with one chunk, launched as the web form launches it (its message goes to an
    in-memory broker that no worker reads: the benchmark executes the chunk itself)."""
    from expansion.services.runs import RunSettings, expansion_run_launch

    settings = RunSettings(
        name="bench",
        model_path=model_dir,
        samples_per_problem=samples,
        preset="",
        rollout=rollout,
        chunk_problems=len(problems),
        backend=backend,
    )
    return expansion_run_launch(
        settings=settings, problem_ids=[p.pk for p in problems], launched_by=None
    )


def time_expansion_job(run: Any) -> tuple[float, int]:
    """Seconds from the end of model loading to the last stored trace, and tokens stored."""
    from django.db.models import Sum

    from expansion.services.runs import expansion_chunk_execute

    loaded_at: list[float] = []

    def progress(done: int, total: int, message: str) -> None:
        # The job's first message after "loading ..." comes once the model is loaded and
        # before the rollout's prefill (the engine's time below includes its prefill too).
        if not loaded_at and not message.startswith("loading"):
            loaded_at.append(time.perf_counter())

    expansion_chunk_execute(run_id=run.pk, chunk_index=0, progress=progress, log=lambda m: None)
    seconds = time.perf_counter() - loaded_at[0]
    tokens = run.traces.aggregate(total=Sum("length"))["total"] or 0
    return seconds, tokens


def engine_requests(run: Any, tokenizer: Any) -> tuple[list[Any], list[Any]]:
    """The run's sequences as the job builds them (same prompts, keys and order), and each
    sequence's three view prompts (`pipeline.ViewPrompts`)."""
    from expansion.engine.pipeline import view_prompts_for
    from expansion.engine.prompts import PromptTemplates
    from expansion.engine.rollout import RolloutRequest
    from expansion.engine.sampling import sequence_key
    from expansion.services.runs import run_problem_item

    members = run.run_problems.select_related("problem", "solution_version").order_by("position")
    items = [run_problem_item(member) for member in members]
    prompts = view_prompts_for(
        tokenizer, items, PromptTemplates.from_dict(run.templates), reasoning=False,
        max_prompt_tokens=None,
    )  # fmt: skip
    samples = run.samples_per_problem
    requests = [
        RolloutRequest(p.learner_ids, p.privileged_ids, sequence_key(item.key, s))
        for item, p in zip(items, prompts, strict=True)
        for s in range(samples)
    ]
    return requests, [p for p in prompts for _ in range(samples)]


def time_rollout(
    model: Any, requests: list[Any], config: Any, score_top_n: int | None = None
) -> tuple[float, list[Any]]:
    """Seconds and results of the fast engine alone (recording the scores of the views it
    consults when `score_top_n` is given, as the job asks it to)."""
    from expansion.engine.rollout_fast import fast_rollout

    started = time.perf_counter()
    results = fast_rollout(model, requests, config, score_top_n=score_top_n)
    return time.perf_counter() - started, results


def time_vllm_rollout(
    model_dir: str, requests: list[Any], config: Any, score_top_n: int | None
) -> tuple[float, list[Any]]:
    """Seconds and results of the vLLM rollout backend alone, on an engine started as the
    job starts its own (`model_session_open`: same KV cache settings; start-up not timed, and
    only one engine alive at a time)."""
    from expansion.services.models import model_session_open

    with model_session_open(model_path=model_dir, engine="vllm") as session:
        backend = session.backend
        started = time.perf_counter()
        results = backend.rollout(requests, config, score_top_n=score_top_n)
        return time.perf_counter() - started, results


def time_vllm_generate(
    model_dir: str, prompts: list[list[int]], evaluation: Any
) -> tuple[float, int]:
    """Plain vLLM sampling of the evaluation's prompts with its temperature and top-p, every
    row to the token budget, on an engine started as the job starts its own."""
    from vllm import SamplingParams, TokensPrompt

    from expansion.services.models import model_session_open

    budget = evaluation.max_new_tokens
    params = SamplingParams(
        max_tokens=budget,
        min_tokens=budget,
        ignore_eos=True,
        temperature=evaluation.temperature,
        top_p=evaluation.top_p,
        detokenize=False,
    )
    with model_session_open(model_path=model_dir, engine="vllm") as session:
        llm = session.backend.llm
        started = time.perf_counter()
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False
        )
        seconds = time.perf_counter() - started
    return seconds, sum(len(o.outputs[0].token_ids) for o in outputs)


def time_scoring(model: Any, prompts: list[Any], results: list[Any], top_n: int) -> float:
    """Seconds `score_traces` takes for the engine's traces as the job calls it (the views
    the engine recorded are not read again): the work the job must add to the engine's."""
    from expansion.engine.scoring import ScoringRequest, score_traces

    requests = [
        ScoringRequest(
            p.learner_ids,
            p.privileged_ids,
            p.negative_ids,
            r.token_ids.tolist(),
            known_scores=r.view_scores,
        )
        for p, r in zip(prompts, results, strict=True)
    ]
    started = time.perf_counter()
    score_traces(model, requests, top_n=top_n)
    return time.perf_counter() - started


def time_generate(model: Any, requests: list[Any], budget: int, batch: int) -> tuple[float, int]:
    """Plain sampling of the privileged prompts, `batch` left-padded sequences at a time."""
    import torch

    from expansion.engine.model_views import left_pad, model_device

    device = model_device(model)
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(requests), batch):
        prompts = [list(r.privileged_prompt_ids) for r in requests[start : start + batch]]
        ids, valid = left_pad(prompts, device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=valid.long(),
                do_sample=True,
                top_k=20,
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=budget,
                min_new_tokens=budget,
                pad_token_id=0,
            )
        tokens += (out.shape[1] - ids.shape[1]) * len(prompts)
    return time.perf_counter() - started, tokens


def _launch_evaluation(
    model_dir: str, problems: list[Any], samples: int, tokens: int, backend: str = "transformers"
) -> Any:
    """An evaluation of `problems`, launched as the web form launches it (its message goes to
    the in-memory broker; the benchmark executes the job itself). One sample batch per
    problem; the job packs batches into calls of `settings.EVALUATION_MAX_BATCH_SIZE`."""
    from training.evaluations.services import (
        EvaluationSettings,
        ProblemSetChoice,
        evaluation_launch,
    )

    choice = ProblemSetChoice(
        split="ids",
        dataset_id=problems[0].dataset_id,
        problem_ids=" ".join(p.external_id for p in problems),
    )
    settings = EvaluationSettings(
        name="bench",
        base_model_path=model_dir,
        problem_set=choice,
        samples_per_problem=samples,
        ks=(1,),
        budgets=(tokens,),
        batch_size=samples,
        backend=backend,
    )
    return evaluation_launch(settings=settings, launched_by=None)


def time_evaluation_job(evaluation: Any) -> tuple[float, int]:
    """Seconds from the end of model loading to the last stored sample, and tokens stored."""
    from django.db.models import Sum

    from training.evaluations.services import evaluation_execute
    from training.models import EvaluationSample

    loaded_at: list[float] = []

    def progress(done: int, total: int, message: str) -> None:
        if not loaded_at and not message.startswith("loading"):
            loaded_at.append(time.perf_counter())

    evaluation_execute(evaluation_id=evaluation.pk, progress=progress, log=lambda m: None)
    seconds = time.perf_counter() - loaded_at[0]
    samples = EvaluationSample.objects.filter(eval_problem__evaluation=evaluation)
    return seconds, samples.aggregate(total=Sum("token_count"))["total"] or 0


def evaluation_prompts(evaluation: Any, tokenizer: Any) -> list[list[int]]:
    """The evaluation's sequences as the job builds them: each problem's prompt n times."""
    from training.engine.evaluation import evaluation_prompt_ids

    members = evaluation.problems.select_related("problem").order_by("position")
    return [
        evaluation_prompt_ids(
            tokenizer, m.problem.statement, evaluation.prompt_template, evaluation.reasoning
        )
        for m in members
        for _ in range(evaluation.samples_per_problem)
    ]


def time_evaluation_generate(
    model: Any, prompts: list[list[int]], evaluation: Any, batch: int
) -> tuple[float, int]:
    """Plain sampling of the evaluation's prompts with its temperature and top-p (no top-k),
    `batch` left-padded rows at a time, every row to the token budget."""
    import torch

    from expansion.engine.model_views import left_pad, model_device

    device = model_device(model)
    budget = evaluation.max_new_tokens
    started = time.perf_counter()
    tokens = 0
    for start in range(0, len(prompts), batch):
        ids, valid = left_pad(prompts[start : start + batch], device)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=valid.long(),
                do_sample=True,
                top_k=0,
                temperature=evaluation.temperature,
                top_p=evaluation.top_p,
                max_new_tokens=budget,
                min_new_tokens=budget,
                pad_token_id=0,
            )
        tokens += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return time.perf_counter() - started, tokens


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench jobs")
    parser.add_argument("--quick", action="store_true", help="8 problems, 1 round")
    parser.add_argument("--json", help="write results here")
    parser.add_argument("--problems", type=int, help="CHAMP problems (default 16, quick 8)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size everywhere")
    parser.add_argument("--rounds", type=int, help="timing rounds (default 2, quick 1)")
    parser.add_argument(
        "--backend",
        choices=("transformers", "vllm"),
        default="transformers",
        help="the jobs' backend; vllm: J1 against the vLLM rollout backend and J2 against "
        "plain vLLM sampling (each on an engine of its own, start-up not timed; no J3)",
    )
    args = parser.parse_args(argv)
    vllm = args.backend == "vllm"
    problems_count = args.problems or (8 if args.quick else 16)
    rounds = args.rounds or (1 if args.quick else 2)

    from expansion.engine.embedded_model import prepare_embedded_model

    model_dir = str(prepare_embedded_model(Path("data/artifacts")).path)
    os.environ["DAIL_TEST_BROKER_URL"] = "memory://"
    from expansion.engine.session import open_model_session

    with tempfile.TemporaryDirectory() as tmp, open_model_session(model_dir) as session:
        setup_django(Path(tmp))
        from expansion.engine.model_views import default_eos_token_ids
        from expansion.engine.rollout import RolloutConfig

        model, tokenizer = session.model, session.tokenizer
        eos = list(default_eos_token_ids(model))
        problems = _champ_problems(problems_count)
        rows: list[dict[str, Any]] = []
        warm = RolloutConfig(max_new_tokens=4, forbidden_token_ids=tuple(eos))
        time_rollout(
            model, engine_requests(_launch_run(model_dir, problems[:1], {}, 1), tokenizer)[0], warm
        )  # the vLLM engines are started per measurement (one alive at a time), not warmed
        engine_name = "vLLM" if vllm else "fast"
        for tau in (1.0, 0.8):
            rollout = {
                "tau": tau,
                "max_new_tokens": args.tokens,
                "max_batch_size": args.batch,
                "forbidden_token_ids": eos,
                "seed": 1,
            }
            config = RolloutConfig.from_dict(rollout)
            job_rates, engine_rates, generate_rates, ceilings = [], [], [], []
            for round_ in range(rounds):
                run = _launch_run(model_dir, problems, rollout, args.samples, args.backend)
                seconds, tokens = time_expansion_job(run)
                job_rates.append(tokens / seconds)
                requests, prompts = engine_requests(run, tokenizer)
                if vllm:
                    seconds, results = time_vllm_rollout(model_dir, requests, config, run.top_n)
                else:
                    seconds, results = time_rollout(model, requests, config, run.top_n)
                engine_rates.append(sum(len(r) for r in results) / seconds)
                scoring = time_scoring(model, prompts, results, run.top_n)
                ceilings.append(seconds / (seconds + scoring))
                if tau == 1.0 and not vllm:
                    seconds, tokens = time_generate(model, requests, args.tokens, args.batch)
                    generate_rates.append(tokens / seconds)
                print(f"tau {tau} round {round_ + 1}/{rounds}: job {job_rates[-1]:.1f} tok/s, "
                      f"engine {engine_rates[-1]:.1f} tok/s, engine + scoring "
                      f"{ceilings[-1] * engine_rates[-1]:.1f} tok/s", flush=True)  # fmt: skip
            job, engine = statistics.median(job_rates), statistics.median(engine_rates)
            ceiling = statistics.median(ceilings)
            rows.append(
                {
                    "ratio": "J1",
                    "what": f"expansion job / {engine_name} rollout, tau {tau}",
                    "tau": tau,
                    "numerator_tok_s": job,
                    "denominator_tok_s": engine,
                    "value": job / engine,
                    "target": TARGETS["J1"],
                }
            )
            rows.append(
                {
                    "ratio": "J1 ceiling",
                    "what": f"(engine + scoring its traces) / engine, tau {tau}",
                    "tau": tau,
                    "numerator_tok_s": ceiling * engine,
                    "denominator_tok_s": engine,
                    "value": ceiling,
                    "target": None,
                }
            )
            if generate_rates:
                generate = statistics.median(generate_rates)
                rows.append(
                    {
                        "ratio": "J3",
                        "what": "fast rollout tau 1 / plain generate (privileged prompts)",
                        "tau": tau,
                        "numerator_tok_s": engine,
                        "denominator_tok_s": generate,
                        "value": engine / generate,
                        "target": TARGETS["J3"],
                    }
                )
        from django.conf import settings

        settings.EVALUATION_MAX_BATCH_SIZE = args.batch
        job_rates, generate_rates = [], []
        for round_ in range(rounds):
            evaluation = _launch_evaluation(
                model_dir, problems, args.samples, args.tokens, args.backend
            )
            seconds, tokens = time_evaluation_job(evaluation)
            job_rates.append(tokens / seconds)
            prompts = evaluation_prompts(evaluation, tokenizer)
            if vllm:
                seconds, tokens = time_vllm_generate(model_dir, prompts, evaluation)
            else:
                seconds, tokens = time_evaluation_generate(model, prompts, evaluation, args.batch)
            generate_rates.append(tokens / seconds)
            print(f"evaluation round {round_ + 1}/{rounds}: job {job_rates[-1]:.1f} tok/s, "
                  f"generate {generate_rates[-1]:.1f} tok/s", flush=True)  # fmt: skip
        job, generate = statistics.median(job_rates), statistics.median(generate_rates)
        rows.append(
            {
                "ratio": "J2",
                "what": f"evaluation job / plain {'vLLM ' if vllm else ''}generate "
                "(same prompts, EOS allowed in the job)",
                "tau": None,
                "numerator_tok_s": job,
                "denominator_tok_s": generate,
                "value": job / generate,
                "target": TARGETS["J2"],
            }
        )
    print_table(
        f"Jobs against engines ({args.backend}): {problems_count} CHAMP problems x "
        f"{args.samples} samples x {args.tokens} tokens, max_batch_size {args.batch}",
        rows,
        ["ratio", "what", "numerator_tok_s", "denominator_tok_s", "value", "target"],
    )
    write_json(
        args.json,
        {
            "benchmark": "jobs",
            "backend": args.backend,
            "problems": problems_count,
            "samples": args.samples,
            "tokens": args.tokens,
            "max_batch_size": args.batch,
            "rounds": rounds,
            "model": model_dir,
            "rows": rows,
        },
    )
    return 0
