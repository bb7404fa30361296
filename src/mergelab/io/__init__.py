"""L1 — weights on disk: safetensors checkpoints (read lazily, written in shards) and PEFT adapters."""
