"""Every URL in the URLconf, requested by every role: the server enforces the roles.

A view added later must declare its roles (`require_role` / `require_login`) and, if its URL
takes arguments, get an entry in URL_KWARGS below, or this test fails.
"""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse

from dailweb.roles import ALL_ROLES, ANY_AUTHENTICATED
from tests.factories import make_job, make_problem, make_run, make_user
from tests.training.factories import make_evaluation
from tests.training.training_factories import make_study, make_training_run

# URLs outside the role system, with the reason.
PUBLIC = {
    "login": "the login page itself",
    "logout": "logging out needs no role",
    "favicon": "the site icon, which browsers fetch before anyone logs in",
}
# Namespaces handled by their own access control.
SELF_GUARDED_NAMESPACES = {"admin"}  # Django admin: staff only (tested below)

# How to build arguments for URLs that take them (given the requesting user, so objects that
# only their owner may edit can be made theirs).
URL_KWARGS = {
    "jobs:detail": lambda user: {"job_id": make_job().pk},
    "jobs:cancel": lambda user: {"job_id": make_job().pk},
    "jobs:retry": lambda user: {"job_id": make_job(state="failed").pk},
    "jobs:launch": lambda user: {"kind": "worker_check"},
    "curation:detail": lambda user: {"problem_id": make_problem(author=user).pk},
    "curation:edit": lambda user: {"problem_id": make_problem(author=user).pk},
    "curation:details": lambda user: {"problem_id": make_problem(author=user).pk},
    "curation:versions": lambda user: {"problem_id": make_problem(author=user).pk},
    # Import jobs are shown to the person who started them (and admins).
    "curation:import_job": lambda user: {
        "job_id": make_job(kind="problem_import", launched_by=user).pk
    },
    "curation:import_job_cancel": lambda user: {
        "job_id": make_job(kind="problem_import", launched_by=user).pk
    },
    "curation:import_job_retry": lambda user: {
        "job_id": make_job(kind="problem_import", state="failed", launched_by=user).pk
    },
    "expansion:run_detail": lambda user: {"run_id": make_run(problems=1, samples=1).pk},
    "expansion:run_cancel": lambda user: {"run_id": make_run(problems=1, samples=1).pk},
    "expansion:run_retry": lambda user: {"run_id": make_run(problems=1, samples=1).pk},
    "expansion:trace": lambda user: {"trace_id": make_run(problems=1, samples=1).traces.get().pk},
    "expansion:verdict": lambda user: {"trace_id": make_run(problems=1, samples=1).traces.get().pk},
    "expansion:span_add": lambda user: {
        "trace_id": make_run(problems=1, samples=1).traces.get().pk
    },
    "expansion:span_delete": lambda user: _span_kwargs(user),
    "expansion:whatif": lambda user: {"trace_id": make_run(problems=1, samples=1).traces.get().pk},
    "evaluations:detail": lambda user: {"evaluation_id": make_evaluation().pk},
    "evaluations:cancel": lambda user: {"evaluation_id": make_evaluation(job_state="running").pk},
    "evaluations:retry": lambda user: {"evaluation_id": make_evaluation(job_state="failed").pk},
    "evaluations:problem": lambda user: {
        "problem_id": make_evaluation().problems.first().problem_id
    },
    "evaluations:rule": lambda user: {
        "sample_id": make_evaluation().problems.first().samples.first().pk
    },
    "training:detail": lambda user: {"training_run_id": make_training_run().pk},
    "training:metrics": lambda user: {"training_run_id": make_training_run().pk},
    "training:cancel": lambda user: {"training_run_id": make_training_run().pk},
    "training:retry": lambda user: {"training_run_id": make_training_run(job_state="failed").pk},
    "training:download": lambda user: {"training_run_id": make_training_run().pk},
    "studies:detail": lambda user: {"study_id": make_study(results=True, problems=2, samples=2).pk},
    "studies:cancel": lambda user: {"study_id": make_study().pk},
    "studies:retry": lambda user: {"study_id": make_study(state="failed").pk},
    "studies:review_done": lambda user: {"study_id": make_study(state="awaiting_review").pk},
    "studies:export_json": lambda user: {"study_id": make_study(results=True, samples=2).pk},
    "studies:export_report": lambda user: {"study_id": make_study(results=True, samples=2).pk},
}


