"""The one domain error type services raise; views map it to form errors or 4xx responses."""

from __future__ import annotations


class DomainError(Exception):
    """A request that cannot be carried out, with a message meant for the person who asked.

    `field_errors` maps form field names to messages when the error belongs to specific input.
    `status` is the HTTP status a view should answer with (400 bad input, 403 not theirs to
    change, 409 conflict, 503 a service such as the job queue is unreachable).
    """

    status = 400

    def __init__(self, message: str, *, field_errors: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field_errors = field_errors or {}


class ForbiddenError(DomainError):
    """The person asking may not do this to this object (their role allows the page)."""

    status = 403


class ConflictError(DomainError):
    status = 409


class ServiceUnavailableError(DomainError):
    status = 503


def add_to_form(form, error: DomainError) -> None:
    """Show a service's refusal on the form: the message on top, field messages beside the
    fields they name (unless the form already marks that field)."""
    form.add_error(None, error.message)
    for name, message in error.field_errors.items():
        if name in form.fields and name not in form.errors:
            form.add_error(name, message)
