"""L4 — `mergelab run` and `reproduce`: recipe → resolved models → rules → merge → evaluation, with a manifest."""
from mergelab.run.pipeline import RunResult, reproduce, run_recipe

__all__ = ["run_recipe", "reproduce", "RunResult"]
