"""Validation rows, their search/check split, and the objectives a trial is scored by.

**Split.** Each validation file's rows are ordered by ``sha256(split_seed, file name, row id)``;
with ``rows_per_task`` only the first that many are used; the first ``round(n · check_fraction)``
(at least one, and at least one left for the search) form the *check* part, the others the
*search* part. The split depends on nothing else (not on row order, trials or workers), the two
parts never share a row, and only the search part reaches the sampler: the check score is
recorded beside each trial for the report and never returned as the objective.

**Objectives** (one number per task file, then the mean over files, so every task counts the
same however many rows it has):

``score`` (maximised)
    :func:`mergelab.evaluate.evaluate` on the part's files: accuracy on multiple-choice rows and,
    on generation rows, ``metric``: ROUGE-L F by default (the evaluation's ``score``), or exact
    match, ROUGE-1 or ROUGE-2 F — use the metric the task is judged by. Needs targets.
``entropy`` (minimised; AdaMerging-style, no labels needed)
    the mean normalised prediction entropy: for a multiple-choice row the entropy of the softmax
    over the choices' (length-normalised, if the options say so) log-probabilities, divided by
    ``log(number of choices)``; for a generation row the entropy of the next-token distribution
    after the prompt, divided by ``log(vocabulary size)``. Both lie in [0, 1].

**Penalty below the base** (``below_base_penalty: p`` with ``score``): the base model is scored
once on each part before the trials, and a trial's value becomes
``mean over tasks − p × Σ over tasks of max(0, base's score − merge's score)``
(:class:`BelowBasePenalty`), so a merge that leaves a task worse than not merging at all pays for
it even when the other tasks gain more on average.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mergelab.evaluate.scoring import decoder_start_token
from mergelab.recipe.sections import TuneError
from mergelab.evaluate import read_competition_csv
from mergelab.evaluate.prompting import build_prompt
from mergelab.evaluate.scoring import choice_score_tensors, score_multiple_choice
from mergelab.evaluate.batching import encode_prompt, is_encoder_decoder, model_device, pad_id_of, right_pad, truncate_left
from mergelab.evaluate.runner import evaluate

DIRECTIONS = {"score": "maximize", "entropy": "minimize"}


@dataclass(frozen=True)
class SplitFile:
    """One task file's rows, split."""

    source: Path
    search: list      # list[Row]
    check: list


def _order_key(seed: int, file_name: str, row_id: str) -> str:
    return hashlib.sha256(f"{seed}\x00{file_name}\x00{row_id}".encode()).hexdigest()


def split_rows(path: Path, rows: Sequence, check_fraction: float, seed: int = 0,
               rows_per_task: int | None = None) -> SplitFile:
    """Split one file's rows into disjoint search and check parts (see the module doc)."""
    ordered = sorted(rows, key=lambda r: _order_key(seed, path.name, r.id))
    if rows_per_task is not None:
        ordered = ordered[:rows_per_task]
    if len(ordered) < 2:
        raise TuneError(f"{path}: has {len(ordered)} row(s); the search and the check part need at "
                        "least one each", hint="give at least 2 validation rows per task")
    n_check = min(len(ordered) - 1, max(1, round(len(ordered) * check_fraction)))
    return SplitFile(Path(path), search=ordered[n_check:], check=ordered[:n_check])


