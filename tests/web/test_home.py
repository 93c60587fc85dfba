"""The home page shows each role what it can do."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.factories import make_user


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("role", "shown", "hidden"),
    [
        ("expert", ["Enters problems"], ["Jobs dashboard", "Audits expanded traces"]),
        ("reviewer", ["Audits expanded traces"], ["Jobs dashboard", "Enters problems"]),
        ("admin", ["Jobs dashboard", "Users and roles"], ["Enters problems"]),
    ],
)
def test_home_by_role(client, role, shown, hidden):
    client.force_login(make_user(role))
    body = client.get(reverse("home")).content.decode()
    for text in shown:
        assert text in body
    for text in hidden:
        assert text not in body


@pytest.mark.django_db
def test_user_without_role_is_told_so(client):
    client.force_login(make_user(None))
    assert "has no role yet" in client.get(reverse("home")).content.decode()


@pytest.mark.django_db
def test_login_and_logout(client):
    make_user("reviewer", username="rita", password="s3cret-pass")
    response = client.post(reverse("login"), {"username": "rita", "password": "s3cret-pass"})
    assert response.status_code == 302 and response["Location"] == reverse("home")
    assert "rita" in client.get(reverse("home")).content.decode()
    client.post(reverse("logout"))
    assert client.get(reverse("home")).status_code == 302


@pytest.mark.django_db
def test_wrong_password_is_refused(client):
    make_user("expert", username="ed", password="right-pass")
    response = client.post(reverse("login"), {"username": "ed", "password": "wrong"})
    assert response.status_code == 200
    assert "didn't match" in response.content.decode()
