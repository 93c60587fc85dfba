"""Create one demo user per role and print their passwords."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand

from dailweb.services import demo_users_ensure

CREDENTIALS_FILE = "demo-credentials.txt"


class Command(BaseCommand):
    help = "Create the demo users expert, reviewer and admin (idempotent) and print passwords."

    def add_arguments(self, parser):
        parser.add_argument(
            "--reset", action="store_true", help="Give existing demo users new passwords."
        )

    def handle(self, *args, reset: bool = False, **options):
        users = demo_users_ensure(reset_passwords=reset)
        path = settings.DATA_DIR / CREDENTIALS_FILE
        known: dict[str, str] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                name, _, password = line.partition(" ")
                known[name] = password
        for user in users:
            if user.password:
                known[user.username] = user.password
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{name} {pw}\n" for name, pw in sorted(known.items())))
        path.chmod(0o600)
        self.stdout.write("Demo users (role = username):")
        for user in users:
            password = user.password or known.get(user.username, "(unchanged, not recorded)")
            self.stdout.write(f"  {user.username:<9} password: {password}")
        self.stdout.write(
            f"Passwords are kept in {path} (mode 600). Change one with "
            "`.venv/bin/python manage.py changepassword NAME`, or give all new ones with "
            "`manage.py demo_users --reset`."
        )
