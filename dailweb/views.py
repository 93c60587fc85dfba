"""Project-wide pages: the home page that shows each role what it can do, and error pages."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from dailweb.jobs.selectors import job_list_recent
from dailweb.roles import ROLE_DESCRIPTIONS, Role, require_login, user_roles


@require_login
def home(request: HttpRequest) -> HttpResponse:
    roles = user_roles(request.user)
    context = {
        "role_cards": [(role, ROLE_DESCRIPTIONS[role]) for role in Role if role in roles],
        "recent_jobs": job_list_recent(limit=5) if Role.ADMIN in roles else [],
    }
    return render(request, "home.html", context)


def permission_denied(request: HttpRequest, exception=None) -> HttpResponse:
    message = str(exception) if exception and str(exception) else ""
    template = "403_partial.html" if getattr(request, "htmx", False) else "403.html"
    return render(request, template, {"message": message}, status=403)
