"""Merging models whose vocabularies differ: the output tokenizer, and every model's embedding and
output rows aligned to it by token text (the recipe's ``tokenizer: {source: ...}``, mergekit's
``tokenizer_source``).

1. **The output tokenizer** (:func:`plan_vocabulary`): ``base`` — the base's; ``union`` — the
   base's plus, in this order, the ordinary tokens then the added tokens (special or not, with
   their settings) that the experts have and the base lacks, each group by expert (recipe order)
   then by the expert's id, appended with ``add_tokens``; or one expert's. A LoRA expert has the
   base's vocabulary. A token counts as a model's only if its id is below the model's rows
   (padding rows past the tokenizer are dropped, as in mergekit); the output has one row per token
   of the output tokenizer, and ``vocab_size`` in config.json says so.
2. **The rows** (:func:`align_vocab_tasks`): for each embedding and output head, each model's rows
   are permuted to the output ids by token text (``get_vocab()``). A row a model lacks is filled as
   mergekit 0.1.x fills it by default (``PermutedVocabulary``): with the row of the only model that
   has the token, else the base's row if the base has it, else the mean of the rows of the models
   that have it; zero when no model has it (a token only the expert source adds cannot lack one).
   Here "the models" are the base and every expert, also when the method does not read the base
   (mergekit consults the base only when the config names a ``base_model``).
   The merge method then runs on the aligned rows as on any tensor: a token only one model has
   comes out as that model's row under every method that returns the input when all inputs agree.

Memory: aligning reads one model's whole embedding (vocabulary × hidden) at a time, plus its
aligned copy and the filled rows, never a whole model; the aligned copies go to a scratch folder
as safetensors and are merged from there in row blocks like any tensor. A model whose rows are
already in the output order is read in place.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.io.adapter import is_adapter_dir
from mergelab.io.checkpoint import CheckpointReader, TensorSource
from mergelab.merge.inputs import TensorTask, describe_expert, is_vocab_tensor, set_work_bytes, vocab_tensor
from mergelab.recipe import Recipe

__all__ = ["VocabPlan", "plan_vocabulary", "align_vocab_tasks", "save_tokenizer", "TOKENIZER_FILES"]

#: files of a saved tokenizer: the base's copies are replaced when another tokenizer is written
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "chat_template.json")


@dataclass
class VocabPlan:
    """The output vocabulary and each input's token → row map (base first, then the experts)."""

    tokenizer: Any                     # a transformers tokenizer
    size: int                          # rows of the output embedding and head
    vocab: dict[str, int]              # the output tokenizer's token → id
    model_vocabs: list[dict[str, int]]  # per model (base, experts): token → row
    save: bool                         # write the tokenizer (False: the base's files, copied as they are)
    warnings: list[str] = field(default_factory=list)


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def plan_vocabulary(recipe: Recipe, base_path: Path, expert_paths: Sequence[Path],
                    base: CheckpointReader, experts: Sequence[TensorSource],
                    warn: Callable[[str], None] | None = None) -> VocabPlan | None:
    """The output tokenizer of ``recipe.tokenizer`` and every model's vocabulary (None without the
    section: the models must share the base's vocabulary, merged by index)."""
    if recipe.tokenizer is None:
        return None
    warnings: list[str] = []
    try:
        base_tok = _load_tokenizer(base_path)
    except Exception as exc:   # noqa: BLE001 — transformers raises many kinds
        raise RecipeError(f"tokenizer: the base's tokenizer in {base_path} cannot be loaded ({exc})",
                          hint="the base folder needs its tokenizer files (tokenizer.json, tokenizer_config.json)") \
            from None
    base_vocab = base_tok.get_vocab()
    toks: list[Any] = [base_tok]
    vocabs: list[dict[str, int]] = [base_vocab]
    for i, (path, src) in enumerate(zip(expert_paths, experts)):
        if getattr(src, "adapter", None) is not None or is_adapter_dir(path):
            toks.append(None)   # a LoRA adapter keeps the base's vocabulary
            vocabs.append(base_vocab)
            continue
        try:
            tok = _load_tokenizer(path)
        except Exception:   # noqa: BLE001
            tok = None
        if tok is None:
            rows = _rows(src)
            if rows != _rows(base):
                raise RecipeError(f"tokenizer: {describe_expert(i, src)} has no tokenizer that loads, and its "
                                  f"vocabulary ({rows} rows) is not the base's ({_rows(base)})",
                                  hint="add the expert's tokenizer files to its folder")
            warnings.append(f"{describe_expert(i, src)} has no tokenizer that loads; taken to have the base's")
            vocabs.append(base_vocab)
        else:
            vocabs.append(tok.get_vocab())
        toks.append(tok)

    source = recipe.tokenizer.source
    named = recipe.tokenizer_expert()
    save = True
    if named is not None:
        if toks[named + 1] is None:
            lora = getattr(experts[named], "adapter", None) is not None or is_adapter_dir(expert_paths[named])
            raise RecipeError(f"tokenizer.source: experts[{named}] ({expert_paths[named]}) "
                              + ("is a LoRA adapter, which keeps the base's tokenizer" if lora
                                 else "has no tokenizer that loads"),
                              hint="write tokenizer: {source: base}, or name a full expert")
        out_tok = _load_tokenizer(expert_paths[named])   # a fresh copy, saved as it is
    elif source == "union":
        out_tok = _union(base_path, toks, [_rows(base)] + [_rows(e) for e in experts])
    else:   # base, or the base named by its path / Hub id
        out_tok, save = base_tok, False
    vocab = out_tok.get_vocab()
    for w in warnings:
        if warn is not None:
            warn(w)
    return VocabPlan(out_tok, max(vocab.values(), default=-1) + 1, vocab, vocabs, save, warnings)