def write_rows(path: Path, rows: Sequence) -> None:
    """Write rows as a competition CSV (``id,input,target,answer_choices,eval_type``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, lineterminator="\r\n")
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for r in rows:
            w.writerow([r.id, r.input, "" if r.target is None else r.target,
                        "" if r.choices is None else json.dumps(r.choices, ensure_ascii=False), r.eval_type])
    tmp.replace(path)


def load_splits(files: Sequence[Path], check_fraction: float, seed: int, rows_per_task: int | None,
                objective: str) -> list[SplitFile]:
    out = []
    for i, f in enumerate(files):
        rows = read_competition_csv(f)
        if objective == "score":
            missing = [r.id for r in rows if r.target is None]
            if missing:
                raise TuneError(f"tune.data[{i}]: {f}: row {missing[0]!r} has no target, and objective "
                                f"`score` needs labelled rows ({len(missing)} without)",
                                hint="label the rows, or use objective: entropy (unlabelled inputs)")
        out.append(split_rows(f, rows, check_fraction, seed, rows_per_task))
    return out


def file_score(file_scores: dict, metric: str = "rougeL") -> float:
    """One file's value for the ``score`` objective: the row mean of accuracy (multiple choice)
    and ``metric`` (generation), from :func:`mergelab.evaluate.evaluate`'s per-file scores."""
    if metric == "rougeL":
        return float(file_scores["score"])
    mc = file_scores.get("multiple_choice") or {}
    gen = file_scores.get("generation") or {}
    n_mc, n_gen = mc.get("scored", 0) or 0, gen.get("scored", 0) or 0
    total = (mc.get("accuracy") or 0.0) * n_mc + (gen.get(metric) or 0.0) * n_gen
    return float(total / (n_mc + n_gen)) if n_mc + n_gen else 0.0


class Objective:
    """Scores the loaded (merged) model on one part of the split: ``part`` is ``search`` or ``check``.

    ``files[part]`` are the written CSVs of that part; calling returns ``(value, per-task values)``.
    """

    def __init__(self, kind: str, files: dict[str, list[Path]], options, tokenizer, metric: str = "rougeL"):
        self.kind = kind
        self.metric = metric
        self.direction = DIRECTIONS[kind]
        self.files = files
        self.options = options
        self.tokenizer = tokenizer

    def __call__(self, model, part: str) -> tuple[float, dict[str, float]]:
        files = self.files[part]
        if self.kind == "score":
            scores = evaluate(model, files, None, self.options, tokenizer=self.tokenizer)
            per_task = {f.stem: file_score(scores["files"][f.name], self.metric) for f in files}
        else:
            per_task = {f.stem: mean_entropy(model, self.tokenizer, f, self.options) for f in files}
        return sum(per_task.values()) / len(per_task), per_task


def below_base_shortfall(tasks: dict[str, float], base: dict[str, float]) -> float:
    """Σ over the tasks both know of ``max(0, base[t] − tasks[t])``: how far the merge falls below
    the base, summed over the tasks where it does."""
    return sum(max(0.0, base[t] - v) for t, v in tasks.items() if t in base)


class BelowBasePenalty:
    """An objective (maximised) minus ``penalty`` × its shortfall below the base on each part.

    ``base`` is ``{part: {task: the base model's value}}``; calling returns the penalised value and
    the objective's own per-task values (unchanged, so the report shows the real scores).
    """

    def __init__(self, objective, base: dict[str, dict[str, float]], penalty: float):
        self.objective = objective
        self.base = base
        self.penalty = penalty

    def __call__(self, model, part: str) -> tuple[float, dict[str, float]]:
        value, tasks = self.objective(model, part)
        return value - self.penalty * below_base_shortfall(tasks, self.base[part]), tasks


def mean_entropy(model, tokenizer, path: Path, options) -> float:
    """The mean normalised prediction entropy of ``model`` over the rows of one CSV (module doc)."""
    import torch

    with torch.inference_mode():
        return float(row_entropies(model, tokenizer, read_competition_csv(path), options).mean())