def _span_kwargs(user) -> dict:
    from expansion.models import ShortcutSpan

    trace = make_run(problems=1, samples=1).traces.get()
    span = ShortcutSpan.objects.create(
        trace=trace, reviewer=user or make_user("reviewer"), start_token=0, end_token=1
    )
    return {"trace_id": trace.pk, "span_id": span.pk}


def iter_patterns(resolver=None, namespace=""):
    resolver = resolver or get_resolver()
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):
            ns = pattern.namespace or ""
            full = f"{namespace}:{ns}" if namespace and ns else (ns or namespace)
            yield from iter_patterns(pattern, full)
        elif isinstance(pattern, URLPattern):
            name = f"{namespace}:{pattern.name}" if namespace else pattern.name
            yield name, pattern


def routed_views():
    views = []
    for name, pattern in iter_patterns():
        if name in PUBLIC or name is None and pattern.pattern.regex.pattern.startswith("^static"):
            continue
        if (name or "").split(":")[0] in SELF_GUARDED_NAMESPACES:
            continue
        views.append((name, pattern))
    return views


def test_every_view_declares_its_roles():
    missing = [
        name for name, pattern in routed_views() if not hasattr(pattern.callback, "allowed_roles")
    ]
    assert not missing, f"views without require_role/require_login: {missing}"
    assert routed_views(), "the URLconf has no views?"


def _url(name: str, pattern, user) -> str:
    if pattern.pattern.converters:
        assert name in URL_KWARGS, f"add URL_KWARGS[{name!r}] so the role matrix covers it"
        return reverse(name, kwargs=URL_KWARGS[name](user))
    return reverse(name)


@pytest.mark.django_db
@pytest.mark.parametrize("role", [None, "none", *[r.value for r in ALL_ROLES]])
def test_role_matrix(role, broker_url, clean_queues):
    client = Client()
    user = None
    if role is not None:
        user = make_user(role if role != "none" else None)
        client.force_login(user)
    checked = 0
    for name, pattern in routed_views():
        allowed = pattern.callback.allowed_roles
        for method in ("get", "post"):
            url = _url(name, pattern, user)
            response = getattr(client, method)(url)
            checked += 1
            where = f"{method.upper()} {url} ({name}) as {role}"
            if role is None:
                assert response.status_code == 302, where
                assert response["Location"].startswith(reverse("login")), where
            elif allowed == ANY_AUTHENTICATED or (role in {r.value for r in allowed}):
                assert response.status_code not in (401, 403), where
                assert response.status_code < 500, where
            else:
                assert response.status_code == 403, where
                assert b"403" in response.content, where
    assert checked >= 2 * len(routed_views())


@pytest.mark.django_db
@pytest.mark.parametrize("role", ["expert", "reviewer"])
def test_django_admin_is_for_staff_only(role):
    client = Client()
    client.force_login(make_user(role))
    response = client.get("/admin/")
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]


@pytest.mark.django_db
def test_role_groups_exist_after_migrations():
    from django.contrib.auth.models import Group

    assert set(Group.objects.values_list("name", flat=True)) >= {"expert", "reviewer", "admin"}


@pytest.mark.django_db
def test_403_page_is_friendly_not_a_stack_trace():
    client = Client()
    client.force_login(make_user("expert"))
    response = client.get(reverse("jobs:list"))
    assert response.status_code == 403
    body = response.content.decode()
    assert "Not allowed" in body and "admins" in body
    assert "Traceback" not in body