def _rows(src: TensorSource) -> int | None:
    name = vocab_tensor(src)
    return None if name is None else int(src.shape(name)[0])


def _union(base_path: Path, toks: list, rows: list[int | None]):
    """The base's tokenizer (a fresh copy) plus the tokens the experts add: the ordinary ones, then
    the added ones, each by expert then by id (deterministic, whatever the vocabularies' order)."""
    out = _load_tokenizer(base_path)
    seen = set(out.get_vocab())
    plain: list[str] = []
    added: list[Any] = []
    for tok, n in zip(toks[1:], rows[1:]):
        if tok is None:
            continue
        infos = {info.content: info for info in tok.added_tokens_decoder.values()}
        for text, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if text in seen or (n is not None and idx >= n):
                continue
            seen.add(text)
            if text in infos:
                added.append(infos[text])
            else:
                plain.append(text)
    for t in plain + added:   # one at a time: each gets the next id
        out.add_tokens(t)
    return out


def _perm(vocab: dict[str, int], out_vocab: dict[str, int], size: int, rows: int) -> torch.Tensor:
    """Output id → the model's row (-1 where the model lacks the token or its row)."""
    p = torch.full((size,), -1, dtype=torch.long)
    for text, new in out_vocab.items():
        old = vocab.get(text)
        if old is not None and old < rows:
            p[new] = old
    return p


