"""Hostile and careless numbers in forms (part of the hostile-input suite).

A table over every integer field of every launch form, built from the form classes, so a field
added later is covered by construction: at its limits the form takes the value (and a seed at
its limit is stored as given), one past them and in every odd spelling Python's `int()` would
take (`" 7 "`, `1_000`, `+7`, full-width digits, `7.0`, 5,000 digits) the form refuses it with a
message on that field, answers 400 and launches nothing. Then: every integer field of every
form in the project is the strict field; an empty POST to any launch URL launches nothing;
integers in query strings and JSON waypoints are held to the same rule.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from django import forms
from django.test import Client
from django.urls import reverse

from dailweb.forms import StrictIntegerField
from dailweb.jobs.models import Job
from tests.factories import make_dataset, make_problem, make_run, make_user
from tests.training.conftest import tiny_model_path  # noqa: F401  (fixture)
from tests.training.test_training_views import form_data as training_form_data
from tests.training.test_views import launch_data as evaluation_launch_data
from tests.training.training_factories import make_tokenized_run

pytestmark = pytest.mark.django_db

ODD_SPELLINGS = [
    " 7 ",  # surrounding spaces
    "1_000",  # Python's digit separator
    "+7",
    "７",  # full-width digit
    "٣",  # Arabic-Indic digit
    "7.0",
    "9" * 5000,  # int() refuses it only above ~4,300 digits, with a ValueError
]


FORM_REFUSALS = {"invalid", "min_value", "max_value", "out_of_range", "required"}


@pytest.fixture(autouse=True)
def artifacts(settings, tmp_path):
    settings.ARTIFACTS_DIR = tmp_path / "artifacts"


@pytest.fixture
def queue(broker_url, clean_queues):
    """Launches at the limit publish to the test broker."""


@dataclass(frozen=True)
class LaunchForm:
    name: str
    url: str
    form_class: Callable[[], type[forms.Form]]
    data: Callable[[Path], dict]  # valid data, given the tiny model's directory
    launched: Callable[[], int]  # how many things were launched so far


def _expansion_data(model_dir) -> dict:
    from expansion.forms import RunLaunchForm

    dataset = make_dataset()
    make_problem(dataset=dataset)
    return {
        **initial_data(RunLaunchForm()),
        "name": "hostile",
        "dataset": str(dataset.pk),
        "model_path": str(model_dir),
    }


def _training_data(model_dir) -> dict:
    from training.forms import TrainingLaunchForm

    run = make_tokenized_run(model_dir, samples=1)
    # One trace makes one step: no warm-up, so the run itself is launchable.
    data = training_form_data(model_dir, [run.pk]) | {"warmup_steps": "0"}
    return initial_data(TrainingLaunchForm()) | data


def _evaluation_data(model_dir) -> dict:
    from training.evaluations.forms import EvaluationLaunchForm

    dataset = make_dataset()
    make_problem(dataset=dataset)
    return initial_data(EvaluationLaunchForm()) | evaluation_launch_data(dataset, model_dir)


def _study_data(model_dir) -> dict:
    from training.studies.forms import StudyLaunchForm

    dataset = make_dataset()
    for index in range(6):
        make_problem(dataset=dataset, statement=f"Find $x$ if $x = {index}$.", answer=str(index))
    return initial_data(StudyLaunchForm()) | {
        "name": "hostile",
        "dataset": str(dataset.pk),
        "base_model_path": str(model_dir),
        "held_out_fraction": "0.5",
        "confirm": "yes",
    }


def _launched(model_name: str) -> Callable[[], int]:
    def count() -> int:
        from django.apps import apps

        return apps.get_model(model_name).objects.count() + Job.objects.count()

    return count


def _form(path: str) -> Callable[[], type[forms.Form]]:
    def load() -> type[forms.Form]:
        module, name = path.rsplit(".", 1)
        __import__(module)
        return getattr(sys.modules[module], name)

    return load


LAUNCH_FORMS = [
    LaunchForm(
        "expansion run",
        "expansion:run_launch",
        _form("expansion.forms.RunLaunchForm"),
        _expansion_data,
        _launched("expansion.ExpansionRun"),
    ),
    LaunchForm(
        "training run",
        "training:launch",
        _form("training.forms.TrainingLaunchForm"),
        _training_data,
        _launched("training.TrainingRun"),
    ),
    LaunchForm(
        "evaluation",
        "evaluations:launch",
        _form("training.evaluations.forms.EvaluationLaunchForm"),
        _evaluation_data,
        _launched("training.Evaluation"),
    ),
    LaunchForm(
        "study",
        "studies:launch",
        _form("training.studies.forms.StudyLaunchForm"),
        _study_data,
        _launched("training.Study"),
    ),
    LaunchForm(
        "worker check",
        "jobs:launch worker_check",
        _form("dailweb.jobs.forms.WorkerCheckForm"),
        lambda model_dir: {
            "queue": "default",
            "steps": "3",
            "seconds_per_step": "0",
            "confirm": "yes",
        },
        _launched("jobs.Job"),
    ),
]


def initial_data(form: forms.Form) -> dict:
    """What the unbound form would post as shown (its initial values)."""
    data: dict = {}
    for name, field in form.fields.items():
        value = form.get_initial_for_field(field, name)
        if isinstance(field, forms.BooleanField):
            if value:
                data[name] = "on"
        elif isinstance(value, list | tuple):
            data[name] = [str(v) for v in value]
        elif value is not None and value != "":
            data[name] = str(value)
    return data


def integer_fields(form_class: type[forms.Form]) -> list[tuple[str, forms.IntegerField]]:
    return [
        (name, field)
        for name, field in form_class.base_fields.items()
        # Django's FloatField and DecimalField subclass IntegerField: not integers.
        if isinstance(field, forms.IntegerField)
        and not isinstance(field, forms.FloatField | forms.DecimalField)
    ]


def url_of(launch: LaunchForm) -> str:
    name, *args = launch.url.split()
    return reverse(name, args=args)


def bound_form(response) -> forms.Form:
    """The bound form a refused launch re-shows."""
    for context in response.context:
        for value in context.flatten().values():
            if isinstance(value, forms.Form) and value.is_bound:
                return value
            if isinstance(value, list):  # the jobs dashboard: (launcher, form, _) rows
                for row in value:
                    for item in row if isinstance(row, tuple) else ():
                        if isinstance(item, forms.Form) and item.is_bound:
                            return item
    raise AssertionError("no bound form in the response")


def cases():
    """(launch form, field name, value, at the limit?) for every integer field."""
    for launch in LAUNCH_FORMS:
        for name, field in integer_fields(launch.form_class()):
            # An unbounded field is held to what the database stores (signed 64 bits).
            low = -(2**63) if field.min_value is None else field.min_value
            high = 2**63 - 1 if field.max_value is None else field.max_value
            yield pytest.param(launch, name, str(high), True, id=f"{launch.name}-{name}-max")
            yield pytest.param(launch, name, str(low), True, id=f"{launch.name}-{name}-min")
            yield pytest.param(launch, name, str(high + 1), False, id=f"{launch.name}-{name}-max+1")
            yield pytest.param(launch, name, str(low - 1), False, id=f"{launch.name}-{name}-min-1")
            if "seed" in name:
                yield pytest.param(launch, name, str(2**64), False, id=f"{launch.name}-{name}-2^64")
            for odd in ODD_SPELLINGS:
                label = odd if len(odd) < 10 else f"{len(odd)} digits"
                yield pytest.param(launch, name, odd, False, id=f"{launch.name}-{name}-{label!r}")


def admin() -> Client:
    client = Client()
    client.force_login(make_user("admin"))
    return client


@pytest.mark.parametrize(("launch", "field", "value", "at_limit"), list(cases()))
def test_integer_fields_of_launch_forms(launch, field, value, at_limit, queue, tiny_model_path):  # noqa: F811
    data = launch.data(tiny_model_path) | {field: value}
    if launch.name == "evaluation" and field == "samples_per_problem" and at_limit:
        data["ks"] = "1"  # k may not exceed n
    if field == "micro_batch_size" and at_limit:
        data["effective_batch_size"] = value  # the micro-batch must divide it
    response = admin().post(url_of(launch), data)
    assert response.status_code != 500
    if at_limit:
        if response.status_code == 302:
            return  # launched
        # Refused by the service for another reason (a warm-up longer than the run, a length
        # nothing fits): never by the form's range or format check of this field.
        errors = bound_form(response).errors.as_data().get(field, [])
        assert not {e.code for e in errors} & FORM_REFUSALS, errors
        return
    assert response.status_code == 400, response.content.decode()[-2000:]
    errors = bound_form(response).errors
    assert field in errors, errors
    assert launch.launched() == 0


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("expansion run", "seed"),
        ("evaluation", "seed"),
        ("evaluation", "split_seed"),
        ("training run", "seed"),
    ],
)
def test_a_seed_at_its_limit_is_launched_and_stored_as_given(name, field, queue, tiny_model_path):  # noqa: F811
    from expansion.models import ExpansionRun
    from training.models import Evaluation, TrainingRun

    launch = next(launch for launch in LAUNCH_FORMS if launch.name == name)
    limit = dict(integer_fields(launch.form_class()))[field].max_value
    data = launch.data(tiny_model_path) | {field: str(limit)}
    if field == "split_seed":
        from curation.models import Dataset

        dataset = Dataset.objects.get(pk=data["dataset"])
        for _ in range(5):  # the held-out side is never empty then
            make_problem(dataset=dataset)
        data["split"] = "held_out"
        data["held_out_fraction"] = "0.99"
    response = admin().post(url_of(launch), data)
    assert response.status_code == 302, bound_form(response).errors
    if name == "expansion run":
        stored = ExpansionRun.objects.get().rollout_config["seed"]
        assert limit == 2**63 - 1
    elif name == "training run":
        stored = TrainingRun.objects.get().config["seed"]
    elif field == "seed":
        stored = Evaluation.objects.get().seed
        assert limit == 2**63 - 1
    else:
        stored = Evaluation.objects.get().split_params["seed"]
    assert stored == limit


def test_every_integer_field_of_every_form_is_strict():
    """Forms anywhere in the project: none falls back to Django's lenient IntegerField."""
    import training.evaluations.forms  # noqa: F401
    import training.forms  # noqa: F401
    import training.studies.forms  # noqa: F401

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    ours = [
        form
        for form in subclasses(forms.Form)
        if form.__module__.split(".")[0] in {"curation", "expansion", "training", "dailweb"}
    ]
    assert len(ours) >= 10
    lenient = [
        f"{form.__module__}.{form.__name__}.{name}"
        for form in ours
        for name, field in integer_fields(form)
        if not isinstance(field, StrictIntegerField)
    ]
    assert lenient == []
    unbounded = [
        f"{form.__module__}.{form.__name__}.{name}"
        for form in ours
        for name, field in integer_fields(form)
        if field.min_value is None or field.max_value is None
    ]
    assert unbounded == []
    # And the launch table above covers every launch form that has an integer field.
    launch_forms = {launch.form_class() for launch in LAUNCH_FORMS}
    from dailweb.jobs.launchers import dashboard_launchers

    for launcher in dashboard_launchers():
        if integer_fields(launcher.form_class):
            assert launcher.form_class in launch_forms, launcher.kind


