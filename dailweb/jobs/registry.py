"""Job kinds: what a job of each kind runs, on which queue.

Apps register their kinds in `AppConfig.ready()`; a worker imports the apps, so it knows every
handler. A handler is a plain function `handler(ctx: JobContext) -> dict | None` that calls one
service; what it returns is stored as the job's result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dailweb.errors import DomainError

if TYPE_CHECKING:
    from dailweb.jobs.runner import JobContext

QUEUES = ("default", "gpu")

JobHandler = Callable[["JobContext"], "dict[str, Any] | None"]


@dataclass(frozen=True)
class JobKind:
    name: str
    label: str
    queue: str
    handler: JobHandler
    description: str = ""
    progress_unit: str = "steps"

    def __post_init__(self) -> None:
        if self.queue not in QUEUES:
            raise ValueError(f"job kind {self.name!r}: queue must be one of {QUEUES}")


_KINDS: dict[str, JobKind] = {}


def register_job_kind(kind: JobKind) -> JobKind:
    existing = _KINDS.get(kind.name)
    if existing is not None and existing.handler is not kind.handler:
        raise ValueError(f"job kind {kind.name!r} is registered twice")
    _KINDS[kind.name] = kind
    return kind


def job_kind(name: str) -> JobKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise DomainError(f"Unknown job kind {name!r}.") from None


def job_kinds() -> list[JobKind]:
    return sorted(_KINDS.values(), key=lambda kind: kind.label)
