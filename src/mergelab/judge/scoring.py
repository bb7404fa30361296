"""Reading a judged run's submission files and scoring them against the hidden targets.

:func:`read_predictions` runs where the judged run ran (it sees only the inputs, no targets) and
refuses garbage: a missing file, a wrong header, a missing, repeated or unknown row id, a
multiple-choice prediction that is not the index of a choice. :func:`score` runs in the judge
process: per task, the competition metrics (:mod:`mergelab.evaluate.metrics`: 1/0 per multiple
choice row, ROUGE-L F per generation row, averaged) on the public and the private rows apart;
the overall public (private) score is the mean of the tasks' public (private) scores.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.evaluate import read_competition_csv
from mergelab.evaluate.data import SUBMISSION_COLUMNS
from mergelab.evaluate.metrics import aggregate, row_metrics
from mergelab.judge.home import Home, is_public, read_targets


class GarbageOutput(Exception):
    """A judged run's output is not a valid submission (the message says where)."""


def read_predictions(eval_dir: Path, inputs_dir: Path, tasks: list[str]) -> dict[str, dict[str, str]]:
    """``{task: {row id: prediction}}`` from ``eval_dir/TASK.csv``, checked against the inputs."""
    out: dict[str, dict[str, str]] = {}
    for task in tasks:
        rows = read_competition_csv(inputs_dir / f"{task}.csv")
        path = eval_dir / f"{task}.csv"
        if not path.is_file():
            raise GarbageOutput(f"no submission file for task {task} ({path.name})")
        try:
            with open(path, newline="", encoding="utf-8") as fh:
                reader = csv.reader(fh)
                header = next(reader, None)
                if header is None or tuple(header) != SUBMISSION_COLUMNS:
                    raise GarbageOutput(f"{task}: header {header} is not {','.join(SUBMISSION_COLUMNS)}")
                preds: dict[str, str] = {}
                for line in reader:
                    if len(line) != len(SUBMISSION_COLUMNS):
                        raise GarbageOutput(f"{task}: a row has {len(line)} fields: {line[:3]}")
                    if line[0] in preds:
                        raise GarbageOutput(f"{task}: row id {line[0]} appears twice")
                    preds[line[0]] = line[1]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise GarbageOutput(f"{task}: unreadable submission file ({exc})") from None
        expected = {r.id: r for r in rows}
        missing = sorted(set(expected) - set(preds))
        extra = sorted(set(preds) - set(expected))
        if missing or extra:
            raise GarbageOutput(f"{task}: {len(missing)} row id(s) missing, {len(extra)} unknown "
                                f"(e.g. {(missing or extra)[0]})")
        for rid, row in expected.items():
            if row.is_mc:
                p = preds[rid]
                if not p.strip().lstrip("-").isdigit() or not 0 <= int(p) < len(row.choices or []):
                    raise GarbageOutput(f"{task}: row {rid}: prediction {p[:40]!r} is not a choice index")
        out[task] = preds
    return out


@dataclass
class Scores:
    public: float | None
    private: float | None
    tasks: dict[str, dict] = field(default_factory=dict)
    rows: list[tuple[str, str, str, float]] = field(default_factory=list)   # task, id, prediction, correct


def _mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def score(home: Home, tasks: list[str], fraction: float, predictions: dict[str, dict[str, str]]) -> Scores:
    """Score ``predictions`` against the hidden targets (public and private rows apart)."""
    result = Scores(None, None)
    for task in tasks:
        parts: dict[str, list[dict]] = {"public": [], "private": []}
        for row in read_targets(home, task):
            pred = predictions[task][row.id]
            metrics = row_metrics(row.eval_type, int(pred) if row.is_mc else pred, row.target)
            parts["public" if is_public(task, row.id, fraction) else "private"].append(
                {"eval_type": row.eval_type, "metrics": metrics})
            correct = metrics["correct"] if row.is_mc else metrics["exact_match"]
            result.rows.append((task, row.id, pred, correct))
        entry = {}
        for part, records in parts.items():
            agg = aggregate(records)
            entry[part] = agg["score"]
            entry[f"{part}_rows"] = agg["rows"]
        result.tasks[task] = entry
    result.public = _mean([t["public"] for t in result.tasks.values()])
    result.private = _mean([t["private"] for t in result.tasks.values()])
    return result