@pytest.mark.parametrize(
    "url",
    [
        "jobs:launch model_prepare",
        "jobs:launch worker_check",
        "expansion:run_launch",
        "evaluations:launch",
        "training:launch",
        "studies:launch",
    ],
)
def test_an_empty_post_to_a_launch_url_launches_nothing(url, queue):
    name, *args = url.split()
    response = admin().post(reverse(name, args=args))
    assert response.status_code == 400
    assert not Job.objects.exists()


def test_the_launch_button_carries_the_confirmation(queue):
    """Only what the page's button sends launches (the confirm field rides on the button)."""
    client = admin()
    page = client.get(reverse("expansion:models")).content.decode()
    assert 'name="confirm" value="yes"' in page
    dashboard = client.get(reverse("jobs:list")).content.decode()
    assert dashboard.count('name="confirm" value="yes"') >= 2
    url = reverse("jobs:launch", args=["model_prepare"])
    refused = client.post(url, {"force": "on"})
    assert refused.status_code == 400
    assert "press the Launch button" in refused.content.decode()
    assert not Job.objects.exists()
    assert client.post(url, {"confirm": "yes"}).status_code == 302
    assert Job.objects.filter(kind="model_prepare").count() == 1


def test_reviewer_forms_refuse_numbers_past_what_is_stored():
    client = Client()
    client.force_login(make_user("reviewer"))
    trace = make_run(problems=1, samples=1, tokens=8).traces.get()
    span_url = reverse("expansion:span_add", args=[trace.pk])
    for start, end in [("0", str(2**64)), (" 1", "3"), ("1_0", "12"), ("０", "2")]:
        response = client.post(span_url, {"start_token": start, "end_token": end})
        assert response.status_code == 400, (start, end)
    assert not trace.shortcut_spans.exists()
    verdict = client.post(
        reverse("expansion:verdict", args=[trace.pk]),
        {"decision": "accepted", "base_revision": str(2**63)},
    )
    assert verdict.status_code == 400
    trace.refresh_from_db()
    assert trace.review_state == "unreviewed"
    for query in ("?run=" + "9" * 30, "?run=²", "?run=%EF%BC%91"):
        assert client.get(reverse("expansion:queue") + query).status_code == 200, query
        assert client.get(reverse("expansion:next") + query).status_code == 302, query


