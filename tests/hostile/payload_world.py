"""A data set with hostile text in every user-controlled field that a page shows, and the
pages that show it (shared by the raw-HTML suite and the Chromium suite).

For each payload P, `build_world` creates, all holding P (cut to each field's max_length):
- a user whose username is P (the author, reviewer, ruler and launcher of P's objects);
- a dataset (name, licence, description) and a problem (external id, statement, answer,
  source, tags) whose solution has two versions containing P (version note P, answer P),
  with P marked as a waypoint (spans of the solution);
- an expansion run (name, adapter path) with one chunk whose job has P as title, stage, log,
  error, parameters and result; two traces of the problem whose generated text contains P
  (tokens split at white space, so P's markup reaches the per-token JSON block whole), with
  P as the extracted answer and as a failed trace's error, a verdict note P, a shortcut span
  note P, and one trace claimed by the user;
- two evaluations (name, adapter path, prompt template, training snapshot path) on the
  problem, whose samples' text, boxed answers and ruling notes hold P, with a flagged sample;
- a training run (name, base model path, source run name, snapshot file, output directory,
  checkpoint, adapter path) whose job's title, stage, log and error hold P;
- a running job titled P (so the job pages poll and swap P in through htmx).

The three signed-in users (`world.users`: expert, reviewer, admin) have hostile usernames too
(shown in the header and on the home page). Usernames are stored as given (Django's
`create_user` NFKC-normalises them, which would turn some payloads into plain letters).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlencode

import numpy as np
from django.urls import reverse

from tests.hostile.payloads import Payload

ROLES = ("expert", "reviewer", "admin")
# Password of every user of the world (the browser suite logs in with a session cookie).
PASSWORD = "hostile-pass-1"


@dataclass
class Page:
    """One request of the suites: who may make it, and what it should show."""

    name: str
    url: str
    roles: tuple[str, ...]
    method: str = "get"
    data: dict | None = None
    htmx: bool = False
    status: int = 200
    follow: bool = False
    shows: tuple[str, ...] = ()  # probes that must be visible as text on the page
    download: bool = False  # not HTML: must not be served as HTML
    browser: bool = True  # also loaded in Chromium (False: only the server's escaping differs)
    json_shows: tuple[tuple[str, str], ...] = ()  # (JSON block id, probe its strings hold)


@dataclass
class PayloadObjects:
    payload: Payload
    author: object
    dataset: object
    problem: object
    run: object
    traces: list
    evaluations: list
    training_run: object
    jobs: list
    study: object = None
    body: str = ""


@dataclass
class World:
    users: dict = field(default_factory=dict)
    items: list[PayloadObjects] = field(default_factory=list)


def _user(username: str, role: str | None):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Group

    User = get_user_model()
    user = User.objects.create_user(username=f"tmp-{User.objects.count()}", password=PASSWORD)
    # Stored exactly as given; first and last names too (the admin shows them).
    User.objects.filter(pk=user.pk).update(
        username=username, first_name=username[:150], last_name=username[:150]
    )
    user.refresh_from_db()
    if role:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


def _job(payload: Payload, *, kind: str, state: str, launched_by, params=None, queue="gpu"):
    from tests.factories import make_job

    return make_job(
        state=state,
        kind=kind,
        queue=queue,
        title=payload.fit(200),
        stage=payload.fit(200),
        log=f"started\n{payload.text}\nstill going",
        error=payload.text if state == "failed" else "",
        params={"note": payload.text, **(params or {})},
        result={"note": payload.text},
        launched_by=launched_by,
        progress_total=10,
        progress_done=4,
    )


def _trace_arrays(text: str, seed: int):
    """Per-token data for `text`, split at white space (one token per word or space run)."""
    from tests.factories import make_trace_arrays

    pieces = re.findall(r"\s+|\S+", text)
    arrays = make_trace_arrays(len(pieces), seed=seed)
    return dataclasses.replace(
        arrays, text=text, char_lengths=np.asarray([len(p) for p in pieces], dtype=np.int64)
    )


def _build_one(index: int, payload: Payload, signed_in: dict) -> PayloadObjects:
    from curation.models import Dataset
    from curation.services import problems as problem_services
    from curation.services.suggestions import partial_solution_text
    from curation.spans import Span
    from expansion.engine.prompts import PromptTemplates
    from expansion.engine.rollout import RolloutConfig
    from expansion.engine.trace_format import encode_trace
    from expansion.models import ExpansionChunk, ExpansionRun, RunProblem, Trace
    from expansion.services import review
    from tests.training.factories import make_evaluation
    from tests.training.training_factories import make_training_run
    from training.models import EvaluationSample, Study, StudyArm, TrainingMetric

    P = payload.text
    author = _user(payload.fit(150, f"~{index}"), "expert")
    dataset = Dataset.objects.create(
        name=payload.fit(200, f"~{index}"),
        kind="verifiable",
        licence=payload.fit(200),
        description=P,
        created_by=author,
    )
    intro = "We solve $2x + 1 = 7$ first.\n\n"
    body = f"{intro}{P}\n\nThen $2x = 6$, so $x = 3$."
    waypoints = [
        Span(len(intro), len(intro) + len(P), "expert"),
        Span(body.index("$x = 3$"), body.index("$x = 3$") + len("$x = 3$"), "expert"),
    ]
    problem = problem_services.problem_create(
        dataset=dataset,
        statement=f"{P}\n\nFind $x$ if $2x + 1 = 7$.",
        solution=body,
        answer=payload.fit(problem_services.MAX_ANSWER_CHARS),
        external_id=payload.fit(200),
        source=payload.fit(500),
        tags=[payload.fit(100), "algebra"],
        author=author,
        waypoints=waypoints,
        note=payload.fit(500),
    )
    edited = f"{body}\n\nChecked again: {P}"
    problem_services.solution_revise(
        problem=problem,
        body=edited,
        answer=payload.fit(problem_services.MAX_ANSWER_CHARS),
        author=author,
        note=payload.fit(500),
    )
    problem.refresh_from_db()
    version = problem.versions.get(number=2)
    spans = [Span(w.start, w.end, w.origin) for w in version.waypoints.order_by("order")]

    # Expansion: a run, its chunk job, two traces with verdicts, a span and a claim.
    run = ExpansionRun.objects.create(
        name=payload.fit(200),
        created_by=author,
        model_path="/nonexistent/model",
        adapter_path="/adapters/" + payload.fit(200),
        rollout_config=RolloutConfig().to_dict(),
        templates=PromptTemplates().to_dict(),
        samples_per_problem=2,
    )
    run_problem = RunProblem.objects.create(
        run=run,
        problem=problem,
        solution_version=version,
        answer=P,
        partial_solution=partial_solution_text(body=version.body, answer=P, spans=spans),
        position=0,
    )
    chunk_job = _job(
        payload, kind="expansion_chunk", state="failed", launched_by=author,
        params={"run_id": run.pk},
    )  # fmt: skip
    chunk = ExpansionChunk.objects.create(run=run, index=0, job=chunk_job)
    chunk.run_problems.add(run_problem)
    traces = []
    for sample in range(2):
        text = f"Let me think. {P}\nSo $x = 3$ and the answer is \\boxed{{3}}. {P}"
        arrays = _trace_arrays(text, seed=index * 10 + sample)
        traces.append(
            Trace.objects.create(
                run=run,
                run_problem=run_problem,
                sample_index=sample,
                data=encode_trace(arrays),
                length=len(arrays),
                fallback_share=0.25,
                shortcut_max=3.5,
                shortcut_mean_positive=0.5,
                shortcut_share=0.1,
                finish_reason="eos" if sample == 0 else "error",
                error="" if sample == 0 else P,
                answer_extracted=P,
                answer_correct=sample == 0,
                kept=sample == 0,
            )
        )
    review.verdict_record(trace_id=traces[0].pk, reviewer=author, decision="accepted", note=P)
    review.verdict_record(
        trace_id=traces[0].pk, reviewer=signed_in["reviewer"], decision="needs_fix", note=P
    )
    review.shortcut_span_add(
        trace_id=traces[0].pk, reviewer=author, start_token=2, end_token=4, note=P,
        tokens=traces[0].length,
    )  # fmt: skip
    Trace.objects.filter(pk=traces[1].pk).update(claimed_by=author)

    # Evaluations: two (the compare page shows their differences), one flagged sample each.
    evaluations = []
    for number in range(2):
        evaluation = make_evaluation(
            problems=1,
            samples=2,
            on_problems=[problem],
            name=payload.fit(200),
            adapter_path="/adapters/" + payload.fit(200),
            prompt_template=f"{P}\n{{problem}}",
            training_snapshot="/snapshots/" + payload.fit(200),
            temperature=0.6 + 0.1 * number,
            created_by=author,
        )
        evaluation.job.title = payload.fit(200)
        evaluation.job.stage = payload.fit(200)
        evaluation.job.error = P
        evaluation.job.save(update_fields=["title", "stage", "error"])
        samples = EvaluationSample.objects.filter(eval_problem__evaluation=evaluation)
        samples.update(text=f"We find {P}, so \\boxed{{{P}}}.", answer_extracted=P)
        samples.filter(sample_index=1).update(
            checkers_disagree=True, ruling="incorrect", ruling_note=P, ruled_by=author
        )
        evaluations.append(evaluation)

    training_run = make_training_run(
        job_state="failed",
        name=payload.fit(200),
        created_by=author,
        base_model_path="/models/" + payload.fit(200),
        source_runs=[{"id": run.pk, "name": P, "accepted": 1, "model_path": run.model_path}],
        trace_ids=[traces[0].pk],
        problem_ids=[problem.pk],
        snapshot_file="/snapshots/" + payload.fit(200),
        output_dir="/outputs/" + payload.fit(200),
        last_checkpoint="/outputs/" + payload.fit(200) + "/checkpoint-1",
        adapter_path="/outputs/" + payload.fit(200) + "/adapter",
        excluded={"rejected": 1},
        final_metrics={"step": 2, "loss": 0.5, "kl_privileged": 0.1, "kl_negative": 0.2},
    )
    training_job = training_run.job
    for name in ("title", "stage"):
        setattr(training_job, name, payload.fit(200))
    training_job.log = f"step 1\n{P}\nstep 2"
    training_job.error = P
    training_job.launched_by = author
    training_job.save(update_fields=["title", "stage", "log", "error", "launched_by"])
    for step in (1, 2):
        TrainingMetric.objects.create(
            run=training_run, step=step, epoch=step / 2, loss=1.0 / step, kl_privileged=0.1,
            kl_negative=0.2, lr=1e-4,
        )  # fmt: skip
    running = _job(
        payload, kind="worker_check", state="running", launched_by=author, queue="default"
    )
    study = Study.objects.create(
        name=payload.fit(200),
        created_by=author,
        dataset=dataset,
        base_model_path="/models/" + payload.fit(200),
        held_out_fraction=0.5,
        training_problem_ids=[problem.pk],
        held_out_problem_ids=[problem.pk],
        acceptance="automatic",
        expansion_run=run,
        expansion_settings={"preset": P[:50], "samples_per_problem": 1,
                            "rollout": {"max_new_tokens": 8}, "kept_rule": P[:50]},
        training_settings={"epochs": 1},
        evaluation_settings={"protocol": "workbench", "samples_per_problem": 2, "ks": [1, 2],
                             "budgets": [16, 64], "temperature": 0.6, "top_p": 0.95,
                             "top_k": None, "seed": 0, "prompt_template": P},
        state="failed",
        step="training",
        state_reason=P,
    )  # fmt: skip
    StudyArm.objects.create(study=study, key="base", position=0, evaluation=evaluations[0])
    StudyArm.objects.create(
        study=study, key="dail", position=1, training_run=training_run, launch_error=P
    )
    return PayloadObjects(
        payload=payload,
        author=author,
        dataset=dataset,
        problem=problem,
        run=run,
        traces=traces,
        evaluations=evaluations,
        training_run=training_run,
        jobs=[running, chunk_job, training_job],
        study=study,
        body=edited,
    )


def build_world(payloads, usernames: dict[str, str]) -> World:
    """The data set for `payloads`; `usernames` maps each role to its user's (hostile) name."""
    world = World()
    for role in ROLES:
        world.users[role] = _user(usernames[role], role)
    for index, payload in enumerate(payloads):
        world.items.append(_build_one(index, payload, world.users))
    return world


