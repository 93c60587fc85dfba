"""WSGI entry point (gunicorn dailweb.wsgi; `runserver` loads it too)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dailweb.settings")
application = get_wsgi_application()

# Only web server processes import this module: they load what the first page needs now.
from dailweb.warmup import warm_web_process  # noqa: E402

warm_web_process()
