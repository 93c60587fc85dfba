"""The contrastive objective and the LoRA trainer (step 2 of DAIL), plus evaluation metrics.

Plain Python + torch + transformers + peft: nothing here imports Django.
"""
