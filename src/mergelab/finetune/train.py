"""The ``finetune:`` stage of a recipe: LoRA training (PEFT) on competition-format CSV data.

::

    finetune:
      when: after_merge          # or before_merge
      data:
        - {path: train.csv, licence: cc-by-4.0}
      steps: 200
      lr: 2.0e-4
      rank: 8
      alpha: 16
      target_modules: [q_proj, v_proj]
      batch_size: 8
      max_length: 512
      seed: 0
      expert: {weight: 1.0}      # before_merge only: the adapter's parameters as an expert

* ``before_merge`` trains a LoRA adapter on the **base** model; the adapter joins the merge as one
  more expert (with the per-expert parameters in ``expert:``), so every merge method sees it as
  ``base + ΔW``. (Fine-tuning one of the experts is not supported: train it separately.)
* ``after_merge`` trains a LoRA adapter on the **merged** model (``output.format: full`` only) and
  folds it into the weights with the merge engine (task arithmetic with weight 1: ``W + ΔW``),
  so the run's ``model/`` is a plain model folder; the adapter itself stays in ``finetune/``.

Data rows are ``(input, answer)`` pairs: for multiple choice the answer is the text of the target
choice, for generation the target text followed by the end-of-sequence token; the loss covers the
answer tokens only (:mod:`mergelab.finetune.loop`). A sequence longer than ``max_length`` loses
the start of its prompt. Every data file declares its licence, checked against an allow-list of
open licences (:func:`check_data_licences`): a competition run refuses anything else.

Everything random (LoRA initialisation, row order) comes from ``seed``: on one device with one
torch version the same section writes the same adapter bytes.
"""
from __future__ import annotations

import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from mergelab.errors import DataError, RecipeError, RuleCheckError
from mergelab.evaluate import read_competition_csv
from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.finetune.loop import encode_example, run_steps
from mergelab.hub.rules import OPEN_LICENCES
from mergelab.recipe.sections import FinetuneSection, parse_finetune_section
from mergelab.util import sha256_file

#: Open licences accepted for training data: the model allow-list of :mod:`mergelab.hub.rules`
#: (open-source and Creative Commons licences) plus open data licences.
OPEN_DATA_LICENCES = frozenset({"cdla-permissive-1.0", "cdla-permissive-2.0", "cdla-sharing-1.0",
                                "odc-by-1.0", "odbl-1.0", "pddl-1.0", "cc-by-sa-2.0", "cc-by-sa-2.5",
                                "cc-by-1.0", "public-domain"})
#: Licences that forbid commercial use or derivatives: not open in the competition's sense.
_CLOSED_HINTS = ("-nc", "-nd", "proprietary", "other", "unknown", "custom")


class DataLicenceError(RuleCheckError):
    """A fine-tuning data file's licence is not on the open allow-list (a competition run stops)."""


def classify_data_licence(licence: str) -> tuple[bool, str]:
    """``(open, why)`` for a declared data licence id."""
    key = licence.strip().lower()
    if key in OPEN_LICENCES or key in OPEN_DATA_LICENCES:
        return True, f"{key} (open licence)"
    if any(h in key for h in _CLOSED_HINTS):
        return False, f"{key} is not an open licence (non-commercial, no-derivatives, proprietary or unknown)"
    return False, f"{key} is not on mergelab's allow-list of open licences"


def check_data_licences(section: FinetuneSection, *, rules: bool = True,
                        warn: Callable[[str], None] | None = None) -> list[dict]:
    """Check every data file's licence; returns one record per file (path, licence, sha256, open).

    With ``rules`` a file whose licence is not open raises :class:`DataLicenceError`; without,
    ``warn`` is told and the run goes on (outside the competition).
    """
    records, bad = [], []
    for i, d in enumerate(section.data):
        ok, why = classify_data_licence(d.licence)
        records.append({"path": str(d.path), "licence": d.licence, "open": ok, "sha256": sha256_file(d.path)})
        if not ok:
            bad.append(f"finetune.data[{i}] {d.path.name}: {why}")
    if bad and rules:
        raise DataLicenceError("fine-tuning data must be openly licensed for the competition: " + "; ".join(bad),
                               hint="use openly licensed data (e.g. cc-by-4.0, apache-2.0, odc-by), or pass "
                                    "--no-rules for a run outside the competition")
    for line in bad:
        if warn is not None:
            warn(f"outside the competition rules: {line}")
    return records


