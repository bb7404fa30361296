"""``evaluate()``: competition CSV files in, submission files, predictions and scores out.

Order of work (so that a deadline leaves the most useful predictions behind): the multiple-choice
rows of all files are scored first (cheap: one forward pass per batch of rows), then generation
rows, then, with ``cot``, the chains of thought of the multiple-choice rows (whose log-probability
predictions stay as the fallback). Within each step rows of similar length are batched together;
output files keep the input order.

Deadline fallback: rows not reached when ``deadline`` passes get choice 0 (multiple choice) or the
empty string (generation), ``"not_reached": true`` and ``"method": "not_reached"`` in the
predictions, and are counted in ``not_reached`` in the scores (``"complete": false``). The
submission files always have one row per input row.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Sequence

from mergelab.util import atomic_output_dir, check_output_dir, check_output_path
from mergelab.errors import DataError
from mergelab.evaluate.data import read_competition_csv, write_submission
from mergelab.evaluate.generate import generate_texts
from mergelab.evaluate.metrics import aggregate, row_metrics
from mergelab.evaluate.options import EvalError, EvalOptions
from mergelab.evaluate.prompting import ShotPool, build_prompt, extract_choice
from mergelab.evaluate.scoring import score_multiple_choice
from mergelab.evaluate.loading import apply_adapter, load_model_and_tokenizer

FALLBACK_CHOICE = 0
FALLBACK_TEXT = ""

ProgressFn = Callable[[int, int], None]


def _as_paths(data_files) -> list[Path]:
    if isinstance(data_files, (str, os.PathLike)):
        data_files = [data_files]
    files = [Path(f) for f in data_files]
    if not files:
        raise DataError("no data file given", hint="pass at least one competition CSV file")
    names: dict[str, Path] = {}
    for f in files:
        if f.name in names:
            raise DataError(f"{names[f.name]} and {f}: two data files share the name {f.name}, "
                            f"so their submission files would collide",
                            hint="rename one of them")
        names[f.name] = f
    return files


def check_output_folder(out_dir: Path | None, force: bool, inputs: Sequence = ()) -> None:
    """Refuse, before any work is done, an output folder that is, holds or lies inside one of
    ``inputs`` (model, adapter, data and shots files; even with ``force``), or that exists
    (unless ``force``)."""
    if out_dir is not None:
        check_output_path(out_dir, inputs)
        check_output_dir(out_dir, force)


def _max_length(model, options: EvalOptions) -> int | None:
    if options.max_length is not None:
        return options.max_length
    if getattr(model.config, "is_encoder_decoder", False):
        return None
    return getattr(model.config, "max_position_embeddings", None)


def evaluate(model, data_files: str | Path | Sequence[str | Path], out_dir: str | Path | None,
             options: EvalOptions | None = None, *, adapter: str | Path | None = None,
             tokenizer=None, deadline: float | None = None, force: bool = False,
             on_progress: ProgressFn | None = None, label: str | None = None) -> dict:
    """Evaluate ``model`` on competition CSV files; write outputs to ``out_dir``; return the scores.

    ``model`` is a local model folder (loaded with :func:`load_model_and_tokenizer` on
    ``options.device`` in ``options.dtype``) or an already-loaded transformers model, used where
    it is (then ``tokenizer`` is required; it is put in eval mode and restored afterwards). A PEFT
    ``adapter`` folder is applied on top (to an in-memory model temporarily: it is removed again
    at the end). ``deadline`` is a ``time.monotonic()`` value; see the module docstring.

    Outputs in ``out_dir`` (written to a temporary folder, renamed into place at the end; an
    existing folder is replaced only with ``force``; ``None`` writes nothing): ``X.csv`` in
    submission format for each input ``X.csv``, ``predictions/X.jsonl`` with per-row details,
    and ``scores.json`` (the returned dict less its ``timing``, which goes to ``timing.json`` so
    that ``scores.json`` is the same bytes for the same model and data). ``on_progress(done,
    total)`` follows the work. ``label`` names the model in the scores instead of its folder (and
    the adapter by its folder name only), so that the scores do not depend on where folders lie.
    """
    options = options or EvalOptions()
    files = _as_paths(data_files)
    out_path = Path(out_dir) if out_dir is not None else None
    model_path = model if isinstance(model, (str, os.PathLike)) else None
    check_output_folder(out_path, force, [model_path, adapter, *files, options.shots])
    datasets = [(f, read_competition_csv(f)) for f in files]   # validate every file before loading
    pool = ShotPool.from_csv(options.shots, options.few_shot) if options.few_shot else None


    peft_model = None
    if isinstance(model, (str, os.PathLike)):
        model_name = str(model)
        model, loaded_tok = load_model_and_tokenizer(model, adapter=adapter, device=options.device,
                                                     dtype=options.dtype)
        tokenizer = tokenizer or loaded_tok
        was_training = False
    else:
        if tokenizer is None:
            raise EvalError("evaluate() was given a loaded model but no tokenizer",
                            hint="pass tokenizer=..., or pass the model folder instead")
        model_name = getattr(model.config, "_name_or_path", "") or type(model).__name__
        was_training = model.training
        if adapter is not None:
            peft_model = apply_adapter(model, adapter)   # injects LoRA layers into `model`
    model.eval()
    try:
        t0 = time.perf_counter()
        records = _run(model, tokenizer, datasets, options, pool, deadline, on_progress)
        seconds = time.perf_counter() - t0
        records = _finish_records(datasets, records)
    finally:
        if peft_model is not None:
            peft_model.unload()                           # the caller's model as it was
        if was_training:
            model.train()

    if label is not None:   # stable names: the scores do not depend on where the folders lie
        model_name, adapter_name = label, (Path(adapter).name if adapter is not None else None)
    else:
        adapter_name = str(adapter) if adapter is not None else None
    scores = _scores(datasets, records, options, model_name, adapter_name, seconds)
    if out_path is not None:
        _write_outputs(out_path, datasets, records, scores, force)
    return scores


def _prompt_records(datasets, tokenizer, options: EvalOptions, pool):
    """One record per row with its prompt(s), and the (file, row) indices of the multiple-choice
    and of the generation rows."""
    records: list[list[dict]] = []
    mc, gen = [], []   # (file index, row index)
    for fi, (_, rows) in enumerate(datasets):
        recs = []
        for ri, row in enumerate(rows):
            shots = pool.draw(row, options.few_shot, options.seed) if pool else []
            rec = {"id": row.id, "eval_type": row.eval_type,
                   "prompt": build_prompt(row, tokenizer, options, shots)}
            if shots:
                rec["shots"] = [s.id for s in shots]
            if row.is_mc and options.cot:
                rec["cot_prompt"] = build_prompt(row, tokenizer, options, shots, cot=True)
            recs.append(rec)
            (mc if row.is_mc else gen).append((fi, ri))
        records.append(recs)
    return records, mc, gen


def _run(model, tokenizer, datasets, options: EvalOptions, pool, deadline, on_progress) -> list[list[dict]]:
    """Predict every row; returns one list of per-row records per file, in input order."""
    max_length = _max_length(model, options)
    special = not options.chat   # a rendered chat template already holds its special tokens
    records, mc, gen = _prompt_records(datasets, tokenizer, options, pool)
    total = len(mc) + len(gen) + (len(mc) if options.cot else 0)
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if on_progress is not None:
            on_progress(done, total)

    if on_progress is not None:
        on_progress(0, total)
    row_of = lambda fi, ri: datasets[fi][1][ri]  # noqa: E731

    # 1. multiple choice by log-probability (also the fallback of chain of thought)
    if mc:
        results = score_multiple_choice(
            model, tokenizer, [records[fi][ri]["prompt"] for fi, ri in mc],
            [row_of(fi, ri).choices for fi, ri in mc], batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens, length_norm=options.length_norm,
            add_special_tokens=special, max_length=max_length, deadline=deadline, on_batch=tick)
        for (fi, ri), res in zip(mc, results):
            rec = records[fi][ri]
            rec["choices"] = row_of(fi, ri).choices
            if res is None:
                _mark_not_reached(rec, FALLBACK_CHOICE)
                continue
            rec.update(prediction=res.best(), method="logprob", logprobs=res.logprobs,
                       choice_tokens=res.n_tokens, prompt_tokens=res.prompt_tokens,
                       truncated=res.truncated)
            if options.length_norm != "none":
                rec["normalized"] = res.normalized

    # 2. generation
    if gen:
        results = generate_texts(
            model, tokenizer, [records[fi][ri]["prompt"] for fi, ri in gen],
            max_new_tokens=options.max_new_tokens, stop=options.stop, batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens, add_special_tokens=special,
            max_length=max_length, deadline=deadline, on_batch=tick)
        for (fi, ri), res in zip(gen, results):
            rec = records[fi][ri]
            if row_of(fi, ri).choices is not None:
                rec["choices"] = row_of(fi, ri).choices
            if res is None:
                _mark_not_reached(rec, FALLBACK_TEXT)
                continue
            rec.update(prediction=res.text, method="generate", generated=res.raw,
                       new_tokens=res.new_tokens, stopped_by=res.stopped_by,
                       prompt_tokens=res.prompt_tokens, truncated=res.truncated)

    # 3. chain of thought for multiple choice
    if options.cot and mc:
        todo = [(fi, ri) for fi, ri in mc if not records[fi][ri].get("not_reached")]
        results = generate_texts(
            model, tokenizer, [records[fi][ri]["cot_prompt"] for fi, ri in todo],
            max_new_tokens=options.cot_max_new_tokens, stop=options.stop,
            batch_size=options.batch_size, max_batch_tokens=options.max_batch_tokens,
            add_special_tokens=special, max_length=max_length, deadline=deadline, on_batch=tick)
        for (fi, ri), res in zip(todo, results):
            rec = records[fi][ri]
            if res is None:   # the log-probability prediction stands
                rec["cot_extraction"] = "not_reached"
                continue
            index, how = extract_choice(res.text, row_of(fi, ri).choices)
            rec.update(cot_generated=res.text, cot_extraction=how)
            if index is None:
                rec["method"] = "cot_fallback"
            else:
                rec.update(prediction=index, method="cot")

    return records


_FIRST_KEYS = ("id", "eval_type", "prediction", "target", "metrics", "method", "not_reached")


def _finish_records(datasets, records) -> list[list[dict]]:
    """Attach targets and per-row metrics; order the keys for reading (the summary first)."""
    out = []
    for (_, rows), recs in zip(datasets, records):
        done = []
        for row, rec in zip(rows, recs):
            rec["target"] = row.target
            rec["metrics"] = row_metrics(row.eval_type, rec["prediction"], row.target)
            first = {k: rec[k] for k in _FIRST_KEYS if k in rec}
            done.append({**first, **{k: v for k, v in rec.items() if k not in first}})
        out.append(done)
    return out


def _mark_not_reached(rec: dict, fallback) -> None:
    rec.update(prediction=fallback, method="not_reached", not_reached=True)


def _scores(datasets, records, options: EvalOptions, model_name: str, adapter: str | None,
            seconds: float) -> dict:
    per_file = {path.name: aggregate(recs) for (path, _), recs in zip(datasets, records)}
    everything = [r for recs in records for r in recs]
    overall = aggregate(everything)
    cot_skipped = sum(1 for r in everything if r.get("cot_extraction") == "not_reached")
    done = len(everything) - overall["not_reached"]
    return {
        "model": model_name,
        "adapter": adapter,
        "complete": overall["not_reached"] == 0 and cot_skipped == 0,
        "overall": overall,
        "files": per_file,
        "timing": {"seconds": seconds, "rows": done,
                   "rows_per_s": done / seconds if seconds > 0 else None},
        "options": options.model_dump(mode="json"),
    }


def _write_outputs(out_dir: Path, datasets, records, scores: dict, force: bool) -> None:
    with atomic_output_dir(out_dir, force) as tmp:
        (tmp / "predictions").mkdir()
        for (path, rows), recs in zip(datasets, records):
            write_submission(tmp / path.name, [r.id for r in rows], [rec["prediction"] for rec in recs])
            with (tmp / "predictions" / f"{path.stem}.jsonl").open("w", encoding="utf-8") as fh:
                for rec in recs:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        stable = {k: v for k, v in scores.items() if k != "timing"}
        (tmp / "scores.json").write_text(json.dumps(stable, indent=2, ensure_ascii=False) + "\n",
                                         encoding="utf-8")
        (tmp / "timing.json").write_text(json.dumps(scores["timing"], indent=2) + "\n", encoding="utf-8")


__all__ = ["evaluate", "FALLBACK_CHOICE", "FALLBACK_TEXT"]
