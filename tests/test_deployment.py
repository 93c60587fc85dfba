"""Deployment files and production settings, checked against the code (no Docker engine here)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dailweb.jobs.registry import QUEUES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker" / "compose.yml").read_text())


def command_args(service: dict) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else list(command)


def queues_of(args: list[str]) -> set[str]:
    return set(args[args.index("-Q") + 1].split(","))


def test_compose_has_the_five_services_and_volumes():
    assert set(COMPOSE["services"]) == {"web", "worker", "gpu-worker", "redis", "postgres"}
    assert {"pgdata", "artifacts"} <= set(COMPOSE["volumes"])
    for name in ("web", "worker", "gpu-worker"):
        service = COMPOSE["services"][name]
        dockerfile = ROOT / "docker" / Path(service["build"]["dockerfile"]).name
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        env = service["environment"]
        assert env["DATABASE_URL"].startswith("postgres://")
        assert env["CELERY_BROKER_URL"].startswith("redis://redis:")
        assert any(v.endswith(":/artifacts") for v in service["volumes"])


def test_compose_workers_cover_every_queue_like_dev_up():
    from dailweb.management.commands.up import worker_commands

    worker = command_args(COMPOSE["services"]["worker"])
    gpu = command_args(COMPOSE["services"]["gpu-worker"])
    assert worker[:4] == ["celery", "-A", "dailweb", "worker"]
    assert gpu[:4] == ["celery", "-A", "dailweb", "worker"]
    assert queues_of(worker) | queues_of(gpu) == set(QUEUES)
    assert queues_of(gpu) == {"gpu"} and "--max-tasks-per-child" in gpu
    assert "-B" in worker  # the stale-job sweep runs somewhere
    local = worker_commands("python")
    assert queues_of(local["worker-gpu"]) == queues_of(gpu)
    assert queues_of(local["worker-default"]) == queues_of(worker)


def test_compose_web_serves_the_wsgi_app_that_exists():
    import importlib

    args = command_args(COMPOSE["services"]["web"])
    assert "dailweb.wsgi" in " ".join(args)
    assert "migrate" in " ".join(args)
    assert importlib.util.find_spec("dailweb.wsgi") is not None


def test_gpu_image_installs_vllm_extra():
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert '".[vllm-gpu]"' in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert "vllm-gpu = [" in pyproject and "vllm-cpu = [" in pyproject


def _manage(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    # The browser tests set DJANGO_ALLOW_ASYNC_UNSAFE for Playwright; production never would.
    unwanted = {"DJANGO_SETTINGS_MODULE", "DJANGO_ALLOW_ASYNC_UNSAFE"}
    clean = {k: v for k, v in os.environ.items() if k not in unwanted}
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**clean, "DJANGO_SETTINGS_MODULE": "dailweb.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


PRODUCTION_ENV = {
    "DEBUG": "0",
    "SECRET_KEY": "p" * 10 + "roduction-secret-key-with-plenty-of-entropy-0123456789",
    "DAIL_HTTPS": "1",
    "ALLOWED_HOSTS": "dail.example.org",
}


def test_production_settings_pass_check_deploy():
    result = _manage(["check", "--deploy", "--fail-level", "WARNING"], PRODUCTION_ENV)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_missing_secret_key_in_production_is_a_clear_error(tmp_path):
    env = {**PRODUCTION_ENV, "SECRET_KEY": "", "DAIL_DATA_DIR": str(tmp_path)}
    result = _manage(["check"], env)
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


@pytest.mark.parametrize(("name", "value"), [("DEBUG", "maybe"), ("DAIL_JOB_STALE_SECONDS", "x")])
def test_malformed_environment_values_are_named(name, value):
    result = _manage(["check"], {**PRODUCTION_ENV, name: value})
    assert result.returncode != 0
    assert name in result.stderr


def test_database_url_selects_postgres():
    code = "from django.conf import settings; print(settings.DATABASES['default']['ENGINE'])"
    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"},
            **PRODUCTION_ENV,
            "DJANGO_SETTINGS_MODULE": "dailweb.settings",
            "DATABASE_URL": "postgres://u:p@db.example:5432/dail",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.strip() == "django.db.backends.postgresql", result.stderr
