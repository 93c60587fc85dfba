"""Login throttling: the two hooks django-axes calls (configured in settings, "Login throttling").

Axes counts failed logins per username and per client address and refuses logins for either
once it reaches `AXES_FAILURE_LIMIT`; this module only tells axes who the client is and shows
the person who is locked out a page that says why, for how long, and who can unlock it.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime

from axes.helpers import get_client_username, get_cool_off
from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Max, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone


def _valid_address(value: str | None) -> str | None:
    try:
        return str(ipaddress.ip_address((value or "").strip()))
    except ValueError:
        return None


def client_ip_address(request: HttpRequest) -> str | None:
    """The address of the client: REMOTE_ADDR, or with `DAIL_TRUSTED_PROXIES` = N reverse
    proxies in front of the server, the address the outermost of them saw.

    Each proxy appends the address it was connected from to X-Forwarded-For, so the N-th entry
    from the right was written by the outermost trusted proxy; entries further left come from
    the client and may be forged. A value that is not an address falls back to REMOTE_ADDR.
    """
    remote = request.META.get("REMOTE_ADDR")
    proxies = settings.TRUSTED_PROXIES
    if not proxies:
        return remote
    forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    forwarded = [part for part in forwarded if part]
    if not forwarded:
        return remote
    return _valid_address(forwarded[-min(proxies, len(forwarded))]) or remote


def _locked_until(username: str | None, address: str | None) -> datetime | None:
    """When the lockout ends at the latest: the cool-off after the last counted failure."""
    cool_off = get_cool_off()
    if cool_off is None:
        return None
    last = (
        AccessAttempt.objects.filter(attempt_time__gt=timezone.now() - cool_off)
        .filter(Q(username=username) | Q(ip_address=address))
        .aggregate(last=Max("attempt_time"))["last"]
    )
    return (last or timezone.now()) + cool_off


def _failures(**filters) -> int:
    cool_off = get_cool_off()
    attempts = AccessAttempt.objects.filter(**filters)
    if cool_off is not None:
        attempts = attempts.filter(attempt_time__gt=timezone.now() - cool_off)
    return attempts.aggregate(total=Sum("failures_since_start"))["total"] or 0


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None, credentials: dict | None
) -> HttpResponse:
    """The page shown instead of the login form's answer while a login is locked out."""
    username = get_client_username(request, credentials)
    address = getattr(request, "axes_ip_address", None)
    limit = settings.AXES_FAILURE_LIMIT
    context = {
        "locked_username": username,
        "username_locked": bool(username) and _failures(username=username) >= limit,
        "address_locked": bool(address) and _failures(ip_address=address) >= limit,
        "failure_limit": limit,
        "locked_until": _locked_until(username, address),
        "cool_off_minutes": settings.LOGIN_COOLOFF_MINUTES,
    }
    return render(
        request,
        "registration/locked_out.html",
        context,
        status=settings.AXES_HTTP_RESPONSE_CODE,
    )
