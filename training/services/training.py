"""Training runs: launch (freeze the data snapshot, check everything, queue one job on `gpu`),
execute (build token-id examples from the snapshot, train through the engine, store per-step
metrics, write the adapter and its lineage), cancel, retry, and the adapter download.

The data snapshot. At launch the accepted traces of the chosen expansion runs are exported
(`expansion.services.export.trace_record`, trimmed to what training reads) into
`<output_dir>/snapshot.jsonl.gz`; its SHA-256, the trace ids and the problem ids are stored on
the `TrainingRun`. Later verdicts, span edits or problem edits do not change a launched run:
the job reads only that file and refuses it if its hash changed. Rejected (and unreviewed or
needs-fix) traces are never in it; the counts of those left out are recorded.

Accepted traces that are flagged (`TRACE_FLAGS`: incorrect answer, no answer, truncated at the
token budget, not kept by the run's kept rule) are counted per flag for the form, and left out
of the snapshot for the flags the admin ticks (`TrainingSettings.leave_out`). Default: none is
left out. A reviewer's acceptance is a person's decision (the trace page asks them to confirm
one with a wrong, missing or truncated answer) and the automatic answer check can be wrong
where the person is right (CHAMP's prose answers), so the default trains on what reviewers
accepted and shows the counts so the choice is an informed one. The choice and the counts left
out per flag are recorded on the run (`data_filter`) and in the lineage.

Refused at launch, before anything is queued: an empty name, settings out of range (the
engine's `DailTrainingConfig` names the field), a base model that is not a model directory,
no expansion run, a run expanded with another base model (paths compared resolved), an empty
snapshot, a snapshot of which no trace fits `max_length`, and a warm-up that is not shorter
than the planned optimizer steps (`DailTrainingConfig.check_warmup`: the steps follow from the
examples used, the batch, the gradient accumulation and the epochs, so they are known here;
such a run would train at learning rate 0 and leave an adapter that never moved).

Over-long traces are handled by the engine's `overlong_policy` ("truncate" the response, or
"skip" the trace); the counts are computed at launch, shown on the page and confirmed by the
job. Reviewer-marked shortcut spans become the engine's per-token shortcut mask and are handled
by `shortcut_policy` (default "drop_position": marked positions leave the loss).

After training the run records how far the adapter moved (`update_norm`, the Frobenius norm of
the LoRA update) and the loss at its first and last steps; an adapter whose update norm is
(about) zero is marked "did not move" wherever it is listed.

The other data source, "expert solutions" (`training.services.expert_solutions`): the current
solution version of each problem of a dataset (optionally the training side of the seeded
held-out split), boxed, after the evaluation's learner prompt; NLL only (DAIL is refused). Its
records go into the same kind of snapshot (hash checked, problem ids recorded); the dataset,
the split and the counts are recorded in `data_filter` (`"source": "expert_solutions"`), and
`source_runs` and `trace_ids` are empty.

Execution resumes from the last complete checkpoint in the output directory (the engine does
that); metrics of steps after that checkpoint are deleted first, since those steps run again.
A NaN/inf loss stops the job (failed) with the last good checkpoint kept.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from django.conf import settings as django_settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from dailweb.errors import ConflictError, DomainError
from dailweb.jobs.models import ACTIVE_STATES, JobState
from dailweb.jobs.services import job_cancel, job_launch, job_retry
from expansion.engine.tokenizer_cache import cached_tokenizer
from expansion.models import ExpansionRun, ReviewState, Trace
from training.engine.config import DailTrainingConfig
from training.engine.data import OverlongCounts, TrainingExample, fit_to_length, views_for
from training.engine.evaluation import TRAINING_SNAPSHOT_FILE
from training.models import TRACE_FLAGS, TrainingMetric, TrainingRun, data_filter_rows
from training.services.expert_solutions import (
    EXPERT_RECORD,
    EXPERT_SOURCE,
    ExpertSolutionsChoice,
    expert_solution_example,
    expert_solution_records,
    expert_source_description,
)

TRAINING_KIND = "training"
SNAPSHOT_FILE = "snapshot.jsonl.gz"
LINEAGE_FILE = TRAINING_SNAPSHOT_FILE  # dail-training.json, read by the evaluation feature

# The release values (DailTrainingConfig's defaults) scaled for the embedded SmolLM2-135M on a
# CPU: a few optimizer steps over a small snapshot instead of hours. The form says so.
EMBEDDED_SCALE: dict[str, Any] = {
    "effective_batch_size": 4,  # release: 16
    "epochs": 1,  # release: 3 (reasoning) / 5 (instruct)
    "max_length": 1024,  # release: 2048 / 12288
    "warmup_steps": 2,  # release: 5
    "checkpoint_every": 5,  # release: 50
}


def training_defaults() -> dict[str, Any]:
    """Initial form values: the release defaults with `EMBEDDED_SCALE` applied."""
    return DailTrainingConfig(**EMBEDDED_SCALE).to_dict()


def training_config(values: dict[str, Any]) -> DailTrainingConfig:
    """A validated config from form or command-line values; a DomainError names the field."""
    try:
        return DailTrainingConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]
        field_errors = {name: message} if name in values else {}
        raise DomainError(f"Settings: {message}.", field_errors=field_errors) from exc


def trace_flag_q(flag: str, prefix: str = "") -> Q:
    """The condition of one flag on Trace rows (`prefix`: the path to Trace, e.g. "traces__").
    "no_answer" only where the problem has an answer to give (proofs have none)."""
    conditions = {
        "incorrect": Q(**{f"{prefix}answer_correct": False}),
        "no_answer": Q(**{f"{prefix}answer_extracted": ""})
        & ~Q(**{f"{prefix}run_problem__answer": ""}),
        "truncated": Q(**{f"{prefix}finish_reason": "length"}),
        "not_kept": Q(**{f"{prefix}kept": False}),
    }
    return conditions[flag]


def accepted_flag_annotations() -> dict[str, Count]:
    """Per expansion run, `accepted_<flag>`: its accepted traces carrying each flag."""
    accepted = Q(traces__review_state=ReviewState.ACCEPTED)
    return {
        f"accepted_{flag}": Count("traces", filter=accepted & trace_flag_q(flag, "traces__"))
        for flag in TRACE_FLAGS
    }


@dataclass(frozen=True)
class TrainingSettings:
    """What an admin chooses for a training run (validated by `training_run_launch`).

    The data: the accepted traces of the expansion runs `run_ids`, or (`expert_solutions`)
    the expert solutions of a dataset; one of the two. `leave_out`: flags of `TRACE_FLAGS`
    whose accepted traces stay out of the snapshot (default none; see the module docstring)."""

    name: str
    base_model_path: str
    run_ids: Sequence[int] = ()
    config: dict[str, Any] = field(default_factory=training_defaults)
    leave_out: Sequence[str] = ()
    expert_solutions: ExpertSolutionsChoice | None = None
    # Which traces of the runs count as accepted: the reviewers' verdicts (SELECTION_REVIEWED,
    # the default) or every kept trace no reviewer rejected (SELECTION_AUTOMATIC; studies
    # offer it, labelled as such wherever the run is shown).
    selection: str = "reviewed"


SELECTION_REVIEWED = "reviewed"
SELECTION_AUTOMATIC = "automatic"
SELECTIONS = {
    SELECTION_REVIEWED: "accepted by reviewers",
    SELECTION_AUTOMATIC: "kept, accepted automatically (no reviewer saw them)",
}


def selected_traces_q(selection: str) -> Q:
    """The condition on Trace rows of the traces a selection trains on."""
    if selection == SELECTION_AUTOMATIC:
        return Q(kept=True) & ~Q(review_state=ReviewState.REJECTED)
    return Q(review_state=ReviewState.ACCEPTED)


def accepted_trace_flags(
    *, run_ids: Sequence[int], selection: str = SELECTION_REVIEWED
) -> dict[str, int]:
    """How many accepted traces of the runs carry each flag of `TRACE_FLAGS` (a trace can
    carry several)."""
    accepted = Trace.objects.filter(selected_traces_q(selection), run_id__in=run_ids)
    return accepted.aggregate(
        **{flag: Count("pk", filter=trace_flag_q(flag)) for flag in TRACE_FLAGS}
    )


# --- Models and tokenizers -------------------------------------------------------------------


def base_model_check(path_text: str) -> Path:
    """The resolved base model directory, or a DomainError saying what is wrong with it."""
    if not path_text.strip():
        raise DomainError("Choose a base model.", field_errors={"base_model_path": "required"})
    path = Path(path_text.strip())
    if not path.is_dir():
        raise DomainError(
            f"No base model directory at {path}.",
            field_errors={"base_model_path": "not a directory"},
        )
    if (path / "adapter_config.json").is_file():
        raise DomainError(
            f"{path} is a LoRA adapter, not a base model.",
            field_errors={"base_model_path": "an adapter"},
        )
    if not (path / "config.json").is_file():
        raise DomainError(
            f"{path} is not a model directory: it has no config.json.",
            field_errors={"base_model_path": "no config.json"},
        )
    return path.resolve()


def context_length(model_dir: str | Path) -> int | None:
    """The model's context window from its config.json (None when it does not say)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = config.get("max_position_embeddings") or config.get("text_config", {}).get(
        "max_position_embeddings"
    )
    return int(value) if value else None


