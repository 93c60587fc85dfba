"""The contrastive objective and the LoRA trainer (step 2 of DAIL), plus evaluation metrics.

Plain Python + torch + transformers + peft: nothing here imports Django.

- `config.py`: `DailTrainingConfig`, one run's settings (release defaults), validated.
- `data.py`: `TrainingExample` (token ids of three prompts + the shared response), over-long
  handling, and the collator that lines the three views up.
- `objective.py`: `dail_loss`, `nll_loss`, `kl_divergence`: pure functions of logits.
- `views.py`: learner / privileged / negative-reference logits from one set of weights.
- `reference_cache.py`: the frozen views' hidden states kept on disk across epochs.
- `trainer.py`: `train_adapter`, transformers' `Trainer` wired for DAIL: checkpoints, resume,
  progress, cancellation, NaN guard; writes a PEFT adapter directory.
- `metrics.py`: unbiased pass@k, per problem and overall, with bootstrap intervals.
"""
