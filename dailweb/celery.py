"""The Celery application. Configuration lives in Django settings (CELERY_* names).

Queues: `gpu` for expansion, training and evaluation; `default` for everything else. More GPU
machines means more workers started with `-Q gpu`, nothing else.
"""

import os

from celery import Celery
from kombu import Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dailweb.settings")

app = Celery("dailweb")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.task_queues = (Queue("default"), Queue("gpu"))
app.autodiscover_tasks(["dailweb.jobs", "training"])