def load_tokenizer(model_dir: str | Path) -> Any:
    """The base model's tokenizer from the process's one cache (reloaded when the model's
    files change: `expansion.engine.tokenizer_cache.model_stamp`)."""
    path = Path(model_dir)
    try:
        tokenizer = cached_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise DomainError(f"Cannot load the tokenizer of {path}: {exc}") from exc
    if tokenizer is None:
        raise DomainError(f"Cannot load the tokenizer of {path}: it has no tokenizer files.")
    return tokenizer


# --- The data snapshot -----------------------------------------------------------------------


def snapshot_record(trace: Trace) -> dict[str, Any]:
    """What training reads of one trace (the export's record, trimmed) plus the problem's
    database id and the run's token budget (the prompts were built to leave room for it)."""
    from expansion.services.export import trace_record

    record = trace_record(trace)
    kept = (
        "trace_id", "run_id", "model_path", "adapter_path", "reasoning", "templates", "dataset",
        "problem_id", "problem", "solution_version", "solution", "answer", "partial_solution",
        "sample_index", "token_ids", "shortcut_spans", "review_state",
    )  # fmt: skip
    frozen = {key: record[key] for key in kept}
    frozen["problem_pk"] = trace.run_problem.problem_id
    frozen["max_new_tokens"] = trace.run.rollout_config.get("max_new_tokens")
    return frozen


