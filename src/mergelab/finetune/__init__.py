"""L4 — the recipe's `finetune:` stage: data licences, a LoRA adapter trained on the run's base or merge."""
