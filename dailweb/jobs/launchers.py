"""Launch services for the job kinds that the dashboard offers directly.

Each entry pairs a form (validation) with a service (the launch). Apps add their own
(`register_dashboard_launcher`) in `AppConfig.ready()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django import forms

from dailweb.jobs.builtin_kinds import worker_check_params
from dailweb.jobs.forms import LaunchForm, WorkerCheckForm
from dailweb.jobs.models import Job
from dailweb.jobs.services import job_launch


@dataclass(frozen=True)
class DashboardLauncher:
    kind: str
    label: str
    description: str
    form_class: type[forms.Form]
    launch: Callable[..., Job]  # launch(launched_by=user, **form.cleaned_data) -> Job


_LAUNCHERS: dict[str, DashboardLauncher] = {}


def register_dashboard_launcher(launcher: DashboardLauncher) -> None:
    if not issubclass(launcher.form_class, LaunchForm):
        raise TypeError(f"{launcher.kind}: a launcher's form must be a LaunchForm (confirmation)")
    _LAUNCHERS[launcher.kind] = launcher


def dashboard_launchers() -> list[DashboardLauncher]:
    return list(_LAUNCHERS.values())


def dashboard_launcher(kind: str) -> DashboardLauncher | None:
    return _LAUNCHERS.get(kind)


def worker_check_launch(*, launched_by, queue: str, steps: int, seconds_per_step: float) -> Job:
    params = worker_check_params(steps=steps, seconds_per_step=seconds_per_step)
    return job_launch(
        kind="worker_check",
        launched_by=launched_by,
        params=params,
        queue=queue,
        title=f"Worker check on '{queue}' ({steps} steps)",
    )


register_dashboard_launcher(
    DashboardLauncher(
        kind="worker_check",
        label="Worker check",
        description="Counts to N on a queue: proves a worker listens there, and lets you try "
        "progress, cancel and retry.",
        form_class=WorkerCheckForm,
        launch=worker_check_launch,
    )
)
