"""WSGI entry point (gunicorn dailweb.wsgi)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dailweb.settings")
application = get_wsgi_application()
