"""Model pages (base models; trained adapters join them with the training issue)."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from dailweb.roles import Role, require_role
from expansion.services import embedded_model_status


@require_role(Role.ADMIN)
def model_list(request: HttpRequest) -> HttpResponse:
    return render(request, "expansion/model_list.html", {"embedded": embedded_model_status()})
