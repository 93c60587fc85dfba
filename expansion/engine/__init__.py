"""The mixed-policy rollout engine (step 1 of DAIL).

Plain Python + torch + transformers: nothing here imports Django. The same functions are
called from the CLI, from Celery tasks (through `expansion.services`) and from `bench/`.
"""