def align_vocab_tasks(tasks: list[TensorTask], plan: VocabPlan, scratch: Path, opened: list) -> None:
    """Point every embedding / output-head task at its inputs' rows aligned to ``plan``'s vocabulary.

    An input already in the output order (same rows, identity map) is read in place; any other is
    written to ``scratch`` (one safetensors file per model and tensor) and read from there. Rows a
    model lacks are filled by the rule of the module docstring. The readers opened are appended to
    ``opened``."""
    from safetensors.torch import save_file

    for task in tasks:
        if not (task.floating and is_vocab_tensor(task.name) and len(task.shape) == 2):
            continue
        size = plan.size
        perms = [_perm(v, plan.vocab, size, int(src.shape(n)[0]))
                 for v, (src, n) in zip(plan.model_vocabs, task.inputs)]
        lacking = torch.nonzero(torch.stack([p < 0 for p in perms]).any(0)).flatten().tolist()
        fill = _fill_rows(task, perms, lacking)
        new_inputs = []
        for i, ((src, n), p) in enumerate(zip(task.inputs, perms)):
            if int(src.shape(n)[0]) == size and bool((p == torch.arange(size)).all()):
                new_inputs.append((src, n))
                continue
            t = src.get(n)
            out = torch.empty((size, *t.shape[1:]), dtype=t.dtype)
            have = p >= 0
            out[have] = t[p[have]]
            del t
            if lacking:
                idx = torch.tensor(lacking, dtype=torch.long)
                miss = ~have[idx]
                out[idx[miss]] = fill[miss].to(out.dtype)
            file = scratch / f"{i}-{task.name}.safetensors"
            save_file({task.name: out.contiguous()}, str(file))
            del out
            reader = CheckpointReader(file)
            opened.append(reader)
            new_inputs.append((reader, task.name))
        task.inputs = new_inputs
        set_work_bytes(task)


def _fill_rows(task: TensorTask, perms: list[torch.Tensor], lacking: list[int]) -> torch.Tensor:
    """float32 rows for the output ids in ``lacking`` (some model lacks them): the only holder's
    row, else the base's (input 0), else the holders' mean; zero if none has the token."""
    cols = task.shape[1]
    fill = torch.zeros((len(lacking), cols), dtype=torch.float32)
    for k, r in enumerate(lacking):
        holders = [i for i, p in enumerate(perms) if p[r] >= 0]
        if not holders:
            continue
        if len(holders) > 1 and 0 in holders:
            holders = [0]
        rows = [_row(task, perms, i, r) for i in holders]
        fill[k] = rows[0] if len(rows) == 1 else torch.stack(rows).mean(0)
    return fill


def _row(task: TensorTask, perms: list[torch.Tensor], i: int, r: int) -> torch.Tensor:
    """Input ``i``'s row of output id ``r``, in float32."""
    src, n = task.inputs[i]
    j = int(perms[i][r])
    return src.get_rows(n, j, j + 1)[0].float()


def save_tokenizer(plan: VocabPlan, out_dir: Path, config_file: Path) -> list[str]:
    """Write ``plan``'s tokenizer into ``out_dir`` (replacing the base's tokenizer files) when it is
    not the base's, and set ``vocab_size`` in config.json; return the tokenizer files written."""
    import json

    written: list[str] = []
    if plan.save:
        for name in TOKENIZER_FILES:
            (out_dir / name).unlink(missing_ok=True)
        before = set(os.listdir(out_dir))
        plan.tokenizer.save_pretrained(str(out_dir))
        written = sorted(set(os.listdir(out_dir)) - before)
    if config_file.is_file():
        cfg = json.loads(config_file.read_text(encoding="utf-8"))
        target = cfg["text_config"] if "vocab_size" not in cfg and isinstance(cfg.get("text_config"), dict) else cfg
        if target.get("vocab_size") != plan.size:
            target["vocab_size"] = plan.size
            config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written



def require_index_aligned(recipe: Recipe, base: CheckpointReader, expert_paths: Sequence[Path],
                          experts: Sequence[TensorSource], where: str) -> None:
    """Refuse a ``tokenizer`` section that would change the rows, for a merge (``where``) that
    merges them by index: every model must have the base's tokens at the base's ids."""
    plan = plan_vocabulary(recipe, Path(base.path), expert_paths, base, experts)
    if plan is None:
        return
    rows = _rows(base)
    same = plan.size == rows and not plan.save and all(
        all(v.get(t) == i for t, i in plan.vocab.items()) for v in plan.model_vocabs)
    if not same:
        raise RecipeError(f"tokenizer: {where} merges embedding rows by index, and these models' vocabularies "
                          "differ from the base's (other tokens, or the same tokens at other ids)",
                          hint="run the full merge (mergelab merge / run), which aligns the rows by token")
