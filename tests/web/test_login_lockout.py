"""Login throttling (django-axes): after the configured number of failures a username, and a
client address, are locked out, with a page that says so; the cool-off and an admin lift it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.conf import settings
from django.core.management import call_command
from django.test import Client, RequestFactory
from django.urls import reverse

from dailweb.login_lockout import client_ip_address
from dailweb.roles import Role
from dailweb.services import user_create_with_role
from tests.factories import make_user

pytestmark = pytest.mark.django_db

LIMIT = settings.AXES_FAILURE_LIMIT


def log_in(client: Client, username: str, password: str, address: str = "10.0.0.1"):
    return client.post(
        reverse("login"), {"username": username, "password": password}, REMOTE_ADDR=address
    )


def is_logged_in(client: Client) -> bool:
    return client.get(reverse("home")).status_code == 200


def assert_locked(response, *, username: str | None = None) -> None:
    body = response.content.decode()
    assert response.status_code == 429, body
    assert "Login locked" in body and "Too many failed logins" in body
    assert "An admin can unlock it" in body and "axes_reset_username" in body
    assert f"{settings.LOGIN_COOLOFF_MINUTES} minutes after the last failed attempt" in body
    if username:
        assert f"<strong>{username}</strong>" in body


def test_the_limit_is_configured_and_small():
    assert 1 <= LIMIT <= 10
    assert settings.AXES_LOCKOUT_PARAMETERS == ["username", "ip_address"]


def test_wrong_passwords_lock_the_username_and_the_right_one_is_then_refused():
    make_user("expert", username="ann", password="right-pass")
    client = Client()
    for _ in range(LIMIT - 1):
        response = log_in(client, "ann", "wrong")
        assert response.status_code == 200 and "didn't match" in response.content.decode()
    assert_locked(log_in(client, "ann", "wrong"), username="ann")

    refused = log_in(client, "ann", "right-pass")
    assert_locked(refused, username="ann")
    assert not is_logged_in(client)
    # From another address too: the username itself is locked.
    assert_locked(log_in(Client(), "ann", "right-pass", address="10.9.9.9"), username="ann")


def test_failures_for_one_username_spread_over_addresses_lock_it():
    make_user("expert", username="ann", password="right-pass")
    make_user("expert", username="bob", password="bob-pass")
    for i in range(LIMIT):
        log_in(Client(), "ann", "wrong", address=f"10.0.1.{i}")
    assert_locked(log_in(Client(), "ann", "right-pass", address="10.0.2.1"))
    # Each of those addresses saw one failure only: another user logs in from them.
    other = Client()
    assert log_in(other, "bob", "bob-pass", address="10.0.1.0").status_code == 302
    assert is_logged_in(other)


def test_failures_from_one_address_across_usernames_lock_the_address():
    make_user("expert", username="carl", password="carl-pass")
    for i in range(LIMIT):
        log_in(Client(), f"guess{i}", "wrong", address="10.0.3.3")
    response = log_in(Client(), "carl", "carl-pass", address="10.0.3.3")
    assert_locked(response)
    assert "from your address" in response.content.decode()
    # The same user from elsewhere is not affected: carl's own username has no failures.
    elsewhere = Client()
    assert log_in(elsewhere, "carl", "carl-pass", address="10.0.4.4").status_code == 302
    assert is_logged_in(elsewhere)


def test_other_users_elsewhere_are_unaffected():
    make_user("expert", username="ann", password="right-pass")
    make_user("reviewer", username="rita", password="rita-pass")
    for _ in range(LIMIT):
        log_in(Client(), "ann", "wrong", address="10.0.5.5")
    client = Client()
    assert log_in(client, "rita", "rita-pass", address="10.0.6.6").status_code == 302
    assert is_logged_in(client)


def test_attempts_during_the_lockout_do_not_extend_it_and_the_cool_off_ends_it():
    make_user("expert", username="ann", password="right-pass")
    for _ in range(LIMIT):
        log_in(Client(), "ann", "wrong")
    attempt = AccessAttempt.objects.get(username="ann")
    assert attempt.failures_since_start == LIMIT
    log_in(Client(), "ann", "wrong")
    log_in(Client(), "ann", "right-pass")
    assert AccessAttempt.objects.get(username="ann").failures_since_start == LIMIT

    cool_off = timedelta(minutes=settings.LOGIN_COOLOFF_MINUTES)
    AccessAttempt.objects.filter(pk=attempt.pk).update(
        attempt_time=attempt.attempt_time - cool_off - timedelta(seconds=1)
    )
    client = Client()
    assert log_in(client, "ann", "right-pass").status_code == 302
    assert is_logged_in(client)


def test_admin_command_unlocks_a_username():
    make_user("expert", username="ann", password="right-pass")
    for i in range(LIMIT):
        log_in(Client(), "ann", "wrong", address=f"10.0.7.{i}")
    assert_locked(log_in(Client(), "ann", "right-pass", address="10.0.8.8"))

    call_command("axes_reset_username", "ann")
    client = Client()
    assert log_in(client, "ann", "right-pass", address="10.0.8.8").status_code == 302
    assert is_logged_in(client)


def test_admin_unlocks_in_django_admin():
    make_user("expert", username="ann", password="right-pass")
    for _ in range(LIMIT):
        log_in(Client(), "ann", "wrong", address="10.0.9.9")
    assert_locked(log_in(Client(), "ann", "right-pass", address="10.0.9.9"))

    admin = Client()
    admin.force_login(user_create_with_role(username="boss", role=Role.ADMIN, password="pw-1"))
    listing = admin.get("/admin/axes/accessattempt/")
    assert listing.status_code == 200 and "ann" in listing.content.decode()
    attempt = AccessAttempt.objects.get(username="ann")
    deleted = admin.post(f"/admin/axes/accessattempt/{attempt.pk}/delete/", {"post": "yes"})
    assert deleted.status_code == 302
    client = Client()
    assert log_in(client, "ann", "right-pass", address="10.0.9.9").status_code == 302
    assert is_logged_in(client)


def test_django_admin_login_is_throttled_too():
    make_user("admin", username="root", password="root-pass")
    client = Client()
    for _ in range(LIMIT):
        client.post(
            "/admin/login/", {"username": "root", "password": "wrong"}, REMOTE_ADDR="10.1.1.1"
        )
    assert_locked(log_in(Client(), "root", "root-pass", address="10.2.2.2"), username="root")


def test_lockout_message_escapes_the_posted_username():
    for _ in range(LIMIT):
        response = log_in(Client(), "<b>x</b>", "wrong", address="10.3.3.3")
    assert_locked(response)
    assert "<b>x</b>" not in response.content.decode()
    assert "&lt;b&gt;x&lt;/b&gt;" in response.content.decode()


@pytest.mark.parametrize(
    ("proxies", "forwarded", "remote", "expected"),
    [
        (0, "1.1.1.1", "10.0.0.9", "10.0.0.9"),  # no proxy: the header is the client's lie
        (1, "6.6.6.6, 2.2.2.2", "10.0.0.9", "2.2.2.2"),  # the proxy appended the real address
        (2, "6.6.6.6, 3.3.3.3, 10.0.0.7", "10.0.0.9", "3.3.3.3"),
        (2, "4.4.4.4", "10.0.0.9", "4.4.4.4"),  # fewer entries than proxies: all from proxies
        (1, "", "10.0.0.9", "10.0.0.9"),
        (1, "not-an-address", "10.0.0.9", "10.0.0.9"),
    ],
)
def test_client_address(settings, proxies, forwarded, remote, expected):
    settings.TRUSTED_PROXIES = proxies
    request = RequestFactory().get("/", REMOTE_ADDR=remote, HTTP_X_FORWARDED_FOR=forwarded)
    assert client_ip_address(request) == expected


def test_behind_a_proxy_a_forged_header_does_not_escape_the_address_lock(settings):
    settings.TRUSTED_PROXIES = 1
    make_user("expert", username="dora", password="dora-pass")
    for i in range(LIMIT):
        Client().post(
            reverse("login"),
            {"username": f"guess{i}", "password": "wrong"},
            REMOTE_ADDR="10.0.0.1",  # the proxy
            HTTP_X_FORWARDED_FOR=f"9.9.9.{i}, 5.5.5.5",
        )
    response = Client().post(
        reverse("login"),
        {"username": "dora", "password": "dora-pass"},
        REMOTE_ADDR="10.0.0.1",
        HTTP_X_FORWARDED_FOR="8.8.8.8, 5.5.5.5",
    )
    assert_locked(response)
