"""Ranking or calibration: what a merge loses on a two-choice task of the demo zoo.

A merge can fail a yes/no task in two ways: it no longer tells the rows apart (the ranking is
lost), or it still does but its answers lean to one side (the calibration is lost: a constant
shift of the log-probability margin turns every answer into "yes"). This bench tells them apart.
For the base, the task's expert and each named merge (as in ``bench/merge_quality.py --methods``)
it scores the task's rows and prints, from the margin ``log p(first choice) − log p(second)``:

* the accuracy (what the evaluation counts: the higher log-probability wins);
* the mean margin on the rows whose answer is the first choice and on the others;
* the AUC of the margin (1: every first-choice row above every other row; 0.5: no ranking);
* the accuracy with the best constant threshold on the margin, chosen on the same rows — an upper
  bound of what a recalibration could recover, not a figure any merge reaches without data.

    python bench/calibration.py [--zoo DIR] [--split validation] [--task grammar] [--methods iso_c,regmean_pp]

Measured 2026-12-04 (2-core CPU, load ≈ 1; the shipped zoo; validation, 40 rows: 15 "yes", 25 "no"):
the base answers "no" to every row (margins −1.20 / −1.17, AUC 0.48, accuracy 0.62); the grammar
expert +2.59 / −2.87, AUC 1.00; Iso-C with the demo's LiNeS scale answers "yes" to every row
(accuracy 0.38) although its margins still rank the rows (+3.76 / +2.82, AUC 0.83; best threshold
0.82): the data-free merge kept most of grammar's ranking and lost its calibration. docs/demo.md
("Ranking or calibration; experts from independent seeds") has the figures of the other merges.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def margin_summary(margins: list[float], first: list[bool]) -> dict[str, float]:
    """Accuracy, mean margins per class, AUC and best-threshold accuracy of two-choice margins
    (``first[i]``: row i's answer is the first choice). Ties count half in the AUC; a margin of
    exactly 0 predicts the first choice, as :meth:`ChoiceScores.best` does on ties."""
    pos = [m for m, f in zip(margins, first) if f]
    neg = [m for m, f in zip(margins, first) if not f]
    n = len(margins)
    acc = sum((m >= 0) == f for m, f in zip(margins, first)) / n
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    auc = sum(pairs) / len(pairs) if pairs else float("nan")
    cuts = sorted(set(margins))
    # predict "first" when margin >= c, for every cut c among the margins, and "never first"
    best = max([sum((m >= c) == f for m, f in zip(margins, first)) / n for c in cuts]
               + [sum(not f for f in first) / n])
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"accuracy": acc, "margin_first": mean(pos), "margin_second": mean(neg), "auc": auc,
            "best_threshold_accuracy": best}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the demo's)")
    ap.add_argument("--split", default="validation", choices=["validation", "test"])
    ap.add_argument("--task", default="grammar", help="a two-choice multiple-choice task of the zoo")
    ap.add_argument("--methods", default="iso_c",
                    help="merges as in bench/merge_quality.py --methods (e.g. iso_c:lambda=2.5,regmean_pp)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from _measure import load_text, open_zoo
    from merge_quality import _recipe

    from mergelab.evaluate.loading import apply_adapter, load_model_and_tokenizer
    from mergelab.evaluate.scoring import score_multiple_choice
    from mergelab.merge.adapter import merge_to_adapter
    from mergelab.recipe import load_recipe
    from mergelab.zoo.demo import DEMO_MERGES, MORE_MERGES

    console = Console()
    t_all = time.perf_counter()
    console.print(f"load average at start {load_text()}")
    zoo = open_zoo(args.zoo, args.device, console)
    if args.task not in zoo.tasks:
        raise SystemExit(f"unknown task {args.task!r}; the zoo has {', '.join(zoo.tasks)}")
    rows = list(csv.DictReader(zoo.data(args.task, args.split).open(newline="")))
    choices = [json.loads(r["answer_choices"]) for r in rows]
    if rows[0]["eval_type"] != "multiple_choice" or any(len(c) != 2 for c in choices):
        raise SystemExit(f"{args.task}: not a two-choice multiple-choice task")
    first = [int(r["target"]) == 0 for r in rows]
    prompts = [r["input"] for r in rows]
    known = {m.label: m for m in (*DEMO_MERGES, *MORE_MERGES)}
    specs = [s.strip() for s in args.methods.split(",") if s.strip()]
    for s in specs:
        if s.partition(":")[0] not in known:
            raise SystemExit(f"unknown merge {s!r}; known: {', '.join(known)}")

    model, tok = load_model_and_tokenizer(zoo.base, device=args.device, dtype="float32")
    torch.set_grad_enabled(False)

    def measure(adapter: Path | None) -> dict[str, float]:
        peft_model = apply_adapter(model, adapter) if adapter is not None else None
        try:
            res = score_multiple_choice(peft_model or model, tok, prompts, choices)
        finally:
            if peft_model is not None:
                peft_model.unload()
        return margin_summary([r.logprobs[0] - r.logprobs[1] for r in res], first)

    results = {"base": measure(None), f"expert ({args.task})": measure(zoo.adapter(args.task))}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in specs:
            out = Path(tmp) / str(len(results))
            merge_to_adapter(load_recipe(_recipe(zoo, known, spec)), out, device=args.device, progress=False)
            results[spec] = measure(out)
            console.print(f"  {spec}: done", highlight=False)

    c1, c2 = choices[0]
    table = Table(title=f"{args.task} ({args.split}, {len(rows)} rows: {sum(first)} '{c1}', "
                        f"{len(rows) - sum(first)} '{c2}'); margin = log p({c1}) − log p({c2})",
                  title_justify="left")
    for col in ("model", "accuracy", f"margin on '{c1}' rows", f"margin on '{c2}' rows", "AUC",
                "best-threshold accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right", overflow="fold")
    for label, r in results.items():
        table.add_row(label, f"{r['accuracy']:.2f}", f"{r['margin_first']:+.2f}", f"{r['margin_second']:+.2f}",
                      f"{r['auc']:.2f}", f"{r['best_threshold_accuracy']:.2f}")
    console.print(table)
    console.print("best-threshold accuracy: the threshold is chosen on these rows (an upper bound of a "
                  "recalibration, not a score)")
    console.print(f"total {time.perf_counter() - t_all:.0f} s; load average at end {load_text()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
