"""Training services (writes), by topic: `evaluation` (evaluations: launch, execute, cancel,
retry, rulings). Training runs will get their own module beside it."""
