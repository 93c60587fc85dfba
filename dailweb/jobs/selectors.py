"""Reads on jobs."""

from __future__ import annotations

from django.db.models import QuerySet

from dailweb.jobs.models import ACTIVE_STATES, Job


def job_queryset() -> QuerySet[Job]:
    return Job.objects.select_related("launched_by").defer("log", "result")


def job_list(*, state: str = "", kind: str = "") -> QuerySet[Job]:
    jobs = job_queryset()
    if state:
        jobs = jobs.filter(state=state)
    if kind:
        jobs = jobs.filter(kind=kind)
    return jobs


def job_list_recent(*, limit: int = 5) -> list[Job]:
    return list(job_queryset()[:limit])


def job_any_active(jobs) -> bool:
    return any(job.state in ACTIVE_STATES for job in jobs)


def job_get(*, job_id: int) -> Job:
    return Job.objects.select_related("launched_by").get(pk=job_id)
