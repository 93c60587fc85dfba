"""First loads (issue 16, item 8): a fresh web server process warms itself when it imports
its WSGI entry point, so the first problem page, new-problem page and editor load nothing
slow (the base model's tokenizer above all) while answering.

The pages are requested in a fresh process, as after a start: the tokenizer loader is
replaced there by one that fails, so a page that still loaded it would fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO_ROOT, _test_database_url
from tests.factories import make_problem, make_user

FRESH_SERVER = textwrap.dedent(
    """
    import json, sys, time
    started = time.perf_counter()
    import dailweb.wsgi  # what gunicorn and runserver import: the process warms itself
    boot = time.perf_counter() - started
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a page loaded the tokenizer while answering")

    transformers.AutoTokenizer.from_pretrained = refuse
    from django.contrib.auth import get_user_model
    from django.test import Client

    client = Client()
    client.force_login(get_user_model().objects.get(username=sys.argv[1]))
    seconds = {}
    for url in sys.argv[2:]:
        started = time.perf_counter()
        response = client.get(url)
        seconds[url] = [response.status_code, round(time.perf_counter() - started, 3),
                        "im_start|" in response.content.decode()]
    print(json.dumps({"boot": round(boot, 1), "pages": seconds}))
    """
)


@pytest.mark.django_db(transaction=True)
def test_first_pages_of_a_fresh_web_process_load_no_tokenizer(embedded_model_dir):
    expert = make_user("expert", username="first-load")
    problem = make_problem(author=expert)
    urls = [f"/problems/{problem.pk}/", "/problems/new/", f"/problems/{problem.pk}/edit/"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": _test_database_url(),
        "DAIL_ARTIFACTS_DIR": str(embedded_model_dir.parent.parent),
        "DAIL_BASE_MODEL": "",
        "ALLOWED_HOSTS": "testserver",
    }
    result = subprocess.run(
        [sys.executable, "-c", FRESH_SERVER, "first-load", *urls],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print("first loads:", report)  # the figures, for the record (-s)
    pages = report["pages"]
    assert all(status == 200 for status, _seconds, _template in pages.values()), pages
    # The previews of a problem are the real prompts (the chat template applied), so the
    # tokenizer was used: loaded before the first request, not during it.
    assert pages[urls[0]][2] and pages[urls[2]][2], pages