def write_snapshot(records: Iterable[dict[str, Any]], path: Path) -> str:
    """Write records as gzip JSONL; returns the SHA-256 of the uncompressed lines."""
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
        for record in records:
            line = (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode()
            digest.update(line)
            out.write(line)
    return digest.hexdigest()


def read_snapshot(path: Path, sha256: str) -> list[dict[str, Any]]:
    """The snapshot's records; refuses a missing file or one whose content changed."""
    if not path.is_file():
        raise DomainError(f"The data snapshot {path} is missing; this run cannot train.")
    digest = hashlib.sha256()
    records = []
    with gzip.open(path, "rb") as lines:
        for line in lines:
            digest.update(line)
            records.append(json.loads(line))
    if digest.hexdigest() != sha256:
        raise DomainError(
            f"The data snapshot {path} changed since launch (SHA-256 {digest.hexdigest()[:12]}… "
            f"instead of {sha256[:12]}…); refusing to train on other data."
        )
    return records


def shortcut_mask(spans: Sequence[dict[str, Any]], length: int) -> tuple[bool, ...] | None:
    """Per response token: inside a reviewer-marked span [start_token, end_token)."""
    if not spans:
        return None
    marks = [False] * length
    for span in spans:
        for i in range(max(0, int(span["start_token"])), min(length, int(span["end_token"]))):
            marks[i] = True
    return tuple(marks)


def training_examples(
    records: Sequence[dict[str, Any]], tokenizer: Any, context: int | None
) -> tuple[list[TrainingExample], int]:
    """Token-id examples of the three views (the prompts as expansion built them, from the
    run's templates) and the number of empty traces left out; expert-solution records become
    learner-only examples (`expert_solutions.expert_solution_example`)."""
    from expansion.engine.prompts import PromptError, PromptTemplates, build_view_prompts

    prompts_by_key: dict[str, Any] = {}
    examples = []
    empty = 0
    for record in records:
        if record.get("source") == EXPERT_RECORD:
            examples.append(expert_solution_example(record, tokenizer))
            continue
        if not record["token_ids"]:
            empty += 1
            continue
        budget = record.get("max_new_tokens")
        max_prompt = context - int(budget) if context and budget and context > budget else None
        key = json.dumps(
            [record[k] for k in ("problem", "solution", "partial_solution", "templates")]
            + [record["reasoning"], max_prompt],
            sort_keys=True,
        )
        if key not in prompts_by_key:
            try:
                prompts_by_key[key] = build_view_prompts(
                    tokenizer,
                    record["problem"],
                    record["solution"],
                    record["partial_solution"],
                    PromptTemplates.from_dict(record["templates"]),
                    reasoning=bool(record["reasoning"]),
                    max_prompt_tokens=max_prompt,
                )
            except PromptError as exc:
                raise DomainError(
                    f"Trace #{record['trace_id']} (problem {record['problem_id']}): {exc}"
                ) from exc
        prompts = prompts_by_key[key]
        response = [int(t) for t in record["token_ids"]]
        examples.append(
            TrainingExample(
                learner_prompt_ids=prompts.learner_ids,
                privileged_prompt_ids=prompts.privileged_ids,
                negative_prompt_ids=prompts.negative_ids,
                response_ids=response,
                shortcut_mask=shortcut_mask(record["shortcut_spans"], len(response)),
                example_id=f"trace-{record['trace_id']}",
            )
        )
    return examples, empty


def _check_runs(run_ids: Sequence[int], base: Path) -> list[ExpansionRun]:
    ids = sorted({int(i) for i in run_ids})
    if not ids:
        raise DomainError(
            "Choose at least one expansion run whose accepted traces to train on.",
            field_errors={"expansion_runs": "required"},
        )
    runs = list(ExpansionRun.objects.filter(pk__in=ids).order_by("pk"))
    missing = sorted(set(ids) - {r.pk for r in runs})
    if missing:
        raise DomainError(
            f"Unknown expansion run(s): {', '.join(f'#{i}' for i in missing)}.",
            field_errors={"expansion_runs": "unknown"},
        )
    other = [r for r in runs if Path(r.model_path).resolve() != base]
    if other:
        listed = "; ".join(
            f"#{r.pk} {r.name} used {Path(r.model_path).resolve()}" for r in other[:10]
        )
        raise DomainError(
            f"Traces from another base model cannot train an adapter for {base}: {listed}. "
            "Choose runs expanded with this base model, or that run's base model.",
            field_errors={"expansion_runs": "another base model"},
        )
    return runs


def _excluded_counts(run_ids: Sequence[int], selection: str) -> dict[str, int]:
    """Traces of the runs left out of the snapshot, by review state (automatic selection:
    those not kept, and those a reviewer rejected)."""
    if selection == SELECTION_AUTOMATIC:
        traces = Trace.objects.filter(run_id__in=run_ids)
        return {
            "not kept": traces.filter(kept=False).count(),
            ReviewState.REJECTED: traces.filter(
                kept=True, review_state=ReviewState.REJECTED
            ).count(),
        }
    counts = dict(
        Trace.objects.filter(run_id__in=run_ids)
        .exclude(review_state=ReviewState.ACCEPTED)
        .values_list("review_state")
        .annotate(n=Count("pk"))
    )
    return {
        state: counts.get(state, 0) for state in ReviewState.values if state != ReviewState.ACCEPTED
    }


def _fit(
    examples: Sequence[TrainingExample], config: DailTrainingConfig
) -> tuple[list[TrainingExample], OverlongCounts]:
    return fit_to_length(
        examples, config.max_length, config.overlong_policy, views_for(config.objective)
    )


def _fit_and_plan_steps(
    records: list[dict[str, Any]], base: Path, config: DailTrainingConfig, what: str
) -> tuple[list[TrainingExample], OverlongCounts, int, int]:
    """The examples that fit `max_length`, what fitting did, the empty records left out and
    the planned optimizer steps; refuses a snapshot of which nothing fits and a warm-up that
    is not shorter than the planned steps. `what`: the records, in words ("accepted traces")."""
    examples, empty = training_examples(records, load_tokenizer(base), context_length(base))
    kept, overlong = _fit(examples, config)
    if not kept:
        raise DomainError(
            f"None of the {len(records)} {what} fits max_length = {config.max_length} "
            f"tokens ({overlong.prompt_too_long} have a prompt that alone fills it, "
            f"{overlong.skipped} were skipped as too long, {empty} are empty). Raise the "
            "maximum length or truncate; nothing was queued.",
            field_errors={"max_length": "nothing fits"},
        )
    steps = config.planned_steps(len(kept))
    try:
        config.check_warmup(steps)
    except ValueError as exc:
        raise DomainError(
            f"Settings: {exc}. {len(kept)} {what}, micro-batch {config.micro_batch_size} x "
            f"{config.gradient_accumulation_steps} accumulation steps, {config.epochs} "
            f"epoch(s) give {steps} optimizer step(s): lower the warm-up below {steps} (or to "
            f"0), or train on more {what} or epochs. Nothing was queued.",
            field_errors={
                "warmup_steps": f"must be below the {steps} planned optimizer step(s), or 0"
            },
        ) from exc
    return kept, overlong, empty, steps


def _expert_solutions_plan(
    name: str,
    config: DailTrainingConfig,
    settings: TrainingSettings,
    choice: ExpertSolutionsChoice,
) -> TrainingPlan:
    """The plan of a run on the expert solutions of a dataset (NLL only)."""
    if config.objective != "nll":
        raise DomainError(
            f"The objective {config.objective!r} cannot train on expert solutions: DAIL needs "
            "the learner, privileged and negative views of expanded traces. Choose the NLL "
            "objective (supervised fine-tuning on the solutions), or train DAIL on the "
            "accepted traces of expansion runs; nothing was queued.",
            field_errors={"objective": "expert solutions train with NLL only"},
        )
    if settings.run_ids:
        raise DomainError(
            "Choose one data source: the accepted traces of expansion runs, or the expert "
            "solutions of a dataset, not both.",
            field_errors={"expansion_runs": "a second data source"},
        )
    if settings.leave_out:
        raise DomainError(
            "Leaving out flagged traces applies to accepted traces only; expert solutions "
            "carry no trace flags.",
            field_errors={"leave_out": "traces only"},
        )
    base = base_model_check(settings.base_model_path)
    records, summary = expert_solution_records(choice)
    kept, overlong, empty, steps = _fit_and_plan_steps(records, base, config, "expert solutions")
    return TrainingPlan(
        name=name,
        config=config,
        base=base,
        runs=[],
        traces=[],
        records=records,
        excluded={},
        flagged={},
        leave_out=[],
        left_out={},
        left_out_total=0,
        examples_used=len(kept),
        overlong=overlong,
        empty=empty,
        planned_steps=steps,
        expert=summary,
    )


# --- Launch, cancel, retry -------------------------------------------------------------------


@dataclass
class TrainingPlan:
    """Everything a launch checks and freezes, computed without writing anything."""

    name: str
    config: DailTrainingConfig
    base: Path
    runs: list[ExpansionRun]
    traces: list[Trace]
    records: list[dict[str, Any]]
    excluded: dict[str, int]  # review state -> traces of the runs not accepted
    flagged: dict[str, int]  # flag -> accepted traces carrying it
    leave_out: list[str]  # the flags whose traces stay out
    left_out: dict[str, int]  # flag -> accepted traces left out carrying it
    left_out_total: int
    examples_used: int
    overlong: OverlongCounts
    empty: int
    planned_steps: int
    expert: dict[str, Any] | None = None  # the expert-solutions source's summary, if that
    selection: str = SELECTION_REVIEWED

    @property
    def flag_rows(self) -> list[tuple[str, int, int | None]]:
        return [] if self.expert else data_filter_rows(self.data_filter)

    @property
    def source_description(self) -> str:
        if self.expert:
            return expert_source_description(self.expert)
        return f"{len(self.traces)} traces {SELECTIONS[self.selection]}"

    @property
    def data_filter(self) -> dict[str, Any]:
        if self.expert:
            return dict(self.expert)
        recorded = {
            "leave_out": self.leave_out,
            "flagged": self.flagged,
            "left_out": self.left_out,
            "left_out_total": self.left_out_total,
        }
        if self.selection != SELECTION_REVIEWED:
            recorded["selection"] = self.selection
        return recorded


def _leave_out_flags(values: Sequence[str]) -> list[str]:
    unknown = sorted(set(values) - set(TRACE_FLAGS))
    if unknown:
        raise DomainError(
            f"Unknown trace flag(s) to leave out: {', '.join(unknown)} (known: "
            f"{', '.join(TRACE_FLAGS)}).",
            field_errors={"leave_out": "unknown"},
        )
    return [flag for flag in TRACE_FLAGS if flag in set(values)]


def training_run_plan(*, settings: TrainingSettings) -> TrainingPlan:
    """Check a launch and compute what it would train on (the snapshot's traces, the counts
    per flag and left out, over-long handling, the planned optimizer steps) without writing
    anything; raises the DomainError the launch would raise."""
    from expansion.services.export import reviewed_traces

    name = settings.name.strip()
    if not name:
        raise DomainError("Give the training run a name.", field_errors={"name": "required"})
    config = training_config(dict(settings.config))
    if settings.expert_solutions is not None:
        return _expert_solutions_plan(name, config, settings, settings.expert_solutions)
    if settings.selection not in SELECTIONS:
        raise DomainError(f"Unknown trace selection {settings.selection!r}.")
    leave_out = _leave_out_flags(settings.leave_out)
    base = base_model_check(settings.base_model_path)
    runs = _check_runs(settings.run_ids, base)
    run_ids = [r.pk for r in runs]
    flagged = accepted_trace_flags(run_ids=run_ids, selection=settings.selection)
    chosen = Q(pk__in=[])
    for flag in leave_out:
        chosen |= trace_flag_q(flag)
    selected = selected_traces_q(settings.selection)
    accepted = Trace.objects.filter(selected, run_id__in=run_ids)
    left_out_ids = set(accepted.filter(chosen).values_list("pk", flat=True)) if leave_out else set()
    left_out = accepted.filter(pk__in=left_out_ids).aggregate(
        **{flag: Count("pk", filter=trace_flag_q(flag)) for flag in leave_out}
    )
    traces = [
        t
        for t in reviewed_traces(run_ids=run_ids, states=ReviewState.values).filter(selected)
        if t.pk not in left_out_ids
    ]
    excluded = _excluded_counts(run_ids, settings.selection)
    if not traces and settings.selection == SELECTION_AUTOMATIC:
        raise DomainError(
            "The snapshot is empty: the chosen runs have no kept trace that a reviewer did not "
            f"reject ({excluded['not kept']} not kept, {excluded[ReviewState.REJECTED]} "
            "rejected); nothing was queued.",
            field_errors={"expansion_runs": "no kept traces"},
        )
    if not traces:
        left = ", ".join(f"{n} {state}" for state, n in excluded.items() if n) or "none"
        if left_out_ids:
            left = f"{len(left_out_ids)} accepted but left out by your choice, {left}"
        raise DomainError(
            "The snapshot is empty: the chosen runs have no accepted traces to train on "
            f"(traces there: {left}). Accept traces in the review queue first, or leave fewer "
            "out; nothing was queued.",
            field_errors={"expansion_runs": "no accepted traces"},
        )
    records = [snapshot_record(t) for t in traces]
    kept, overlong, empty, steps = _fit_and_plan_steps(records, base, config, "accepted traces")
    return TrainingPlan(
        name=name,
        config=config,
        base=base,
        runs=runs,
        traces=traces,
        records=records,
        excluded=excluded,
        flagged=flagged,
        leave_out=leave_out,
        left_out=left_out,
        left_out_total=len(left_out_ids),
        examples_used=len(kept),
        overlong=overlong,
        empty=empty,
        planned_steps=steps,
        selection=settings.selection,
    )


def training_run_launch(*, settings: TrainingSettings, launched_by) -> TrainingRun:
    """Freeze the snapshot, check it fits, create the run and queue its job on `gpu`."""
    plan = training_run_plan(settings=settings)
    config, traces, records, overlong = plan.config, plan.traces, plan.records, plan.overlong
    output_dir = (
        Path(django_settings.ARTIFACTS_DIR)
        / "training"
        / f"{timezone.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:8]}"
    )
    snapshot = output_dir / SNAPSHOT_FILE
    try:
        sha256 = write_snapshot(records, snapshot)
        with transaction.atomic():
            run = TrainingRun.objects.create(
                name=plan.name[:200],
                created_by=launched_by if getattr(launched_by, "pk", None) else None,
                base_model_path=str(plan.base),
                objective=config.objective,
                config=config.to_dict(),
                source_runs=[
                    {
                        "id": r.pk,
                        "name": r.name,
                        "model_path": r.model_path,
                        "adapter_path": r.adapter_path,
                        "accepted": sum(1 for t in traces if t.run_id == r.pk),
                    }
                    for r in plan.runs
                ],
                trace_ids=[t.pk for t in traces],
                problem_ids=sorted({rec["problem_pk"] for rec in records}),
                snapshot_file=str(snapshot),
                snapshot_sha256=sha256,
                snapshot_traces=len(records),
                snapshot_spans=sum(len(rec.get("shortcut_spans", ())) for rec in records),
                excluded=plan.excluded,
                data_filter=plan.data_filter,
                examples_used=plan.examples_used,
                overlong_truncated=overlong.truncated,
                overlong_skipped=overlong.skipped,
                prompt_too_long=overlong.prompt_too_long,
                response_tokens_dropped=overlong.response_tokens_dropped,
                empty_traces=plan.empty,
                output_dir=str(output_dir),
                total_steps=plan.planned_steps,
            )
            run.job = job_launch(
                kind=TRAINING_KIND,
                launched_by=launched_by,
                params={"training_run_id": run.pk},
                title=f"Training #{run.pk} {run.name}",
            )
            run.save(update_fields=["job"])
    except BaseException:
        shutil.rmtree(output_dir, ignore_errors=True)  # nothing was queued: leave no files
        raise
    return run


def training_run_cancel(*, run: TrainingRun, by) -> None:
    """Stop at the next optimizer step; a checkpoint of the work so far is kept."""
    if run.job is None or run.job.state not in ACTIVE_STATES:
        raise ConflictError("This training run is not queued or running.")
    job_cancel(job_id=run.job_id, by=by)


def training_run_retry(*, run: TrainingRun, by) -> None:
    """Queue the run's job again; it resumes from the last checkpoint."""
    if run.job is None or run.job.state not in (JobState.FAILED, JobState.CANCELLED):
        raise ConflictError("Only a failed or cancelled training run can be retried.")
    job_retry(job_id=run.job_id, by=by)


# --- Executing a run (inside its job) --------------------------------------------------------


def _checkpoint_step(checkpoint: Path | None) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1]) if checkpoint is not None else 0


