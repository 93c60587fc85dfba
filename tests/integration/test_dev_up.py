"""README command 1 on embedded defaults: `manage.py up` (what `./dev up` runs after
installing) with no DATABASE_URL and no CELERY_BROKER_URL: SQLite + the embedded Redis,
two real workers and the web server, then a login page that answers. And its supervision:
a killed Redis comes back, a child that keeps dying stops everything, and Ctrl-C stops the
workers while the broker still answers."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_up_runs_everything_on_embedded_defaults(tmp_path, embedded_model_dir):
    data = tmp_path / "data"
    artifacts = data / "artifacts" / "models"
    artifacts.mkdir(parents=True)
    # Reuse the converted model (conversion itself is tested elsewhere); `up` still verifies it.
    (artifacts / embedded_model_dir.name).symlink_to(embedded_model_dir)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY"}
    }
    env.update({"DAIL_DATA_DIR": str(data), "DEBUG": "0", "PYTHONUNBUFFERED": "1"})
    (data / "secret_key").write_text("a-test-secret-key-written-like-dev-setup-does-" + "k" * 20)
    port = free_port()
    result = subprocess.run(
        [sys.executable, "manage.py", "up", "--smoke-test", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Database: sqlite3 · broker: embedded Redis" in output
    assert f"running at http://localhost:{port}/" in output
    assert "Smoke test passed" in output
    for user in ("expert", "reviewer", "admin"):
        assert f"{user}" in output and "password:" in output
    assert (data / "db.sqlite3").is_file()
    assert (data / "demo-credentials.txt").stat().st_mode & 0o077 == 0
    # Everything was stopped again: nothing answers on the port or the broker socket.
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    from dailweb.embedded_redis import ping

    assert not ping(data / "run" / "redis.sock")
    assert (data / "staticfiles" / "staticfiles.json").is_file()  # collected, with a manifest
    # A new user starts among real problems: CHAMP was loaded on the first run.
    assert "Imported 270 problems: 270 new" in output
    import sqlite3

    with sqlite3.connect(data / "db.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM curation_problem").fetchone()[0] == 270


def embedded_env(data: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "CELERY_BROKER_URL", "DJANGO_SETTINGS_MODULE", "SECRET_KEY"}
    }
    env.update({"DAIL_DATA_DIR": str(data), "DEBUG": "0", "PYTHONUNBUFFERED": "1"})
    data.mkdir(parents=True, exist_ok=True)
    (data / "secret_key").write_text("a-test-secret-key-written-like-dev-setup-does-" + "k" * 20)
    return env


def wait_until(predicate, timeout: float, what: str, process: subprocess.Popen, output):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert process.poll() is None or predicate(), f"up exited early:\n{output()[-4000:]}"
        time.sleep(0.3)
    raise AssertionError(f"{what} did not happen in {timeout} s:\n{output()[-4000:]}")


def job_state(data: Path, job_id: int) -> str:
    with sqlite3.connect(data / "db.sqlite3", timeout=10) as db:
        return db.execute("SELECT state FROM jobs_job WHERE id = ?", (job_id,)).fetchone()[0]


def start_up(env: dict[str, str], port: int, console: Path):
    """`manage.py up --skip-model` in a process group of its own (as a terminal gives it),
    its output going to `console`; returns the process and a reader of its output."""
    with console.open("wb") as sink:
        up = subprocess.Popen(
            [sys.executable, "manage.py", "up", "--skip-model", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output() -> str:
        return console.read_text(errors="replace")

    return up, output


def test_up_restarts_killed_redis_and_stops_on_a_crash_loop(tmp_path):
    data = tmp_path / "d"
    env = embedded_env(data)
    port = free_port()
    up, output = start_up(env, port, tmp_path / "up.out")

    try:
        wait_until(lambda: "running at" in output(), 300, "startup", up, output)
        redis_pid = int(re.search(r"redis: started \(pid (\d+)\)", output()).group(1))
        os.kill(redis_pid, signal.SIGKILL)
        wait_until(lambda: "redis: restarted" in output(), 30, "redis restart", up, output)
        assert f"redis (pid {redis_pid}) stopped unexpectedly (killed by SIGKILL)" in output()
        assert not Path(f"/proc/{redis_pid}").exists()  # reaped: no zombie left behind

        # Both workers reconnect to the restarted broker: jobs launched now run.
        launch = (
            "from dailweb.jobs import services\n"
            "for queue in ('default', 'gpu'):\n"
            "    job = services.job_launch(kind='worker_check', launched_by=None, queue=queue,"
            " params={'steps': 2, 'seconds_per_step': 0})\n"
            "    print('launched job', job.pk)"
        )
        launched = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", launch],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert launched.returncode == 0, launched.stderr
        job_ids = [int(pk) for pk in re.findall(r"launched job (\d+)", launched.stdout)]
        assert len(job_ids) == 2, launched.stdout
        wait_until(
            lambda: all(job_state(data, pk) == "succeeded" for pk in job_ids),
            120,
            "jobs after the broker restart",
            up,
            output,
        )

        # A broker that cannot start any more (its append-only file is corrupt) is retried
        # with growing pauses, then everything stops, naming the log that says why.
        (data / "redis" / "appendonly.aof").write_text("this is not an append-only file\n")
        current = int(re.findall(r"redis: restarted \(pid (\d+)\)", output())[-1])
        os.kill(current, signal.SIGKILL)
        up.wait(timeout=90)
        assert up.returncode != 0
        text = output()
        assert "restarting in 1 s" in text and "restarting in 8 s" in text
        assert f"stopping everything. Read {data / 'redis' / 'redis.log'}" in text
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0  # the web server was stopped too
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=60)


def test_ctrl_c_stops_the_workers_before_the_broker(tmp_path):
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group: `up` must get it
    and stop its children in order; none of them may take it first (the broker did, and the
    workers filled their logs with lost-connection tracebacks)."""
    data = tmp_path / "d"
    up, output = start_up(embedded_env(data), free_port(), tmp_path / "up.out")

    try:
        wait_until(lambda: "running at" in output(), 300, "startup", up, output)
        redis_pid = int(re.search(r"redis: started \(pid (\d+)\)", output()).group(1))
        os.killpg(up.pid, signal.SIGINT)  # what Ctrl-C does
        assert up.wait(timeout=90) == 0, output()[-3000:]
        assert not Path(f"/proc/{redis_pid}").exists()  # stopped and reaped
        for worker in ("worker-gpu", "worker-default"):
            log = (data / "logs" / f"{worker}.log").read_text(errors="replace")
            assert "ready." in log, log[-2000:]
            assert "Connection to broker lost" not in log, log[-3000:]
            assert "Traceback" not in log, log[-3000:]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGTERM)
            up.wait(timeout=60)
