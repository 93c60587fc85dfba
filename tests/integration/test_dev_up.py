"""README command 1 on embedded defaults: `manage.py up` (what `./dev up` runs after
installing) with no DATABASE_URL and no CELERY_BROKER_URL: SQLite + the embedded Redis,
two real workers and the web server, then a login page that answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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
