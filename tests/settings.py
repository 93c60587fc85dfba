"""Test settings: the real settings, plus what only tests need.

- Static files without a manifest (tests do not run collectstatic).
- A fast password hasher.
- The broker: DAIL_TEST_BROKER_URL when set (CI: the machine's Redis, a database of its own),
  else an embedded Redis that the test session starts on a unix socket (tests/services.py).
"""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-secret-key-" + "x" * 40)
# One id per test session, inherited by the worker processes the tests start, so that two
# test sessions on one machine never share a database file or a broker socket.
TEST_RUN_ID = os.environ.setdefault("DAIL_TEST_RUN_ID", str(os.getpid()))

from dailweb.settings import *  # noqa: E402,F403
from dailweb.settings import DATA_DIR, STORAGES  # noqa: E402

STORAGES = {
    **STORAGES,
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Tests serve static files through the finders; nothing is collected.
STATIC_ROOT = None
WHITENOISE_USE_FINDERS = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

TEST_REDIS_SOCKET = DATA_DIR / "run" / f"test-redis-{TEST_RUN_ID}.sock"
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):  # noqa: F405
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / f"test-db-{TEST_RUN_ID}.sqlite3")}  # noqa: F405
CELERY_BROKER_URL = os.environ.get("DAIL_TEST_BROKER_URL") or f"redis+socket://{TEST_REDIS_SOCKET}"
USES_EMBEDDED_BROKER = False
# Workers in tests notice dead jobs quickly.
JOB_HEARTBEAT_SECONDS = 1
JOB_STALE_SECONDS = 5
# vLLM engines started by tests (and their workers) need little KV cache; leave RAM to the rest.
VLLM_KV_CACHE_GB = 1
# axe-core (npm package, pinned in package.json) for the accessibility browser tests, served from
# our own static files so that the strict CSP (script-src 'self') lets the tests load it.
AXE_CORE_DIR = BASE_DIR / "node_modules" / "axe-core"  # noqa: F405
if AXE_CORE_DIR.is_dir():
    STATICFILES_DIRS = [*STATICFILES_DIRS, ("vendor/axe-core", AXE_CORE_DIR)]  # noqa: F405
