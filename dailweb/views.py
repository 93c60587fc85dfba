"""Project-wide pages: the home page that shows each role what it can do, and error pages."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.templatetags.static import static
from django.views.decorators.http import require_GET

from dailweb.jobs.health import system_health
from dailweb.jobs.selectors import job_list_recent
from dailweb.roles import ROLE_DESCRIPTIONS, Role, require_login, user_roles


@require_login
def home(request: HttpRequest) -> HttpResponse:
    roles = user_roles(request.user)
    context = {
        "role_cards": [(role, ROLE_DESCRIPTIONS[role]) for role in Role if role in roles],
        "recent_jobs": job_list_recent(limit=5) if Role.ADMIN in roles else [],
        # Admins see whether the broker answers and which queues have a worker.
        "health": system_health() if Role.ADMIN in roles else None,
    }
    return render(request, "home.html", context)


@require_GET
def favicon(request: HttpRequest) -> HttpResponse:
    """`/favicon.ico`, which browsers fetch on their own (before anyone logs in: public)."""
    return redirect(static("img/favicon.svg"))


def permission_denied(request: HttpRequest, exception=None) -> HttpResponse:
    message = str(exception) if exception and str(exception) else ""
    template = "403_partial.html" if getattr(request, "htmx", False) else "403.html"
    return render(request, template, {"message": message}, status=403)
