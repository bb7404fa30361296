"""L3 — merging: opening inputs, data statistics, the streaming full-model path, the adapter path, the in-place merger."""
from mergelab.merge.full import MergeResult, merge

__all__ = ["merge", "MergeResult"]