@pytest.mark.parametrize(
    "waypoints",
    ['[["0", 3, "expert"]]', '[[0.0, 3, "expert"]]', '[[true, 3, "expert"]]', "[[0, 1e400, 1]]"],
)
def test_waypoint_offsets_must_be_plain_whole_numbers(waypoints):
    client = Client()
    client.force_login(make_user("expert"))
    response = client.post(
        reverse("curation:editor_preview"),
        {"body": "We have $x = 3$.", "answer": "3", "waypoints": waypoints},
    )
    assert response.status_code == 400
    assert "could not be read" in response.content.decode()


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("launch_expansion", ["--rollout", '{"seed": 18446744073709551616}'], "seed must be in"),
        ("launch_expansion", ["--rollout", '{"seed": true}'], "seed must be a whole number"),
        ("launch_expansion", ["--rollout", '{"top_k": "20"}'], "top_k must be a whole number"),
        ("launch_expansion", ["--rollout", '{"seed": ' + "9" * 5000 + "}"], "not readable JSON"),
        ("launch_expansion", ["--rollout", "[" * 100_000], "not readable JSON"),
        ("launch_expansion", ["--rollout", "[1]"], "must be a JSON object"),
        ("launch_expansion", ["--limit", " 7 "], "not a whole number"),
        ("launch_expansion", ["--samples", "1_000"], "not a whole number"),
        ("launch_training", ["--runs", "１"], "not a whole number"),
        ("launch_training", ["--runs", "1", "--config", '{"seed": 2147483648}'], "seed must be in"),
        ("launch_training", ["--runs", "1", "--config", '{"epochs": "3"}'], "whole number"),
        ("launch_training", ["--runs", "1", "--config", "9" * 5000], "not readable JSON"),
    ],
)
def test_command_line_numbers_and_json_settings_are_refused_with_a_message(
    command, args, message, queue
):
    from django.core.management import CommandError, call_command

    problem = make_problem()
    if command == "launch_expansion":
        args = ["--dataset", problem.dataset.name, "--model", "/models/any", *args]
    with pytest.raises(CommandError, match=message):
        call_command(command, *args)
    assert not Job.objects.exists()