# --- The pages ------------------------------------------------------------------------------

READERS = ("expert", "reviewer", "admin")
REVIEWERS = ("reviewer", "admin")
ADMINS = ("admin",)


def global_pages(world: World) -> list[Page]:
    """Pages that show every payload of the world at once (lists, compare, launch forms)."""
    evaluation_ids = [e.pk for item in world.items for e in item.evaluations]
    compare = "?" + urlencode([("ids", pk) for pk in evaluation_ids])
    probes = tuple(item.payload.probe for item in world.items)
    return [
        Page("home", reverse("home"), READERS),
        Page("problem list", reverse("curation:list"), READERS, shows=probes[:1]),
        Page("problem list (htmx)", reverse("curation:list"), READERS, htmx=True),
        Page("problem create form", reverse("curation:create"), ("expert", "admin")),
        Page("expansion runs", reverse("expansion:runs"), REVIEWERS, shows=probes[:1]),
        Page("expansion runs (htmx)", reverse("expansion:runs"), REVIEWERS, htmx=True),
        Page("run launch form", reverse("expansion:run_launch"), ADMINS),
        Page("review queue", reverse("expansion:queue"), REVIEWERS, shows=probes[:1]),
        Page("review queue (htmx)", reverse("expansion:queue"), REVIEWERS, htmx=True),
        Page("evaluations", reverse("evaluations:list"), REVIEWERS, shows=probes[:1]),
        Page("evaluations (htmx)", reverse("evaluations:list"), REVIEWERS, htmx=True),
        Page("evaluation compare", reverse("evaluations:compare") + compare, REVIEWERS),
        Page("evaluation launch form", reverse("evaluations:launch"), ADMINS),
        Page("training runs", reverse("training:list"), ADMINS, shows=probes[:1]),
        Page("training runs (htmx)", reverse("training:list"), ADMINS, htmx=True),
        Page("training launch form", reverse("training:launch"), ADMINS),
        Page("adapter registry", reverse("training:registry"), ADMINS, shows=probes[:1]),
        Page("jobs", reverse("jobs:list"), ADMINS, shows=probes[:1]),
        Page("jobs (htmx)", reverse("jobs:list"), ADMINS, htmx=True),
        Page("models", reverse("expansion:models"), ADMINS),
        Page("studies", reverse("studies:list"), REVIEWERS, shows=probes[:1]),
        Page("studies (htmx)", reverse("studies:list"), REVIEWERS, htmx=True),
        Page("study launch form", reverse("studies:launch"), ADMINS),
    ]


