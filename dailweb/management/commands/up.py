"""Run the whole workbench on one machine: database, demo users, embedded model, broker,
workers and web server. `./dev up` calls this after installing.

With no configuration it uses SQLite and an embedded Redis (no server installed by hand);
with DATABASE_URL / CELERY_BROKER_URL set it uses those instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from dailweb.embedded_redis import EmbeddedRedis, EmbeddedRedisError


def worker_commands(python: str) -> dict[str, list[str]]:
    """The worker processes of a one-machine install (docker/compose.yml runs the same)."""
    celery = [python, "-m", "celery", "-A", "dailweb", "worker", "--loglevel", "INFO"]
    return {
        # One GPU job at a time, in a fresh process each time (frees the model's memory).
        "worker-gpu": celery
        + ["-Q", "gpu", "-c", "1", "-n", "gpu@%h", "--max-tasks-per-child", "1"],
        # Everything else, plus the periodic check for jobs whose worker died (-B: beat).
        "worker-default": celery
        + [
            "-Q",
            "default",
            "-c",
            "1",
            "-n",
            "default@%h",
            "-B",
            "-s",
            str(settings.RUN_DIR / "celerybeat-schedule"),
        ],
    }


def web_command(python: str, host: str, port: int) -> list[str]:
    return [
        python, "-m", "gunicorn", "dailweb.wsgi",
        "--bind", f"{host}:{port}", "--workers", "2", "--threads", "4",
        "--access-logfile", "-", "--timeout", "120",
    ]  # fmt: skip


class Command(BaseCommand):
    help = "Migrate, create demo users, prepare the model, start broker + workers + web server."

    def add_arguments(self, parser):
        parser.add_argument("--host", default=os.environ.get("DAIL_HOST", "127.0.0.1"))
        parser.add_argument("--port", type=int, default=int(os.environ.get("DAIL_PORT", "8000")))
        parser.add_argument(
            "--skip-model", action="store_true", help="Do not prepare the embedded model now."
        )
        parser.add_argument(
            "--smoke-test",
            action="store_true",
            help="Start everything, check the web server and both workers answer, then stop.",
        )

    def handle(self, *args, host, port, skip_model, smoke_test, **options):
        out = self.stdout
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        settings.RUN_DIR.mkdir(parents=True, exist_ok=True)
        log_dir = settings.DATA_DIR / "logs"
        log_dir.mkdir(exist_ok=True)
        engine = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        out.write(f"Database: {engine} · broker: {self._broker_label()}")
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)
        call_command("demo_users", stdout=self.stdout)
        self._load_champ_once()
        if not skip_model:
            call_command("prepare_model", stdout=self.stdout)

        broker: EmbeddedRedis | None = None
        children: dict[str, subprocess.Popen] = {}
        try:
            if settings.USES_EMBEDDED_BROKER:
                try:
                    broker = EmbeddedRedis(
                        settings.EMBEDDED_REDIS_SOCKET, settings.DATA_DIR / "redis"
                    ).start()
                except EmbeddedRedisError as exc:
                    raise CommandError(str(exc)) from exc
            python = sys.executable
            commands = {**worker_commands(python), "web": web_command(python, host, port)}
            for name, command in commands.items():
                log_file = (log_dir / f"{name}.log").open("ab")
                children[name] = subprocess.Popen(
                    command,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=settings.BASE_DIR,
                    start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
                )
            url = f"http://{'localhost' if host in {'127.0.0.1', '0.0.0.0'} else host}:{port}/"
            self._wait_ready(url, children)
            out.write(self.style.SUCCESS(f"\nThe DAIL workbench is running at {url}"))
            out.write(f"Logs: {log_dir}/(web|worker-gpu|worker-default).log · Ctrl-C stops it.")
            if smoke_test:
                out.write("Smoke test passed: web server and both workers answered.")
                return
            self._supervise(children)
        finally:
            self._stop(children)
            if broker is not None:
                broker.stop()

    def _load_champ_once(self) -> None:
        """A new user starts among real problems: CHAMP is loaded on the first run."""
        from curation.models import Dataset

        if not Dataset.objects.filter(name=settings.CHAMP_DATASET_NAME).exists():
            call_command("load_champ", dataset=settings.CHAMP_DATASET_NAME, stdout=self.stdout)

    def _broker_label(self) -> str:
        if settings.USES_EMBEDDED_BROKER:
            return f"embedded Redis on {settings.EMBEDDED_REDIS_SOCKET}"
        from dailweb.jobs.services import broker_display_url

        return broker_display_url()

    def _wait_ready(self, url: str, children: dict[str, subprocess.Popen]) -> None:
        from dailweb.celery import app

        deadline = time.monotonic() + 120
        web_ok = False
        workers_ok: set[str] = set()
        while time.monotonic() < deadline:
            for name, child in children.items():
                if child.poll() is not None:
                    raise CommandError(
                        f"{name} exited with code {child.returncode}; see "
                        f"{settings.DATA_DIR / 'logs' / (name + '.log')}"
                    )
            if not web_ok:
                try:
                    with urllib.request.urlopen(url + "accounts/login/", timeout=2) as response:
                        web_ok = response.status == 200
                except OSError:
                    pass
            if len(workers_ok) < 2:
                for reply in app.control.ping(timeout=1.0) or []:
                    for node in reply:
                        workers_ok.add(node.split("@", 1)[0])
            if web_ok and {"gpu", "default"} <= workers_ok:
                return
            time.sleep(0.5)
        raise CommandError(
            f"Not ready after 120 s (web: {web_ok}, workers: {sorted(workers_ok)}); see the logs."
        )

    def _supervise(self, children: dict[str, subprocess.Popen]) -> None:
        stop = {"now": False}

        def request_stop(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        while not stop["now"]:
            for name, child in children.items():
                if child.poll() is not None:
                    raise CommandError(
                        f"{name} exited with code {child.returncode}; stopping. See "
                        f"{settings.DATA_DIR / 'logs' / (name + '.log')}"
                    )
            time.sleep(0.5)
        self.stdout.write("\nStopping…")

    def _stop(self, children: dict[str, subprocess.Popen]) -> None:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for child in children.values():
            remaining = max(0.1, deadline - time.monotonic())
            try:
                child.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
