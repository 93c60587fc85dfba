"""Writes that belong to the project as a whole: users and their roles."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.db import transaction

from dailweb.roles import Role

DEMO_USERS = (
    ("expert", Role.EXPERT),
    ("reviewer", Role.REVIEWER),
    ("admin", Role.ADMIN),
)


@dataclass(frozen=True)
class DemoUser:
    username: str
    role: Role
    password: str | None  # None when the user existed already (password left unchanged)


@transaction.atomic
def user_create_with_role(*, username: str, role: Role, password: str) -> object:
    """Create a user holding `role`; admins are also staff + superuser (Django admin)."""
    User = get_user_model()
    user = User.objects.create_user(username=username, password=password)
    user.groups.add(Group.objects.get(name=role.value))
    if role == Role.ADMIN:
        user.is_staff = True
        user.is_superuser = True
        user.save(update_fields=["is_staff", "is_superuser"])
    return user


def demo_users_ensure(*, reset_passwords: bool = False) -> list[DemoUser]:
    """Make sure one demo user per role exists; new users (or reset ones) get a random
    password, which is returned so it can be shown once."""
    User = get_user_model()
    result: list[DemoUser] = []
    for username, role in DEMO_USERS:
        user = User.objects.filter(username=username).first()
        if user is None:
            password = secrets.token_urlsafe(9)
            user_create_with_role(username=username, role=role, password=password)
            result.append(DemoUser(username, role, password))
        elif reset_passwords:
            password = secrets.token_urlsafe(9)
            user.set_password(password)
            user.save(update_fields=["password"])
            result.append(DemoUser(username, role, password))
        else:
            result.append(DemoUser(username, role, None))
    return result
