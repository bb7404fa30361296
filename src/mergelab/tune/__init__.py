"""L4 — ``mergelab tune``: learn a recipe's merge parameters on validation rows, honestly.

* :mod:`mergelab.tune.config` — the ``tune:`` section (search space, objective, data, budget) and
  the search space's mapping back into a plain recipe;
* :mod:`mergelab.tune.objective` — the deterministic search/check split and the objectives
  (``score`` on labelled rows, ``entropy`` on unlabelled inputs) and the penalty below the base;
* :mod:`mergelab.merge.inplace` — each trial's merge written into the loaded base in memory;
* :mod:`mergelab.tune.gradient` — ``optimizer: gradient``: the coefficients of a linear merge
  learned by gradient descent on the entropy (AdaMerging);
* :mod:`mergelab.tune.study` — the optuna study (or the descent), budgets, resuming, and the outputs
  (``recipe.tuned.yaml``, ``trials.csv``, ``report.md``, ``search.png``).

See ``docs/tune.md``. Importing this package is cheap; torch, transformers and optuna load with
the functions that need them.
"""
from __future__ import annotations

from mergelab.recipe.sections import ParamRange, TuneError, TuneSection
from mergelab.tune.config import SearchSpace
from mergelab.tune.objective import split_rows
from mergelab.tune.study import TrialRecord, TuneResult, run_tune

__all__ = ["ParamRange", "SearchSpace", "TuneError", "TuneSection", "split_rows",
           "TrialRecord", "TuneResult", "run_tune"]