def _metric_row(run: TrainingRun, step: int, epoch: float, metrics: dict[str, float]) -> None:
    def value(name: str) -> float | None:
        number = metrics.get(name)
        return float(number) if number is not None else None

    TrainingMetric.objects.update_or_create(
        run=run,
        step=step,
        defaults={
            "epoch": float(epoch),
            "loss": float(metrics.get("loss", metrics.get("nll", 0.0))),
            "kl_privileged": value("kl_privileged"),
            "kl_negative": value("kl_negative"),
            "nll": value("nll"),
            "lr": float(metrics.get("lr", 0.0)),
            "grad_norm": value("grad_norm"),
            "tokens": int(metrics.get("tokens", 0)),
        },
    )


def final_metrics(run: TrainingRun) -> dict[str, Any]:
    """The last step's metrics (what the registry shows), with the first step's loss."""
    last = run.metrics.order_by("-step").first()
    if last is None:
        return {}
    first = run.metrics.order_by("step").first()
    values = {
        "first_step": first.step,
        "first_loss": first.loss,
        "step": last.step,
        "epoch": round(last.epoch, 3),
        "loss": last.loss,
        "kl_privileged": last.kl_privileged,
        "kl_negative": last.kl_negative,
        "nll": last.nll,
        "lr": last.lr,
    }
    return {k: v for k, v in values.items() if v is not None}