def item_pages(item: PayloadObjects) -> list[Page]:
    """Pages that show one payload's objects (detail pages, partials, reflected parameters)."""
    from curation.services import problems as problem_services

    P, probe = item.payload.text, (item.payload.probe,)
    problem, trace, evaluation = item.problem, item.traces[0], item.evaluations[0]
    training_run, job = item.training_run, item.jobs[0]
    ids = urlencode([("ids", e.pk) for e in item.evaluations])
    reflected = urlencode({"q": item.payload.fit(300), "author": item.payload.fit(150)})
    version = problem.versions.get(number=2)
    waypoints = [[w.start, w.end, w.origin] for w in version.waypoints.order_by("order")]
    editor_state = {
        "statement": problem.statement,
        "body": item.body,
        # Cut to the editor form's limits (a longer stored answer: see the suite's report).
        "answer": item.payload.fit(problem_services.MAX_ANSWER_CHARS),
        "note": item.payload.fit(500),
        "waypoints": json.dumps(waypoints),
        "waypoints_body": item.body,
    }
    start = item.body.rindex(P)
    return [
        Page("problem detail", reverse("curation:detail", args=[problem.pk]), READERS, shows=probe),
        Page("problem edit", reverse("curation:edit", args=[problem.pk]), ADMINS, shows=probe),
        Page("problem versions", reverse("curation:versions", args=[problem.pk]), READERS,
             shows=probe),
        Page("problem versions 2-1", reverse("curation:versions", args=[problem.pk]) + "?a=2&b=1",
             READERS, browser=False),
        Page("problem list, search reflected", reverse("curation:list") + "?" + reflected,
             READERS, browser=False),
        Page("problem list, dataset filter",
             reverse("curation:list") + f"?dataset={item.dataset.pk}", READERS, shows=probe,
             browser=False),
        Page("editor preview", reverse("curation:editor_preview"), ("expert", "admin"),
             method="post", data=editor_state, htmx=True),
        Page("editor preview, add waypoint", reverse("curation:editor_preview"),
             ("expert", "admin"), method="post", htmx=True,
             data={**editor_state, "action": "add", "start": start, "end": start + len(P)}),
        Page("editor preview, suggest", reverse("curation:editor_preview"), ("expert", "admin"),
             method="post", htmx=True, data={**editor_state, "action": "suggest"}),
        Page("problem create, invalid form reflected", reverse("curation:create"),
             ("expert",), method="post", status=400,
             data={**editor_state, "external_id": item.payload.fit(200),
                   "source": item.payload.fit(500), "tags": item.payload.fit(500)}),
        Page("run detail", reverse("expansion:run_detail", args=[item.run.pk]), REVIEWERS,
             shows=probe),
        Page("run detail (htmx)", reverse("expansion:run_detail", args=[item.run.pk]),
             REVIEWERS, htmx=True),
        Page("review queue, filter reflected",
             reverse("expansion:queue") + "?" + urlencode({"problem": item.payload.fit(200)}),
             REVIEWERS, browser=False),
        Page("trace", reverse("expansion:trace", args=[trace.pk]), REVIEWERS, shows=probe,
             json_shows=(("trace-data", item.payload.probe),)),
        Page("failed trace", reverse("expansion:trace", args=[item.traces[1].pk]), REVIEWERS,
             shows=probe, browser=False),
        Page("trace verdict (htmx)", reverse("expansion:verdict", args=[trace.pk]), ("reviewer",),
             method="post", htmx=True, shows=probe,
             data={"decision": "rejected", "note": item.payload.fit(2000), "then": "",
                   "base_revision": type(trace).objects.get(pk=trace.pk).revision}),
        Page("trace span (htmx)", reverse("expansion:span_add", args=[item.traces[1].pk]),
             ("reviewer",), method="post", htmx=True, shows=probe,
             data={"start_token": 0, "end_token": 1, "note": item.payload.fit(2000)}),
        Page("evaluation detail", reverse("evaluations:detail", args=[evaluation.pk]), REVIEWERS,
             shows=probe, json_shows=(("eval-chart-data", item.payload.probe),)),
        Page("evaluation problem",
             reverse("evaluations:problem", args=[problem.pk]) + f"?{ids}&"
             + urlencode({"x": item.payload.fit(200)}), REVIEWERS, shows=probe),
        Page("evaluation compare (pair)", reverse("evaluations:compare") + f"?{ids}", REVIEWERS,
             shows=probe, browser=False),
        Page("training detail", reverse("training:detail", args=[training_run.pk]),
             ADMINS, shows=probe),
        Page("training detail (htmx)", reverse("training:detail", args=[training_run.pk]),
             ADMINS, htmx=True),
        Page("job detail", reverse("jobs:detail", args=[job.pk]), ADMINS, shows=probe),
        Page("study detail", reverse("studies:detail", args=[item.study.pk]), REVIEWERS,
             shows=probe),
        Page("study detail (htmx)", reverse("studies:detail", args=[item.study.pk]), REVIEWERS,
             htmx=True),
        Page("job detail (htmx)", reverse("jobs:detail", args=[job.pk]), ADMINS, htmx=True),
        Page("failed job detail", reverse("jobs:detail", args=[item.jobs[1].pk]), ADMINS,
             shows=probe, browser=False),
        Page("dataset create, message", reverse("curation:dataset_create"), ("expert",),
             method="post", follow=True, shows=(item.payload.probe[:50],),
             data={"name": item.payload.fit(190, "~new"), "kind": "verifiable",
                   "licence": P[:200], "description": P}),
        # Downloads: never served as HTML.
        Page("problem export", reverse("curation:export") + f"?dataset={item.dataset.pk}"
             "&format=jsonl", READERS, download=True),
        Page("trace export", reverse("expansion:export") + f"?run={item.run.pk}"
             "&state=accepted&state=needs_fix&format=jsonl", REVIEWERS, download=True),
        Page("evaluation export csv", reverse("evaluations:export") + f"?{ids}&format=csv",
             REVIEWERS, download=True),
        Page("evaluation export json", reverse("evaluations:export") + f"?{ids}&format=json",
             REVIEWERS, download=True),
        Page("training metrics", reverse("training:metrics", args=[training_run.pk]),
             ADMINS, download=True),
        Page("study json", reverse("studies:export_json", args=[item.study.pk]), REVIEWERS,
             download=True),
        Page("study report zip", reverse("studies:export_report", args=[item.study.pk]),
             REVIEWERS, download=True),
    ]  # fmt: skip


