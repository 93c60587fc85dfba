"""What a study is, before anything runs: its arms (`ARMS`), the settings an admin chooses
(`StudySettings`), and `study_plan`, which checks them and computes the study without writing
anything: the split (the evaluations' seeded hash split of the dataset, with optional limits
per side), each step's settings, and what it will cost.

Refused, with the reason: a split that leaves no training or no held-out problem, a proof
dataset or problems without answers (a study compares pass@k), an unknown arm, settings out of
range (each engine's own checks), a base model that is not a model directory, and a study
estimated above the workers' capacity: tokens per step (an upper bound: every sample runs to
its budget; DAIL reads three views) at the configured `STUDY_*_TOKENS_PER_SECOND`, above
`STUDY_MAX_HOURS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings as django_settings

from curation.models import Dataset, DatasetKind, Problem
from dailweb.errors import DomainError
from expansion.engine.answers import DEFAULT_KEPT_RULE, KEPT_RULES
from expansion.engine.rollout import DEFAULT_ROLLOUT_PRESET, ROLLOUT_PRESETS
from expansion.services.runs import PROBLEM_ORDER, RunSettings, run_settings_check
from training.engine import evaluation as evaluation_engine
from training.evaluations.services import problem_key
from training.models import StudyAcceptance
from training.services.training import base_model_check, training_config, training_defaults

MIN_SPLIT_PROBLEMS = 1
MAX_STUDY_PROBLEMS = 5000
PROMPT_TOKENS_GUESS = 200  # per training example, for the estimate only


# --- Arms ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSpec:
    key: str
    label: str
    description: str
    source: str  # "none" (base model), "expert_solutions" or "traces"
    objective: str = "nll"
    gamma: float = 0.0

    @property
    def trains(self) -> bool:
        return self.source != "none"


ARMS: dict[str, ArmSpec] = {
    arm.key: arm
    for arm in (
        ArmSpec("base", "Base model", "The base model, no adapter.", "none"),
        ArmSpec(
            "sft_solutions",
            "SFT on expert solutions",
            "NLL of each training problem's expert solution after the learner prompt "
            "(the paper's direct-SFT baseline).",
            "expert_solutions",
        ),
        ArmSpec(
            "nll_traces",
            "NLL on expanded traces",
            "NLL (supervised fine-tuning) on the study's expanded traces.",
            "traces",
        ),
        ArmSpec(
            "dail",
            "DAIL (γ 0.1)",
            "The contrastive objective on the expanded traces: toward the privileged view, "
            "away from the negative reference (the release's gamma 0.1).",
            "traces",
            objective="dail",
            gamma=0.1,
        ),
        ArmSpec(
            "dail_gamma0",
            "DAIL γ 0 (distillation)",
            "Plain distillation toward the privileged view on the expanded traces (gamma 0).",
            "traces",
            objective="dail",
            gamma=0.0,
        ),
    )
}


def arm_spec(key: str) -> ArmSpec:
    return ARMS.get(key) or ArmSpec(key, key, "an arm this version does not know", "none")


# --- Settings and plan -----------------------------------------------------------------------


@dataclass(frozen=True)
class StudySettings:
    """What an admin chooses for a study (validated by `study_plan`)."""

    name: str
    dataset_id: int | None
    base_model_path: str
    held_out_fraction: float = 0.3
    split_seed: int = 0
    arms: Sequence[str] = tuple(ARMS)
    acceptance: str = StudyAcceptance.AUTOMATIC
    # Expansion of the training problems.
    preset: str = DEFAULT_ROLLOUT_PRESET
    samples_per_problem: int = 2
    expansion_max_new_tokens: int = 256
    kept_rule: str = DEFAULT_KEPT_RULE  # the release: the first correct trace per problem
    # Training settings shared by the trained arms (DailTrainingConfig fields over the
    # form's defaults; each arm sets its own objective and gamma).
    training: dict[str, Any] = field(default_factory=dict)
    # Evaluation of every arm on the held-out problems.
    protocol: str = evaluation_engine.DEFAULT_PROTOCOL
    evaluation_samples: int = 8
    budgets: Sequence[int] = (128, 256)
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int | None = None
    evaluation_seed: int = 0
    prompt_template: str = evaluation_engine.EVALUATION_TEMPLATE
    # At most this many problems on each side (a small study of a large dataset); None: all.
    training_limit: int | None = None
    held_out_limit: int | None = None


@dataclass
class StudyPlan:
    settings: StudySettings
    dataset: Dataset
    base: Path
    arms: list[ArmSpec]
    training_problems: list[Problem]
    held_out_problems: list[Problem]
    expansion: dict[str, Any]
    training: dict[str, Any]
    evaluation: dict[str, Any]
    estimate: dict[str, Any]


def _fail(message: str, field_name: str | None = None) -> DomainError:
    return DomainError(message, field_errors={field_name: message} if field_name else None)


def _split(dataset: Dataset, settings: StudySettings) -> tuple[list[Problem], list[Problem]]:
    try:
        evaluation_engine.check_seed("The split seed", settings.split_seed)
    except evaluation_engine.EvaluationError as exc:
        raise _fail(f"{exc}.", "split_seed") from exc
    if not 0 < settings.held_out_fraction < 1:
        raise _fail(
            "The held-out fraction must be between 0 and 1 (both excluded): a study needs "
            "problems to train on and problems to evaluate on.",
            "held_out_fraction",
        )
    problems = list(
        Problem.objects.filter(dataset=dataset).select_related("dataset").order_by(*PROBLEM_ORDER)
    )
    if len(problems) > MAX_STUDY_PROBLEMS:
        raise _fail(f"A study takes datasets of at most {MAX_STUDY_PROBLEMS} problems.")
    training, held_out = [], []
    for problem in problems:
        side = (
            held_out
            if evaluation_engine.in_held_out_split(
                problem_key(problem), settings.held_out_fraction, settings.split_seed
            )
            else training
        )
        side.append(problem)
    if settings.training_limit:
        training = training[: settings.training_limit]
    if settings.held_out_limit:
        held_out = held_out[: settings.held_out_limit]
    if len(training) < MIN_SPLIT_PROBLEMS or len(held_out) < MIN_SPLIT_PROBLEMS:
        raise _fail(
            f"The split (held-out fraction {settings.held_out_fraction}, seed "
            f"{settings.split_seed}) leaves {len(training)} training and {len(held_out)} "
            f"held-out problem(s) of the {len(problems)} in {dataset.name}: a study needs both. "
            "Change the fraction or the seed, or add problems; nothing was queued.",
            "held_out_fraction",
        )
    return training, held_out


def _check_answers(dataset: Dataset, problems: list[Problem]) -> None:
    missing = [p.external_id for p in problems if not p.answer.strip()]
    if missing:
        raise _fail(
            f"{len(missing)} problem(s) of {dataset.name} have no final answer "
            f"({', '.join(missing[:10])}{' …' if len(missing) > 10 else ''}): a study checks "
            "answers on both sides of the split. Add the answers first; nothing was queued.",
            "dataset",
        )


def _arms(keys: Sequence[str]) -> list[ArmSpec]:
    chosen = list(dict.fromkeys(keys))
    unknown = [k for k in chosen if k not in ARMS]
    if unknown:
        raise _fail(
            f"Unknown arm(s) {', '.join(map(repr, unknown))}; choose from {', '.join(ARMS)}.",
            "arms",
        )
    if not chosen:
        raise _fail("Choose at least one arm.", "arms")
    return [ARMS[k] for k in ARMS if k in chosen]  # the table's order


def _estimate(
    settings: StudySettings,
    arms: list[ArmSpec],
    training: int,
    held_out: int,
    config: dict[str, Any],
) -> dict[str, Any]:
    """Tokens and seconds per step, from the configured throughputs (an upper bound on tokens:
    every sample is taken to run to its budget)."""
    expansion_tokens = (
        training * settings.samples_per_problem * settings.expansion_max_new_tokens
        if any(a.source == "traces" for a in arms)
        else 0
    )
    per_example = min(
        int(config["max_length"]), PROMPT_TOKENS_GUESS + settings.expansion_max_new_tokens
    )
    epochs = int(config["epochs"])
    training_tokens = 0
    for arm in arms:
        if arm.source == "expert_solutions":
            training_tokens += training * epochs * per_example
        elif arm.source == "traces":
            # Three views (learner, PS, NR) for DAIL, one for NLL; upper bound: every trace.
            views = 3 if arm.objective == "dail" else 1
            examples = training * settings.samples_per_problem
            training_tokens += examples * epochs * per_example * views
    evaluation_tokens = len(arms) * held_out * settings.evaluation_samples * max(settings.budgets)
    rates = {
        "expansion": django_settings.STUDY_EXPANSION_TOKENS_PER_SECOND,
        "training": django_settings.STUDY_TRAINING_TOKENS_PER_SECOND,
        "evaluation": django_settings.STUDY_EVALUATION_TOKENS_PER_SECOND,
    }
    tokens = {
        "expansion": expansion_tokens,
        "training": training_tokens,
        "evaluation": evaluation_tokens,
    }
    seconds = {step: tokens[step] / max(1, rates[step]) for step in tokens}
    return {
        "tokens": tokens,
        "tokens_per_second": rates,
        "seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "max_hours": django_settings.STUDY_MAX_HOURS,
    }


def duration_text(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes / 60:.1f} h"


def study_plan(*, settings: StudySettings) -> StudyPlan:
    """Check a study and compute its split, its steps' settings and what it will cost,
    without writing anything; raises the DomainError the launch would raise."""
    if not settings.name.strip():
        raise _fail("Give the study a name.", "name")
    if not settings.dataset_id:
        raise _fail("Choose a dataset.", "dataset")
    dataset = Dataset.objects.filter(pk=settings.dataset_id).first()
    if dataset is None:
        raise _fail("That dataset does not exist.", "dataset")
    if dataset.kind == DatasetKind.PROOF:
        raise _fail(
            f"{dataset.name} is a proof dataset: a study compares pass@k, which needs final "
            "answers to check; nothing was queued.",
            "dataset",
        )
    arms = _arms(settings.arms)
    if settings.acceptance not in StudyAcceptance.values:
        raise _fail(f"Unknown acceptance {settings.acceptance!r}.", "acceptance")
    base = base_model_check(settings.base_model_path)
    training, held_out = _split(dataset, settings)
    _check_answers(dataset, training + held_out)

    expansion = {
        "preset": settings.preset,
        "samples_per_problem": settings.samples_per_problem,
        "rollout": {"max_new_tokens": settings.expansion_max_new_tokens},
        "kept_rule": settings.kept_rule,
    }
    if settings.preset and settings.preset not in ROLLOUT_PRESETS:
        raise _fail(f"Unknown rollout preset {settings.preset!r}.", "preset")
    if settings.kept_rule not in KEPT_RULES:
        raise _fail(f"Unknown kept rule {settings.kept_rule!r}.", "kept_rule")
    run_settings_check(run_settings("check", str(base), expansion))

    shared = training_defaults() | dict(settings.training)
    for arm in arms:
        if arm.trains:
            training_config(shared | {"objective": arm.objective, "gamma": arm.gamma})

    evaluation = {
        "protocol": settings.protocol,
        "samples_per_problem": settings.evaluation_samples,
        "ks": list(range(1, settings.evaluation_samples + 1)),  # pass@k for every k <= n
        "budgets": sorted(set(settings.budgets)),
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": settings.top_k,
        "seed": settings.evaluation_seed,
        "prompt_template": settings.prompt_template,
    }
    try:
        evaluation_engine.SamplingSettings(
            samples=settings.evaluation_samples,
            max_new_tokens=max(settings.budgets, default=0) or 1,
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=settings.evaluation_seed,
            protocol=settings.protocol,
            **({"top_k": settings.top_k} if settings.top_k is not None else {}),
        )
        evaluation_engine.validate_budgets(settings.budgets)
    except (evaluation_engine.EvaluationError, TypeError, ValueError) as exc:
        raise _fail(f"Evaluation settings: {exc}.") from exc

    estimate = _estimate(settings, arms, len(training), len(held_out), shared)
    limit = django_settings.STUDY_MAX_HOURS * 3600
    if estimate["total_seconds"] > limit:
        parts = ", ".join(
            f"{step} {estimate['tokens'][step]:,} tokens ≈ {duration_text(s)}"
            for step, s in estimate["seconds"].items()
        )
        raise _fail(
            f"This study would take about {duration_text(estimate['total_seconds'])} on one "
            f"worker ({parts}), above the {django_settings.STUDY_MAX_HOURS} h the workers are "
            "set up for (DAIL_STUDY_MAX_HOURS). Use fewer problems, samples or tokens, or add "
            "workers and raise the limit; nothing was queued."
        )
    return StudyPlan(
        settings=settings,
        dataset=dataset,
        base=base,
        arms=arms,
        training_problems=training,
        held_out_problems=held_out,
        expansion=expansion,
        training=dict(settings.training),
        evaluation=evaluation,
        estimate=estimate,
    )


def run_settings(name: str, base: str, expansion: dict[str, Any]) -> RunSettings:
    return RunSettings(
        name=name,
        model_path=base,
        samples_per_problem=int(expansion["samples_per_problem"]),
        preset=expansion["preset"],
        rollout=dict(expansion["rollout"]),
        kept_rule=expansion["kept_rule"],
    )
