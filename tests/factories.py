"""Small factories for test data."""

from __future__ import annotations

import itertools

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group

from dailweb.jobs.models import Job, JobState

_counter = itertools.count(1)


def make_user(role: str | None = None, username: str | None = None, password: str = "pw"):
    User = get_user_model()
    user = User.objects.create_user(username=username or f"user{next(_counter)}", password=password)
    if role:
        user.groups.add(Group.objects.get_or_create(name=role)[0])
    return user


def make_job(state: str = JobState.QUEUED, kind: str = "worker_check", **fields) -> Job:
    defaults = {
        "title": "test job",
        "queue": "default",
        "params": {"steps": 3, "seconds_per_step": 0},
        "task_id": f"task-{next(_counter)}",
    }
    defaults.update(fields)
    return Job.objects.create(kind=kind, state=state, **defaults)


def make_dataset(name: str | None = None, kind: str = "verifiable"):
    from curation.models import Dataset

    return Dataset.objects.create(name=name or f"dataset-{next(_counter)}", kind=kind)


def make_problem(
    author=None,
    dataset=None,
    statement: str = "Find $x$ if $2x + 1 = 7$.",
    solution: str = "We have $2x + 1 = 7$, so $2x = 6$ and $x = 3$. The answer is $3$.",
    answer: str = "3",
    waypoints=(),
):
    from curation.services.problems import problem_create

    return problem_create(
        dataset=dataset or make_dataset(),
        statement=statement,
        solution=solution,
        answer=answer,
        author=author,
        waypoints=list(waypoints),
    )
