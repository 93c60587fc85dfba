"""One of every page type, with the data each needs, for the browser tests that walk the whole
site (the accessibility check; the CSP check builds the same kinds of rows).

`build_site()` makes the rows and returns, per role, the paths that role uses; the tests log in
as each role in turn with the credentials returned."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from axes.models import AccessAttempt

from curation.services.problems import solution_revise
from dailweb.jobs.models import JobState
from tests.factories import (
    make_dataset,
    make_job,
    make_problem,
    make_run,
    make_trace_arrays,
    make_user,
)
from tests.training.factories import make_evaluation
from tests.training.training_factories import make_study, make_training_run

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from curation.models import Problem
    from training.models import Evaluation, TrainingRun

MATH_SOLUTION = (
    "Let $f(x) = \\frac{x^2 + 1}{\\sqrt{x}}$. Then\n\n"
    "$$\\sum_{k=1}^{n} k = \\frac{n(n+1)}{2}, \\qquad \\int_0^1 x\\,dx = \\tfrac12$$\n\n"
    "\\begin{aligned} a &= b + c \\\\ \\left( \\frac{a}{b} \\right)^2 &= \\binom{n}{k} \\end{aligned}\n\n"
    "| n | $n^2$ |\n| --- | --- |\n| 3 | $9$ |\n\n`code $x$` and **bold**. The answer is $\\boxed{3}$."
)


@dataclass
class RoleVisit:
    """A role's login and the paths it walks, in order."""

    username: str
    password: str
    paths: list[str] = field(default_factory=list)


@dataclass
class Site:
    anonymous: list[str]
    expert: RoleVisit
    reviewer: RoleVisit
    admin: RoleVisit
    trace_path: str
    problem: Problem
    training: TrainingRun
    evaluations: tuple[Evaluation, Evaluation]
    admin_user: User


def with_full_colour_scores(trace) -> None:
    """Give the trace scores at both ends of the heatmap's scale (+-8 nats, past full colour),
    so that a contrast check sees text on the strongest colours the trace page paints."""
    import numpy as np

    from expansion.engine.trace_format import encode_trace

    arrays = make_trace_arrays(trace.length, seed=7)
    extremes = np.resize(np.array([8.0, -8.0, 0.5, -0.5], dtype=np.float32), trace.length)
    arrays.privileged_logprobs = np.full(trace.length, -8.5, dtype=np.float32)
    arrays.negative_logprobs = arrays.privileged_logprobs + extremes
    arrays.negative_logprobs = np.minimum(arrays.negative_logprobs, -0.01)
    trace.data = encode_trace(arrays)
    trace.save(update_fields=["data"])


def build_site() -> Site:
    """Rows for every page type: a problem with math and two versions, a run with traces, a
    running job, a finished training run with metrics, two evaluations on the same problems,
    a study with results (charts, comparisons, lineage)."""
    expert = make_user("expert", username="erin", password="site-pass-1")
    dataset = make_dataset(name="site set")
    problem = make_problem(
        author=expert, dataset=dataset, statement="Find $x$ with $\\sqrt{x} = 3$.",
        solution=MATH_SOLUTION, answer="3",
    )  # fmt: skip
    solution_revise(problem=problem, body=MATH_SOLUTION + "\n\nA second version.", author=expert)

    run = make_run(problems=1, samples=2, tokens=40)
    trace = run.traces.order_by("pk").first()
    with_full_colour_scores(trace)
    make_user("reviewer", username="rita", password="site-pass-2")

    admin = make_user("admin", username="ada", password="site-pass-3")
    admin.is_staff = admin.is_superuser = True
    admin.save(update_fields=["is_staff", "is_superuser"])
    running = make_job(state=JobState.RUNNING, progress_done=3, progress_total=8)
    training = make_training_run(
        job_state=JobState.SUCCEEDED, metrics=[(1.0, 0.5, 0.4), (0.8, 0.4, 0.3)]
    )
    base = make_evaluation(problems=2, samples=2, name="base")
    tuned = make_evaluation(
        samples=2, name="tuned", on_problems=[m.problem for m in base.problems.all()]
    )
    evaluated = base.problems.first().problem_id
    study = make_study(name="site study", results=True, problems=3, samples=2)
    AccessAttempt.objects.create(
        username="someone", ip_address="10.0.0.1", user_agent="x", failures_since_start=2,
        http_accept="text/html", path_info="/accounts/login/", get_data="", post_data="",
    )  # fmt: skip

    trace_path = f"/review/traces/{trace.pk}/"
    return Site(
        anonymous=["/accounts/login/"],
        expert=RoleVisit(
            "erin",
            "site-pass-1",
            [
                "/",
                "/problems/",
                f"/problems/{problem.pk}/",
                f"/problems/{problem.pk}/edit/",
                f"/problems/{problem.pk}/versions/",
                f"/problems/{problem.pk}/versions/?a=1&b=2",
                "/problems/new/",
                "/problems/import/",
                "/problems/datasets/new/",
            ],
        ),
        reviewer=RoleVisit(
            "rita",
            "site-pass-2",
            # The trace page last: the CSP walk inspects a token on it next.
            ["/", "/review/", "/studies/", f"/studies/{study.pk}/", trace_path],
        ),
        admin=RoleVisit(
            "ada",
            "site-pass-3",
            [
                "/",
                "/jobs/",
                f"/jobs/{running.pk}/",
                "/runs/",
                f"/runs/{run.pk}/",
                "/runs/new/",
                "/models/",
                "/training/",
                "/training/new/",
                f"/training/{training.pk}/",
                "/training/adapters/",
                "/evaluations/",
                "/evaluations/new/",
                f"/evaluations/{base.pk}/",
                f"/evaluations/compare/?ids={base.pk}&ids={tuned.pk}",
                f"/evaluations/problems/{evaluated}/?ids={base.pk}&ids={tuned.pk}",
                "/studies/",
                "/studies/new/",
                f"/studies/{study.pk}/",
            ],
        ),
        trace_path=trace_path,
        problem=problem,
        training=training,
        evaluations=(base, tuned),
        admin_user=admin,
    )