def training_source_description(run: TrainingRun) -> str:
    """The run's data in one line: "expert solutions of dataset X, train side of split
    (fraction f, seed s), N problems" or "N accepted traces of expansion runs #1, #2"."""
    if run.data_filter.get("source") == EXPERT_SOURCE:
        return expert_source_description(run.data_filter)
    runs = ", ".join(f"#{r['id']}" for r in run.source_runs)
    selection = run.data_filter.get("selection", SELECTION_REVIEWED)
    return (
        f"{run.snapshot_traces} traces of expansion run(s) {runs}, "
        f"{SELECTIONS.get(selection, selection)}"
    )


def lineage(run: TrainingRun, result: Any) -> dict[str, Any]:
    """The content of dail-training.json: the snapshot's problem ids plus where the adapter
    came from (job, data, base model, settings, final metrics)."""
    return {
        "problem_ids": list(run.problem_ids),
        "training_run": run.pk,
        "name": run.name,
        "job": run.job_id,
        "created_at": run.created_at.isoformat(),
        "finished_at": timezone.now().isoformat(),
        "base_model": run.base_model_path,
        "objective": run.objective,
        "loss_normalisation": run.loss_normalisation,
        "shortcut_policy": run.config.get("shortcut_policy"),
        "config": run.config,
        "snapshot": {
            "source": training_source_description(run),
            "file": run.snapshot_file,
            "sha256": run.snapshot_sha256,
            "traces": run.snapshot_traces,
            "trace_ids": list(run.trace_ids),
            "expansion_runs": run.source_runs,
            "shortcut_spans": run.snapshot_spans,
            "excluded": run.excluded,
            "data_filter": run.data_filter,
        },
        "fitting": {
            "examples_used": run.examples_used,
            "truncated": run.overlong_truncated,
            "skipped": run.overlong_skipped,
            "prompt_too_long": run.prompt_too_long,
            "response_tokens_dropped": run.response_tokens_dropped,
            "empty": run.empty_traces,
        },
        "global_step": result.global_step,
        "total_steps": result.total_steps,
        "final_metrics": run.final_metrics,
        "adapter_update": {
            "update_norm": run.update_norm,
            "did_not_move": run.did_not_move,
            "first_loss": run.final_metrics.get("first_loss"),
            "last_loss": run.final_metrics.get("loss"),
        },
    }


