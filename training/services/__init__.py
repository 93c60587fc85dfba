"""Training-run services (writes): `training` (plan, launch, execute, cancel, retry, adapter
archives). Evaluations' services are in training/evaluations/services.py."""
