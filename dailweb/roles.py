"""Roles: the groups `expert`, `reviewer` and `admin` (created by a data migration), and the
server-side check every view goes through.

Every view is wrapped in `require_role(...)` or `require_login`, which also records on the
view which roles may use it; the URL-matrix test reads that record, so a view added later
without a declared role fails the test suite.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Iterable

from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse


class Role(enum.StrEnum):
    EXPERT = "expert"
    REVIEWER = "reviewer"
    ADMIN = "admin"


ALL_ROLES: tuple[Role, ...] = (Role.EXPERT, Role.REVIEWER, Role.ADMIN)
ANY_AUTHENTICATED = "any-authenticated"

ROLE_DESCRIPTIONS = {
    Role.EXPERT: "Enters problems and expert solutions, marks waypoints, imports and exports.",
    Role.REVIEWER: "Audits expanded traces token by token and records verdicts.",
    Role.ADMIN: "Launches and watches expansion, training and evaluation jobs; manages users.",
}


def user_roles(user) -> frozenset[Role]:
    """The roles of `user`; superusers hold every role. Cached on the user object."""
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return frozenset()
    cached = getattr(user, "_dail_roles", None)
    if cached is not None:
        return cached
    if user.is_superuser:
        roles = frozenset(ALL_ROLES)
    else:
        names = set(user.groups.values_list("name", flat=True))
        roles = frozenset(role for role in ALL_ROLES if role.value in names)
    user._dail_roles = roles
    return roles


def has_role(user, *roles: Role) -> bool:
    return bool(user_roles(user) & set(roles))


ViewFunc = Callable[..., HttpResponse]


def require_role(*roles: Role) -> Callable[[ViewFunc], ViewFunc]:
    """Only users holding one of `roles` may use the view: anonymous users are sent to the
    login page, others without the role get the 403 page."""
    allowed = frozenset(roles)
    if not allowed or not allowed <= set(ALL_ROLES):
        raise ValueError(f"require_role needs roles from {ALL_ROLES}")

    def decorator(view: ViewFunc) -> ViewFunc:
        @functools.wraps(view)
        def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not user_roles(request.user) & allowed:
                raise PermissionDenied(
                    "This page is for "
                    + " or ".join(sorted(role.value + "s" for role in allowed))
                    + "."
                )
            return view(request, *args, **kwargs)

        wrapped.allowed_roles = allowed  # type: ignore[attr-defined]
        return wrapped

    return decorator


def require_login(view: ViewFunc) -> ViewFunc:
    """Any signed-in user may use the view (it shows each role its own part)."""

    @functools.wraps(view)
    def wrapped(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        if not request.user.is_authenticated:
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    wrapped.allowed_roles = ANY_AUTHENTICATED  # type: ignore[attr-defined]
    return wrapped


def roles_context(request: HttpRequest) -> dict:
    """Template context: `roles` (set of role names) and `is_expert` / `is_reviewer` /
    `is_admin` flags for navigation."""
    roles = user_roles(getattr(request, "user", None))
    return {
        "roles": {role.value for role in roles},
        "is_expert": Role.EXPERT in roles,
        "is_reviewer": Role.REVIEWER in roles,
        "is_admin": Role.ADMIN in roles,
    }


def role_names(roles: Iterable[Role]) -> list[str]:
    return sorted(role.value for role in roles)
