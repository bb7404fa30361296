"""L1 — weights on disk: safetensors checkpoints (read lazily, written in shards), PEFT adapters, and
the layers of a checkpoint by tensor name (the layout of a layer stack)."""
