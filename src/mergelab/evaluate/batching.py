"""Shared helpers: tokenising prompts, grouping rows of similar length into batches, deadlines."""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch


def is_encoder_decoder(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_id_of(tokenizer, model=None) -> int:
    """The id used for padding: the tokenizer's pad token, else EOS, else 0 (always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id,
                getattr(getattr(model, "config", None), "pad_token_id", None)):
        if isinstance(tid, int):
            return tid
    return 0


def eos_ids_of(tokenizer, model) -> list[int]:
    """Every id that ends generation: the model's generation config, else the tokenizer's EOS."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


def encode_prompt(tokenizer, text: str, *, add_special_tokens: bool, encoder_decoder: bool) -> list[int]:
    """Token ids of a prompt.

    With ``add_special_tokens`` the tokenizer adds what it adds by default (a BOS for Llama-like
    tokenizers, ``</s>`` for T5's encoder). A decoder-only prompt never ends in an EOS the
    tokenizer appended (the continuation would follow an end-of-text). An empty prompt becomes
    BOS (else EOS): a decoder needs one position to predict the first token of a choice.
    """
    ids = list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    if add_special_tokens and not encoder_decoder and ids and tokenizer.eos_token_id is not None \
            and ids[-1] == tokenizer.eos_token_id:
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not plain or plain[-1] != tokenizer.eos_token_id:
            ids = ids[:-1]
    if not ids:
        fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [fallback if fallback is not None else 0]
    return ids


def encode_continuation(tokenizer, text: str) -> list[int]:
    """Token ids of a choice, tokenised on its own (no special tokens), to be joined after a prompt."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_left(ids: list[int], limit: int | None, keep_first: int | None = None) -> tuple[list[int], bool]:
    """Keep the last ``limit`` ids (the end of a prompt holds the question); keep a leading BOS.

    Returns ``(ids, truncated)``.
    """
    if limit is None or len(ids) <= limit:
        return ids, False
    limit = max(limit, 1)
    if keep_first is not None and ids and ids[0] == keep_first and limit > 1:
        return [ids[0]] + ids[len(ids) - (limit - 1):], True
    return ids[len(ids) - limit:], True


def plan_batches(lengths: Sequence[int], *, batch_size: int, max_batch_tokens: int,
                 cost: Callable[[list[int]], int], order: Sequence[int] | None = None) -> list[list[int]]:
    """Group item indices into batches of consecutive items of ``order``.

    ``order`` defaults to decreasing length (ties by index, so the plan is deterministic). Batches
    are filled greedily while they have fewer than ``batch_size`` items and ``cost(batch)`` (the
    padded tokens it would hold) stays within ``max_batch_tokens``. A single item always fits.
    """
    if order is None:
        order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) >= batch_size or cost(current + [i]) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def past_deadline(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``[B, max_len]`` with the sequences aligned to the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: Sequence[Sequence[int]], pad: int, device, width: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of shape ``[B, width]`` with the sequences aligned to the left."""
    width = max((len(s) for s in seqs), default=0) if width is None else width
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, :len(s)] = 1
    return ids.to(device), mask.to(device)
