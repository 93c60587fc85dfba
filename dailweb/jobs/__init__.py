"""Shared job machinery: every long piece of work (model preparation, expansion, training,
evaluation) is a `Job` row driven by one Celery task. The row is the truth; Celery only
carries the work.
"""
