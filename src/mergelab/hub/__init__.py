"""L2 — the Hugging Face Hub: resolving model references to pinned local snapshots, and the competition rules."""
