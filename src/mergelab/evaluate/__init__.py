"""L2 — evaluation on competition CSV files: multiple choice by log-probability, greedy generation,
prompting (chat templates, few-shot, chain of thought), metrics and submission files.

Public API::

    from mergelab.evaluate import EvalOptions, evaluate, read_competition_csv
    scores = evaluate("merged/", ["test.csv"], "out/", EvalOptions(batch_size=16))

Importing this package is cheap; torch and transformers load with the functions that need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from mergelab.evaluate.data import Row, parse_choices, read_competition_csv, write_submission
from mergelab.evaluate.options import EvalError, EvalOptions

if TYPE_CHECKING:  # pragma: no cover
    from mergelab.evaluate.generate import Generation, generate_reference, generate_texts
    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.evaluate.runner import FALLBACK_CHOICE, FALLBACK_TEXT, evaluate
    from mergelab.evaluate.scoring import (
        ChoiceScores,
        score_multiple_choice,
        score_multiple_choice_reference,
    )

_LAZY = {
    "evaluate": "runner", "FALLBACK_CHOICE": "runner", "FALLBACK_TEXT": "runner",
    "load_model_and_tokenizer": "loading",
    "score_multiple_choice": "scoring", "score_multiple_choice_reference": "scoring",
    "ChoiceScores": "scoring",
    "generate_texts": "generate", "generate_reference": "generate", "Generation": "generate",
    "extract_choice": "prompting", "build_prompt": "prompting", "ShotPool": "prompting",
    "aggregate": "metrics", "normalize_text": "metrics", "rouge": "metrics",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EvalError", "EvalOptions", "Row", "parse_choices", "read_competition_csv",
           "write_submission", *_LAZY]
