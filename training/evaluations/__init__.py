"""Evaluations of a base model or adapter: pass@k and token-budget curves, comparisons,
rulings on flagged samples. Their own views, URLs (namespace "evaluations"), forms, selectors,
services and job kind; the models stay in training/models.py and the sampling and metrics in
training/engine/evaluation.py."""