def training_run_execute(
    *,
    training_run_id: int,
    progress: Callable[[int, int, str], None],
    log: Callable[[str], None],
    should_stop: Callable[[], bool],
) -> dict[str, Any]:
    """Train (or resume) the run's adapter; returns a summary with "status" "completed" or
    "cancelled". Raises DomainError when the data, the settings or the loss go wrong."""
    from training.engine.trainer import (
        CHECKPOINTS_DIR,
        TrainingDataError,
        TrainingDiverged,
        TrainingProgress,
        last_complete_checkpoint,
        train_adapter,
    )

    run = TrainingRun.objects.get(pk=training_run_id)
    config = training_config(dict(run.config))
    output_dir = Path(run.output_dir)
    checkpoint = last_complete_checkpoint(output_dir / CHECKPOINTS_DIR)
    done = _checkpoint_step(checkpoint)
    # Steps after the last checkpoint run again; their old metrics would be stale.
    run.metrics.filter(step__gt=done).delete()
    progress(done, run.total_steps, "reading the data snapshot")
    records = read_snapshot(Path(run.snapshot_file), run.snapshot_sha256)
    tokenizer = load_tokenizer(run.base_model_path)
    examples, empty = training_examples(records, tokenizer, context_length(run.base_model_path))
    kept, overlong = _fit(examples, config)
    source = (
        training_source_description(run)
        if run.data_filter.get("source") == EXPERT_SOURCE
        else f"{len(records)} accepted traces from expansion run(s) "
        f"{', '.join('#' + str(r['id']) for r in run.source_runs)}"
    )
    log(
        f"snapshot: {source} (SHA-256 "
        f"{run.snapshot_sha256[:12]}…); {len(kept)} used, {overlong.truncated} truncated "
        f"({overlong.response_tokens_dropped} tokens cut), {overlong.skipped} skipped as too "
        f"long, {overlong.prompt_too_long} with a prompt longer than max_length, {empty} empty"
    )
    if len(kept) != run.examples_used:
        raise DomainError(
            f"The snapshot gives {len(kept)} examples now but gave {run.examples_used} at "
            "launch (the base model's tokenizer changed?); refusing to train on other data."
        )
    progress(
        done,
        run.total_steps,
        f"loading {run.base_model_name}"
        + (f", resuming from {checkpoint.name}" if checkpoint else ""),
    )
    report_every = max(1, run.total_steps // 20)

    def on_progress(report: TrainingProgress) -> None:
        _metric_row(run, report.step, report.epoch, report.metrics)
        stage = (
            f"step {report.step} of {report.total_steps} · epoch "
            f"{report.epoch:.2f} of {config.epochs}"
        )
        if report.step % report_every == 0 or report.step == report.total_steps:
            shown = ", ".join(
                f"{k} {report.metrics[k]:.4g}"
                for k in ("loss", "kl_privileged", "kl_negative", "nll", "lr")
                if k in report.metrics
            )
            log(f"step {report.step}/{report.total_steps}: {shown}")
        progress(report.step, report.total_steps, stage)

    if checkpoint is not None:
        log(f"resuming from {checkpoint.name}")
    try:
        result = train_adapter(
            run.base_model_path,
            examples,
            config,
            output_dir,
            on_progress=on_progress,
            should_stop=should_stop,
            pad_token_id=int(tokenizer.pad_token_id or 0),
        )
    except TrainingDiverged as exc:
        last = last_complete_checkpoint(output_dir / CHECKPOINTS_DIR)
        TrainingRun.objects.filter(pk=run.pk).update(last_checkpoint=str(last or ""))
        kept_note = (
            f"the last good checkpoint, {last.name}, is kept"
            if last
            else "no checkpoint had been saved yet"
        )
        raise DomainError(
            f"Training diverged: {exc}. The job stopped; {kept_note}. Lower the learning rate "
            "(or gamma) and launch a new run; a retry resumes from that checkpoint with the "
            "same settings."
        ) from exc
    except TrainingDataError as exc:
        raise DomainError(str(exc)) from exc

    run.last_checkpoint = str(result.last_checkpoint or "")
    run.total_steps = result.total_steps
    summary: dict[str, Any] = {
        "status": result.status,
        "global_step": result.global_step,
        "total_steps": result.total_steps,
        "examples_used": result.examples_used,
        "overlong": result.overlong.as_dict(),
        "resumed_from": result.resumed_from.name if result.resumed_from else None,
        "last_checkpoint": run.last_checkpoint,
        "reference_cache": result.reference_cache,
        "seconds": round(result.seconds, 1),
    }
    if result.status == "cancelled":
        run.save(update_fields=["last_checkpoint", "total_steps"])
        log(f"stopped at step {result.global_step}; checkpoint {run.last_checkpoint} kept")
        return summary
    run.adapter_path = str(result.adapter_dir)
    run.final_metrics = final_metrics(run)
    run.update_norm = result.update_norm
    (Path(run.adapter_path) / LINEAGE_FILE).write_text(
        json.dumps(lineage(run, result), indent=2, sort_keys=True) + "\n"
    )
    run.save(
        update_fields=[
            "last_checkpoint", "total_steps", "adapter_path", "final_metrics", "update_norm"
        ]
    )  # fmt: skip
    log(f"adapter written to {run.adapter_path} with {LINEAGE_FILE}")
    moved = f"LoRA update norm {run.update_norm:.4g}"
    if run.did_not_move:
        moved += (
            " — the adapter DID NOT MOVE (its update is zero): it changes nothing; check the "
            "learning rate, warm-up and data"
        )
    log(moved)
    return {
        **summary,
        "adapter": run.adapter_path,
        "final_metrics": run.final_metrics,
        "update_norm": run.update_norm,
        "did_not_move": run.did_not_move,
    }


# --- The adapter download --------------------------------------------------------------------


def adapter_archive(*, run: TrainingRun) -> IO[bytes]:
    """A zip of the run's adapter directory (rewound temporary file), or a DomainError."""
    if not run.adapter_path:
        raise DomainError("This training run has not produced an adapter (yet).")
    adapter = Path(run.adapter_path)
    if not (adapter / "adapter_config.json").is_file():
        raise DomainError(f"The adapter directory {adapter} is gone or incomplete.")
    archive: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115  (the response closes it)
    folder = f"dail-adapter-{run.pk}"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(adapter.rglob("*")):
            if path.is_file():
                zipped.write(path, f"{folder}/{path.relative_to(adapter)}")
    archive.seek(0)
    return archive