def row_entropies(model, tokenizer, rows: Sequence, options, *, differentiable: bool | None = None):
    """Each row's normalised prediction entropy (module doc) as one float64 tensor, multiple-choice
    rows first: the loss of ``optimizer: gradient``. ``differentiable`` (default: whether autograd is
    enabled) scores the choices with :func:`~mergelab.evaluate.scoring.choice_score_tensors`, the
    reference definition, through which gradients flow (and which needs only ``model(...)``), else
    with the batched, cached scorer (equal to it to 1e-4)."""
    import torch

    special = not options.chat
    prompts = [build_prompt(r, tokenizer, options) for r in rows]
    max_length = options.max_length or (None if getattr(model.config, "is_encoder_decoder", False)
                                        else getattr(model.config, "max_position_embeddings", None))
    values = []
    mc = [i for i, r in enumerate(rows) if r.is_mc]
    if mc:
        mc_prompts, mc_choices = [prompts[i] for i in mc], [rows[i].choices for i in mc]
        if torch.is_grad_enabled() if differentiable is None else differentiable:
            scores = choice_score_tensors(model, tokenizer, mc_prompts, mc_choices, length_norm=options.length_norm,
                                          add_special_tokens=special, max_length=max_length)
        else:
            results = score_multiple_choice(model, tokenizer, mc_prompts, mc_choices, batch_size=options.batch_size,
                                            max_batch_tokens=options.max_batch_tokens,
                                            length_norm=options.length_norm, add_special_tokens=special,
                                            max_length=max_length)
            scores = [torch.tensor(res.normalized or res.logprobs, dtype=torch.float64) for res in results]
        values += [choice_entropy_tensor(sc).to("cpu") for sc in scores]
    gen = [prompts[i] for i, r in enumerate(rows) if not r.is_mc]
    if gen:
        values += list(next_token_entropies(model, tokenizer, gen, add_special_tokens=special,
                                            max_length=max_length, batch_size=options.batch_size).to("cpu"))
    return torch.stack(values) if values else torch.zeros(0, dtype=torch.float64)


def choice_entropy(scores: Sequence[float]) -> float:
    """Entropy of ``softmax(scores)`` divided by ``log(len(scores))`` (0 for a single choice)."""
    import torch

    return float(choice_entropy_tensor(torch.tensor(list(scores), dtype=torch.float64)))


def choice_entropy_tensor(scores):
    """:func:`choice_entropy` of a 1-D tensor of choice scores, as a float64 tensor (differentiable)."""
    import torch

    if scores.numel() < 2:
        return torch.zeros((), dtype=torch.float64, device=scores.device) + 0.0 * scores.sum()
    logp = torch.log_softmax(scores.double(), 0)
    return -(logp.exp() * logp).sum() / math.log(scores.numel())


def next_token_entropy(model, tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = True,
                       max_length: int | None = None, batch_size: int = 16) -> list[float]:
    """Normalised entropy of the next-token distribution after each prompt (decoders and T5)."""
    import torch

    with torch.inference_mode():
        return [float(v) for v in next_token_entropies(model, tokenizer, prompts, add_special_tokens=add_special_tokens,
                                                        max_length=max_length, batch_size=batch_size)]


def next_token_entropies(model, tokenizer, prompts: Sequence[str], *, add_special_tokens: bool = True,
                         max_length: int | None = None, batch_size: int = 16):
    """:func:`next_token_entropy` as one float64 tensor (differentiable when autograd is enabled)."""
    import torch

    enc_dec = is_encoder_decoder(model)
    device = model_device(model)
    pad = pad_id_of(tokenizer, model)
    ids = [truncate_left(encode_prompt(tokenizer, p, add_special_tokens=add_special_tokens,
                                       encoder_decoder=enc_dec), max_length, tokenizer.bos_token_id)[0]
           for p in prompts]
    out = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        x, mask = right_pad(chunk, pad, device)
        if enc_dec:
            dec = torch.full((len(chunk), 1), decoder_start_token(model), dtype=torch.long, device=device)
            logits = model(input_ids=x, attention_mask=mask, decoder_input_ids=dec).logits[:, 0]
        else:
            last = torch.tensor([len(s) - 1 for s in chunk], device=device)
            logits = model(input_ids=x, attention_mask=mask).logits[torch.arange(len(chunk), device=device), last]
        logp = torch.log_softmax(logits.double(), -1)
        out.append(-(logp.exp() * logp).sum(-1) / math.log(logits.shape[-1]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64, device=device)
