"""Fixtures shared by every test package.

`embedded_model_dir` is the real SmolLM2-135M-Instruct, converted from the GGUF once into a
cache directory that survives test runs (conversion takes ~20 s; loading afterwards < 1 s).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_CACHE_DIR = Path(os.environ.get("DAIL_TEST_CACHE_DIR", REPO_ROOT / "data" / "test-cache"))


@pytest.fixture(scope="session")
def test_cache_dir() -> Path:
    TEST_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE_DIR


@pytest.fixture(scope="session")
def embedded_model_dir(test_cache_dir: Path) -> Path:
    """Path of the prepared embedded model (a transformers/vLLM-loadable directory)."""
    from expansion.engine.embedded_model import embedded_model_dir as model_dir_for
    from expansion.engine.embedded_model import is_prepared, prepare_embedded_model

    artifacts = test_cache_dir / "artifacts"
    model_dir = model_dir_for(artifacts)
    if not is_prepared(model_dir):
        prepare_embedded_model(artifacts)
    return model_dir


# --- Broker and real Celery workers ------------------------------------------------------


@pytest.fixture(scope="session")
def broker_url():
    """The broker the tests use: DAIL_TEST_BROKER_URL (CI: the machine's Redis), else an
    embedded Redis started for this test session on a unix socket."""
    from django.conf import settings

    from dailweb.embedded_redis import EmbeddedRedis, ping

    if os.environ.get("DAIL_TEST_BROKER_URL"):
        yield settings.CELERY_BROKER_URL
        return
    server = None
    if not ping(settings.TEST_REDIS_SOCKET):
        server = EmbeddedRedis(
            settings.TEST_REDIS_SOCKET,
            settings.DATA_DIR / "run" / f"test-redis-{settings.TEST_RUN_ID}",
            persistent=False,
        ).start()
    yield settings.CELERY_BROKER_URL
    if server is not None:
        server.stop()


@pytest.fixture
def clean_queues(broker_url):
    """Drop messages left in the test queues by earlier tests."""
    from dailweb.celery import app

    with app.connection_for_write() as connection:
        for queue in ("default", "gpu"):
            connection.default_channel.queue_purge(queue)
    yield


def _test_database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s["PASSWORD"] else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


class WorkerProcess:
    """A real `celery worker` subprocess using the test database and broker."""

    def __init__(
        self,
        name: str,
        queues: str,
        log_path: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.extra_env = env or {}
        self.extra_args = args or []
        self.name = name
        self.queues = queues
        self.log_path = log_path
        self.process = None

    @property
    def nodename(self) -> str:
        import socket

        return f"{self.name}@{socket.gethostname()}"

    def start(self, timeout: float = 60) -> WorkerProcess:
        import subprocess
        import sys
        import time

        from dailweb.celery import app

        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": _test_database_url(),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        command = [
            sys.executable, "-m", "celery", "-A", "dailweb", "worker",
            "-Q", self.queues, "-c", "1", "-n", f"{self.name}@%h",
            "--without-gossip", "--without-mingle", "--loglevel", "INFO", *self.extra_args,
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command,
            env=env,
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early; log: {self.log_text()[-3000:]}")
            if app.control.ping(destination=[self.nodename], timeout=0.5):
                return self
        raise RuntimeError(f"worker did not answer; log: {self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pool_child_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()] if children.exists() else []

    def kill(self) -> None:
        """SIGKILL the worker and its pool processes, as a crash or the OOM killer would."""
        import signal

        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        import signal
        import subprocess

        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture
def celery_worker_factory(broker_url, clean_queues, transactional_db, tmp_path):
    """Start real worker processes: `start_worker(name="w1", queues="default,gpu")`; `args`
    go to `celery worker` (e.g. the product's `--max-tasks-per-child 1` for gpu workers)."""
    workers: list[WorkerProcess] = []

    def start_worker(
        name: str = "test-worker",
        queues: str = "default,gpu",
        env: dict | None = None,
        args: list[str] | None = None,
    ) -> WorkerProcess:
        log = tmp_path / f"{name}-{len(workers)}.log"
        worker = WorkerProcess(name, queues, log, env, args).start()
        workers.append(worker)
        return worker

    yield start_worker
    for worker in workers:
        worker.stop()


def wait_for(predicate, timeout: float = 60, interval: float = 0.2, message: str = ""):
    """Poll `predicate` until it returns a truthy value; fail the test after `timeout`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(message or f"condition not met within {timeout} s")


@pytest.fixture
def single_torch_thread() -> Iterator[None]:
    """Tiny models run much faster on one thread, above all on a busy machine (threads of a
    2-core pool spin-wait on each other). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("single_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
