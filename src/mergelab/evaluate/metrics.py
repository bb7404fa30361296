"""Metrics where targets exist.

* Multiple choice: **accuracy**, the share of rows whose predicted index equals the target.
* Generation: **exact_match** after normalisation (lower case, punctuation and the articles
  a/an/the removed, whitespace collapsed; the SQuAD convention) and **rouge1/rouge2/rougeL**,
  the mean F-measure from the ``rouge-score`` package (its default tokenizer, Porter stemming).
* **score**: one number per file and overall, the mean over scored rows of a per-row value:
  1/0 for a multiple-choice row, ROUGE-L F for a generation row.

Rows without a target are counted but not scored; the figures are ``None`` when no row is.
"""
from __future__ import annotations

import re
import string
from functools import lru_cache

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize_text(s: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace."""
    s = s.lower().translate(_PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_text(prediction) == normalize_text(target))


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge(prediction: str, target: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures of ``prediction`` against ``target``."""
    scores = _scorer().score(target, prediction)
    return {k: scores[k].fmeasure for k in ROUGE_TYPES}


def row_metrics(eval_type: str, prediction, target) -> dict[str, float] | None:
    """Per-row metrics (``None`` without a target): ``correct`` for multiple choice;
    ``exact_match`` and the ROUGE F-measures for generation."""
    if target is None:
        return None
    if eval_type == "multiple_choice":
        return {"correct": float(int(prediction) == int(target))}
    return {"exact_match": exact_match(str(prediction), str(target)), **rouge(str(prediction), str(target))}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def aggregate(records: list[dict]) -> dict:
    """Summary of per-row records (``eval_type``, ``metrics``, ``not_reached``) of one file or all."""
    mc = [r for r in records if r["eval_type"] == "multiple_choice"]
    gen = [r for r in records if r["eval_type"] == "generation"]
    mc_scored = [r["metrics"] for r in mc if r["metrics"] is not None]
    gen_scored = [r["metrics"] for r in gen if r["metrics"] is not None]
    per_row = [m["correct"] for m in mc_scored] + [m["rougeL"] for m in gen_scored]
    out = {
        "rows": len(records),
        "not_reached": sum(1 for r in records if r.get("not_reached")),
        "score": _mean(per_row),
        "multiple_choice": {
            "rows": len(mc),
            "scored": len(mc_scored),
            "accuracy": _mean([m["correct"] for m in mc_scored]),
        },
        "generation": {
            "rows": len(gen),
            "scored": len(gen_scored),
            "exact_match": _mean([m["exact_match"] for m in gen_scored]),
            **{k: _mean([m[k] for m in gen_scored]) for k in ROUGE_TYPES},
        },
    }
    cot = [r for r in mc if r.get("method", "").startswith("cot")]
    if cot:
        out["multiple_choice"]["cot"] = {
            "extracted": sum(1 for r in cot if r["method"] == "cot"),
            "fallback": sum(1 for r in cot if r["method"] == "cot_fallback"),
        }
    return out