# ---------------------------------------------------------------------------------------- training


def training_examples(files: list[Path]) -> list[tuple[str, str, bool]]:
    """``(prompt, answer, add_eos)`` of competition CSV rows; every row needs its target."""
    out = []
    for f in files:
        for row in read_competition_csv(f):
            if row.target is None or str(row.target) == "":
                raise DataError(f"{f}: row {row.id} has no target, so it cannot be trained on",
                                hint="fine-tuning data needs the target column filled")
            if row.is_mc:
                out.append((row.input, row.choices[int(row.target)], False))
            else:
                out.append((row.input, str(row.target), True))
    return out


@dataclass
class FinetuneResult:
    adapter_dir: Path
    losses: list[float] = field(default_factory=list)
    steps_done: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.steps_done == self.steps

    @property
    def stopped_by_deadline(self) -> bool:
        """Only the deadline ends training before ``steps``."""
        return not self.complete


def _encode(tokenizer, prompt: str, answer: str, add_eos: bool, max_length: int) -> tuple[list[int], list[int]]:
    ids, labels = encode_example(tokenizer, prompt, answer, add_eos=add_eos)
    if len(ids) > max_length:      # keep the answer: drop the start of the prompt
        ids, labels = ids[-max_length:], labels[-max_length:]
    return ids, labels


def _lr_at(step: int, section: FinetuneSection) -> float:
    """Linear warm-up over ``warmup`` steps, then constant."""
    if step < section.warmup:
        return section.lr * (step + 1) / section.warmup
    return section.lr


def train_adapter(model_dir: str | Path, section: FinetuneSection, out_dir: str | Path, *,
                  device: str = "auto", deadline: float | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> FinetuneResult:
    """Train a LoRA adapter on ``model_dir`` with ``section``; save it (PEFT layout) to ``out_dir``.

    ``deadline`` (a ``time.monotonic()`` value) stops training after the step during which it
    passes; the adapter trained so far is saved and ``stopped_by_deadline`` says so.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    t_start = time.perf_counter()
    examples = training_examples([d.path for d in section.data])
    model, tokenizer = load_model_and_tokenizer(model_dir, device=device, dtype=None)
    dev = next(model.parameters()).device
    encoded = [_encode(tokenizer, p, a, eos, section.max_length) for p, a, eos in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(section.seed)   # LoRA A initialisation draws from the global generator
    cfg = LoraConfig(r=section.rank, lora_alpha=section.alpha, target_modules=list(section.target_modules),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            peft_model = get_peft_model(model, cfg)
        except ValueError as exc:
            raise RecipeError(f"finetune.target_modules: {exc}",
                              hint="name linear layers of this model, e.g. q_proj, v_proj") from None
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=section.lr, weight_decay=0.0)
    result = FinetuneResult(Path(out_dir), steps=section.steps)
    peft_model.train()
    result.losses = run_steps(peft_model, opt, encoded, steps=section.steps, batch_size=section.batch_size,
                              rng=random.Random(section.seed), lr_at=lambda step: _lr_at(step, section),
                              pad_id=pad_id, device=dev, on_step=on_step,
                              stop=lambda: deadline is not None and time.monotonic() >= deadline)
    result.steps_done = len(result.losses)
    peft_model.eval()
    peft_model.peft_config["default"].base_model_name_or_path = None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out), save_embedding_layers=False)
    _strip_readme(out)
    result.seconds = time.perf_counter() - t_start
    return result


def _strip_readme(out: Path) -> None:
    """PEFT writes a model card with library versions; the adapter's bytes should not depend on it."""
    card = out / "README.md"
    if card.is_file():
        card.unlink()


__all__ = ["FinetuneSection", "DataLicenceError", "parse_finetune_section", "check_data_licences",
           "classify_data_licence", "train_adapter", "training_examples", "FinetuneResult"]
