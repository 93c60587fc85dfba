"""Run the whole workbench on one machine: database, demo users, embedded model, broker,
workers and web server. `./dev up` calls this after installing.

With no configuration it uses SQLite and an embedded Redis (no server installed by hand);
with DATABASE_URL / CELERY_BROKER_URL set it uses those instead.

Everything it starts is supervised (`Supervisor`): a child that dies is reaped, reported with
its exit code or signal, and restarted after a growing pause (1, 2, 4 … s); a child that dies
`MAX_FAILURES` times within `FAILURE_WINDOW_SECONDS` stops everything, naming its log.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

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


MAX_FAILURES = 5
FAILURE_WINDOW_SECONDS = 60.0
MAX_RESTART_DELAY_SECONDS = 30.0


class SupervisionError(Exception):
    """A child kept dying: everything is stopped; the message names the log to read."""


def exit_reason(returncode: int) -> str:
    """'exit code 3' or 'killed by SIGKILL' for a Popen return code."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def restart_delay(failures: int, max_delay: float = MAX_RESTART_DELAY_SECONDS) -> float:
    """Seconds to wait before restarting a child that failed `failures` times recently."""
    return min(2.0 ** (failures - 1), max_delay)


@dataclass
class SupervisedChild:
    name: str
    log_path: Path
    spawn: Callable[[], subprocess.Popen]
    process: subprocess.Popen | None = None
    failures: deque[float] = field(default_factory=deque)
    restart_at: float | None = None


class Supervisor:
    """Starts children, reaps and restarts those that die, and gives up on a crash loop."""

    def __init__(
        self,
        write: Callable[[str], None],
        *,
        max_failures: int = MAX_FAILURES,
        window: float = FAILURE_WINDOW_SECONDS,
        max_delay: float = MAX_RESTART_DELAY_SECONDS,
    ) -> None:
        self.write = write
        self.max_failures = max_failures
        self.window = window
        self.max_delay = max_delay
        self.children: dict[str, SupervisedChild] = {}

    def start(
        self,
        name: str,
        log_path: Path,
        spawn: Callable[[], subprocess.Popen],
        process: subprocess.Popen | None = None,
    ) -> None:
        """Start `name` with `spawn()` (or adopt its already started `process`)."""
        child = SupervisedChild(name, log_path, spawn, process=process or spawn())
        self.children[name] = child
        self.write(f"{name}: started (pid {child.process.pid}) · log {log_path}")

    def check(self) -> None:
        """Reap dead children and restart those whose pause is over; raise SupervisionError
        when one died `max_failures` times within `window` seconds."""
        now = time.monotonic()
        for child in self.children.values():
            if child.process is not None and child.process.poll() is not None:
                self._died(child, now)
            if child.process is None and child.restart_at is not None and now >= child.restart_at:
                child.restart_at = None
                try:
                    child.process = child.spawn()
                except Exception as exc:  # e.g. the broker socket is taken: counts as a failure
                    self.write(f"{child.name}: could not restart ({exc})")
                    self._failed(child, now, str(exc))
                    continue
                self.write(f"{child.name}: restarted (pid {child.process.pid})")

    def _died(self, child: SupervisedChild, now: float) -> None:
        assert child.process is not None
        pid, reason = child.process.pid, exit_reason(child.process.returncode)
        child.process = None
        self._failed(child, now, reason, pid)

    def _failed(self, child: SupervisedChild, now: float, reason: str, pid: int | None = None):
        child.failures.append(now)
        while child.failures and child.failures[0] < now - self.window:
            child.failures.popleft()
        which = f"{child.name} (pid {pid})" if pid else child.name
        if len(child.failures) >= self.max_failures:
            raise SupervisionError(
                f"{which} stopped ({reason}) {len(child.failures)} times within "
                f"{self.window:g} s; stopping everything. Read {child.log_path} for the cause."
            )
        delay = restart_delay(len(child.failures), self.max_delay)
        child.restart_at = now + delay
        self.write(
            f"{which} stopped unexpectedly ({reason}); restarting in {delay:g} s. "
            f"Log: {child.log_path}"
        )

    def alive(self, name: str) -> bool:
        process = self.children[name].process
        return process is not None and process.poll() is None

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM every child and reap it; the first one started (the broker) goes last, so
        that workers shut down cleanly while it still answers."""
        processes = [c.process for c in self.children.values() if c.process]
        for group in (processes[1:], processes[:1]):
            for process in group:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for process in group:
                try:
                    process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        for child in self.children.values():
            child.process = None


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

        supervisor = Supervisor(out.write)
        # Until the supervision loop takes over, SIGTERM stops like Ctrl-C: children are reaped.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            if settings.USES_EMBEDDED_BROKER:
                broker = EmbeddedRedis(settings.EMBEDDED_REDIS_SOCKET, settings.DATA_DIR / "redis")
                try:
                    broker.start()  # the first start must work: workers need it at once
                except EmbeddedRedisError as exc:
                    raise CommandError(str(exc)) from exc
                supervisor.start("redis", broker.log_path, broker.spawn, broker.process)
            python = sys.executable
            commands = {**worker_commands(python), "web": web_command(python, host, port)}
            for name, command in commands.items():
                log_path = log_dir / f"{name}.log"
                supervisor.start(name, log_path, _spawner(command, log_path))
            url = f"http://{'localhost' if host in {'127.0.0.1', '0.0.0.0'} else host}:{port}/"
            self._wait_ready(url, supervisor)
            out.write(self.style.SUCCESS(f"\nThe DAIL workbench is running at {url}"))
            out.write(f"Logs: {log_dir}/(web|worker-gpu|worker-default).log · Ctrl-C stops it.")
            if smoke_test:
                out.write("Smoke test passed: web server and both workers answered.")
                return
            self._supervise(supervisor)
        except SupervisionError as exc:
            raise CommandError(str(exc)) from exc
        finally:
            supervisor.stop_all()

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

    def _wait_ready(self, url: str, supervisor: Supervisor) -> None:
        from dailweb.celery import app

        deadline = time.monotonic() + 120
        web_ok = False
        workers_ok: set[str] = set()
        while time.monotonic() < deadline:
            supervisor.check()  # a child that dies while starting is restarted too
            if not web_ok:
                try:
                    with urllib.request.urlopen(url + "accounts/login/", timeout=2) as response:
                        web_ok = response.status == 200
                except OSError:
                    pass
            if len(workers_ok) < 2:
                try:
                    replies = app.control.ping(timeout=1.0) or []
                except Exception:  # the broker is restarting: ask again
                    replies = []
                for reply in replies:
                    for node in reply:
                        workers_ok.add(node.split("@", 1)[0])
            if web_ok and {"gpu", "default"} <= workers_ok:
                return
            time.sleep(0.5)
        raise CommandError(
            f"Not ready after 120 s (web: {web_ok}, workers: {sorted(workers_ok)}); see the logs."
        )

    def _supervise(self, supervisor: Supervisor) -> None:
        stop = {"now": False}

        def request_stop(signum, frame):
            stop["now"] = True

        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        while not stop["now"]:
            supervisor.check()
            time.sleep(0.5)
        self.stdout.write("\nStopping…")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _spawner(command: list[str], log_path: Path) -> Callable[[], subprocess.Popen]:
    def spawn() -> subprocess.Popen:
        with log_path.open("ab") as log_file:  # the child keeps its own copy of the descriptor
            return subprocess.Popen(
                command,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=settings.BASE_DIR,
                start_new_session=True,  # Ctrl-C reaches us only; we stop them in order
            )

    return spawn
