"""The mixed-policy rollout engine (step 1 of DAIL).

Plain Python + torch + transformers: nothing here imports Django. The same functions are
called from the CLI, from Celery tasks (through `expansion.services`) and from `bench/`.

Modules, one concept each:
- `prompts` (the three views' prompts), `partial_solution` (s~ and suggested waypoints),
  `answers` (last boxed answer, equivalence, kept traces);
- `rollout` (settings, requests, results, the backend protocol), `sampling` (the rule and its
  keyed randomness), `rollout_reference` (per-token loop: oracle and baseline),
  `rollout_fast` (batched, block-drafted engine: `TransformersBackend`), `model_views`
  (views, KV caches, attention);
- `scoring` (per-token log-probs of the three views, shortcut scores), `trace_format`
  (compact per-trace bytes), `models` (loading), `cli` (`python -m expansion.engine.cli`).
"""
