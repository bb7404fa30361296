"""Metrics against hand computations."""
from __future__ import annotations

import pytest

from mergelab.evaluate.metrics import aggregate, exact_match, normalize_text, rouge, row_metrics


def test_normalisation_and_exact_match():
    assert normalize_text("  The Answer:  an Apple, a day! ") == "answer apple day"
    assert exact_match("The cat.", "cat") == 1.0
    assert exact_match("cats", "cat") == 0.0


def test_rouge_by_hand():
    # prediction: the cat sat on the mat / target: the cat is on the mat
    # unigrams: 5 of 6 shared (the x2, cat, on, mat)         -> F = 5/6
    # bigrams: the-cat, on-the, the-mat shared, of 5 each     -> F = 3/5
    # LCS: the cat on the mat = 5 tokens of 6                 -> F = 5/6
    r = rouge("the cat sat on the mat", "the cat is on the mat")
    assert r["rouge1"] == pytest.approx(5 / 6)
    assert r["rouge2"] == pytest.approx(3 / 5)
    assert r["rougeL"] == pytest.approx(5 / 6)
    # different lengths: 2 shared unigrams, precision 2/2, recall 2/4 -> F = 2*1*0.5/1.5 = 2/3
    assert rouge("quick fox", "the quick brown fox")["rouge1"] == pytest.approx(2 / 3)
    assert rouge("", "something")["rougeL"] == 0.0


def test_aggregate_by_hand():
    recs = [
        {"eval_type": "multiple_choice", "metrics": row_metrics("multiple_choice", 1, 1)},
        {"eval_type": "multiple_choice", "metrics": row_metrics("multiple_choice", 0, 2)},
        {"eval_type": "multiple_choice", "metrics": row_metrics("multiple_choice", 2, 2), "not_reached": True},
        {"eval_type": "multiple_choice", "metrics": None},  # no target
        {"eval_type": "generation", "metrics": row_metrics("generation", "the cat sat on the mat",
                                                            "the cat is on the mat")},
        {"eval_type": "generation", "metrics": row_metrics("generation", "Paris.", "paris")},
    ]
    s = aggregate(recs)
    assert s["rows"] == 6 and s["not_reached"] == 1
    assert s["multiple_choice"] == {"rows": 4, "scored": 3, "accuracy": pytest.approx(2 / 3)}
    g = s["generation"]
    assert g["rows"] == 2 and g["scored"] == 2 and g["exact_match"] == 0.5
    assert g["rouge1"] == pytest.approx((5 / 6 + 1) / 2)
    assert g["rouge2"] == pytest.approx((3 / 5 + 0) / 2)  # a one-word text has no bigram
    assert g["rougeL"] == pytest.approx((5 / 6 + 1) / 2)
    # score: mean of per-row values, 1/0 for multiple choice and ROUGE-L for generation
    assert s["score"] == pytest.approx((1 + 0 + 1 + 5 / 6 + 1) / 5)


def test_aggregate_without_targets_gives_none():
    s = aggregate([{"eval_type": "generation", "metrics": None}])
    assert s["score"] is None and s["generation"]["rouge1"] is None and s["multiple_choice"]["accuracy"] is None