# URL names the suites do not request, with the reason (every other URL name must be covered).
NOT_PAGES = {
    "logout": "logging out shows nothing",
    "login": "no user text (the suites sign in with a session)",
    "curation:import": "its report is covered by tests/hostile/test_import_files.py",
    "curation:import_job": "the import job's report: tests/hostile/test_import_files.py",
    "curation:import_job_cancel": "POST that answers with the import job page",
    "curation:import_job_retry": "POST that answers with the import job page",
    "curation:details": "POST that redirects to the problem page (covered)",
    "expansion:next": "redirects to a trace page (covered)",
    "expansion:run_cancel": "POST that redirects to the run page (covered)",
    "expansion:run_retry": "POST that redirects to the run page (covered)",
    "expansion:span_delete": "POST answering with the review panel (covered by span add)",
    "expansion:whatif": "JSON of numbers, needs the model",
    "jobs:launch": "POST that redirects to the job page (covered)",
    "jobs:cancel": "POST answering with the job status partial (covered by job detail htmx)",
    "jobs:retry": "POST answering with the job status partial (covered by job detail htmx)",
    "evaluations:cancel": "POST that redirects to the evaluation page (covered)",
    "evaluations:retry": "POST that redirects to the evaluation page (covered)",
    "evaluations:rule": "POST that redirects to the evaluation problem page (covered)",
    "training:cancel": "POST that redirects to the training page (covered)",
    "training:retry": "POST that redirects to the training page (covered)",
    "training:download": "a zip of the adapter directory (no HTML)",
    "studies:cancel": "POST that redirects to the study page (covered)",
    "studies:retry": "POST that redirects to the study page (covered)",
    "studies:review_done": "POST that redirects to the study page (covered)",
}
