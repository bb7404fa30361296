"""Multiple choice by log-probability, batched across rows and choices.

The score of a choice ``c`` after an input ``x`` is ``sum_t log p(c_t | x, c_<t)``: the input and
the choice are tokenised separately (the input with the tokenizer's special tokens, the choice
without), then joined. The prediction is the choice with the highest score, optionally divided by
the choice's token or character count (``length_norm``).

Decoder-only models run each batch in two steps: the inputs once (:func:`~.prefill.prefill`:
chunks of similar length, joined into one left-padded cache), keeping the logits of each input's
last token (which score every choice's first token); then the choices of all rows in one forward
pass, the cache repeated over each row's choices, with explicit position ids so that padding
changes nothing. Encoder–decoder models (T5) encode each
input once and score all its choices as decoder continuations of the shared encoder output.

:func:`score_multiple_choice_reference` is the plain definition, one choice at a time, used by
the tests (batched = reference to 1e-4) and the benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mergelab.evaluate.batching import (
    encode_continuation,
    encode_prompt,
    is_encoder_decoder,
    model_device,
    pad_id_of,
    past_deadline,
    plan_batches,
    right_pad,
    truncate_left,
)
from mergelab.evaluate.prefill import (
    batch_order,
    cache_kwarg,
    chunk_by_length,
    has_layer_tensors,
    prefill,
    rows_of,
)


@dataclass
class ChoiceScores:
    """Scores of one row's choices."""

    logprobs: list[float]             # summed log-probability of each choice
    n_tokens: list[int]               # tokens in each choice
    n_chars: list[int]                # characters in each choice
    prompt_tokens: int = 0            # tokens of the (possibly truncated) input
    truncated: bool = False           # the input lost its beginning to fit max_length
    normalized: list[float] = field(default_factory=list)  # what the prediction ranks

    def best(self) -> int:
        """Index of the highest ranked choice (the first one on ties)."""
        values = self.normalized or self.logprobs
        return max(range(len(values)), key=lambda i: (values[i], -i))


def normalize_scores(s: ChoiceScores, length_norm: str) -> ChoiceScores:
    """Fill ``s.normalized``: ``none`` → the sums; ``tokens``/``chars`` → per token/character."""
    if length_norm == "none":
        s.normalized = list(s.logprobs)
    elif length_norm == "tokens":
        s.normalized = [lp / max(n, 1) for lp, n in zip(s.logprobs, s.n_tokens)]
    elif length_norm == "chars":
        s.normalized = [lp / max(n, 1) for lp, n in zip(s.logprobs, s.n_chars)]
    else:
        raise ValueError(f"unknown length_norm {length_norm!r}")
    return s


def _tokenize(model, tokenizer, prompts, choices, add_special_tokens, max_length):
    enc_dec = is_encoder_decoder(model)
    items = []
    for prompt, row_choices in zip(prompts, choices, strict=True):
        if not row_choices:
            raise ValueError("every multiple-choice row needs at least one choice")
        p = encode_prompt(tokenizer, prompt, add_special_tokens=add_special_tokens, encoder_decoder=enc_dec)
        cs = [encode_continuation(tokenizer, c) for c in row_choices]
        limit = None
        if max_length is not None:
            limit = max_length if enc_dec else max(max_length - max(len(c) for c in cs), 1)
        p, truncated = truncate_left(p, limit, keep_first=tokenizer.bos_token_id)
        items.append((p, cs, truncated))
    return items


def _finish(item, logprobs, row_choices, length_norm) -> ChoiceScores:
    p, cs, truncated = item
    s = ChoiceScores(logprobs=[float(v) for v in logprobs], n_tokens=[len(c) for c in cs],
                     n_chars=[len(c) for c in row_choices], prompt_tokens=len(p), truncated=truncated)
    return normalize_scores(s, length_norm)


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits)[targets]`` in float32 without materialising the full log-softmax."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.inference_mode()
def _score_batch_decoder(model, batch, pad: int) -> list[list[float]]:
    """Scores of the choices of ``batch`` = ``[(prompt_ids, [choice_ids, ...]), ...]``."""
    device = model_device(model)
    pre = prefill(model, [p for p, _ in batch], pad)

    owners = [r for r, (_, cs) in enumerate(batch) for _ in cs]
    flat = [c for _, cs in batch for c in cs]
    scores = torch.zeros(len(flat), dtype=torch.float32, device=device)
    owner_t = torch.tensor(owners, dtype=torch.long, device=device)
    nonempty = torch.tensor([len(c) > 0 for c in flat], device=device)
    first_tok = torch.tensor([c[0] if c else 0 for c in flat], dtype=torch.long, device=device)
    scores += torch.where(nonempty, _token_logprobs(pre.last_logits[owner_t], first_tok), 0.0)

    # Every token of a choice but the last is fed to predict the next one. Choices run in chunks
    # of similar length (padding within 25 %), each on its rows' cache.
    fed = sorted((k for k, c in enumerate(flat) if len(c) > 1), key=lambda k: (-len(flat[k]), k))
    if has_layer_tensors(pre.cache):
        chunks = chunk_by_length([len(flat[k]) - 1 for k in fed], 0.25)
    else:  # without per-layer tensors the cache can serve one pass only
        chunks = [list(range(len(fed)))] if fed else []
    for chunk in chunks:
        ks = [fed[j] for j in chunk]
        width = len(flat[ks[0]]) - 1
        rows = owner_t[torch.tensor(ks, device=device)]
        feed, feed_mask = right_pad([flat[k][:-1] for k in ks], pad, device, width)
        target, _ = right_pad([flat[k][1:] for k in ks], pad, device, width)
        pos = pre.lengths[rows].unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
        with rows_of(pre.cache, rows) as cache:
            out = model(input_ids=feed, attention_mask=torch.cat([pre.mask[rows], feed_mask], dim=1),
                        position_ids=pos, use_cache=True, **{cache_kwarg(model): cache})
        scores[torch.tensor(ks, device=device)] += (_token_logprobs(out.logits, target) * feed_mask).sum(-1)
        del out
    del pre
    result, k = [], 0
    for _, cs in batch:
        result.append(scores[k:k + len(cs)].tolist())
        k += len(cs)
    return result


def decoder_start_token(model) -> int:
    """The first decoder token of an encoder–decoder model (generation config, else config, else pad)."""
    for src in (getattr(model, "generation_config", None), model.config):
        tid = getattr(src, "decoder_start_token_id", None)
        if isinstance(tid, int):
            return tid
    return model.config.pad_token_id or 0


@torch.inference_mode()
def _score_batch_seq2seq(model, batch, pad: int) -> list[list[float]]:
    """T5: encode each input once, then score all choices as decoder continuations."""
    from transformers.modeling_outputs import BaseModelOutput

    device = model_device(model)
    ids, mask = right_pad([p for p, _ in batch], pad, device)
    hidden = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    owners = [r for r, (_, cs) in enumerate(batch) for _ in cs]
    flat = [c for _, cs in batch for c in cs]
    scores = torch.zeros(len(flat), dtype=torch.float32, device=device)
    width = max(len(c) for c in flat)
    if width > 0:
        owner_t = torch.tensor(owners, dtype=torch.long, device=device)
        start = decoder_start_token(model)
        feed, _ = right_pad([[start] + c[:-1] for c in flat], pad, device, width)
        target, target_mask = right_pad(flat, pad, device, width)
        out = model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden[owner_t]),
                    attention_mask=mask[owner_t], decoder_input_ids=feed, use_cache=False)
        scores += (_token_logprobs(out.logits, target) * target_mask).sum(-1)
    result, k = [], 0
    for _, cs in batch:
        result.append(scores[k:k + len(cs)].tolist())
        k += len(cs)
    return result


def score_multiple_choice(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
                          batch_size: int = 16, max_batch_tokens: int = 32768,
                          length_norm: str = "none", add_special_tokens: bool = True,
                          max_length: int | None = None, deadline: float | None = None,
                          on_batch: Callable[[int], None] | None = None) -> list[ChoiceScores | None]:
    """Score ``choices[i]`` as continuations of ``prompts[i]``, batched; one result per row.

    Rows are ordered (decoder-only models: rows sharing a prefix together, longest first; T5: by
    length) and grouped into batches of at most ``batch_size`` rows and ``max_batch_tokens``
    padded tokens (inputs plus all choices with the cache they attend to); each input is
    computed once and shared by its choices. ``add_special_tokens=False`` is for
    prompts that already hold them (chat templates). ``max_length`` caps input + choice tokens
    (inputs lose their beginning). When ``deadline`` (a ``time.monotonic()`` value) passes,
    remaining rows are not scored and come back as ``None``. ``on_batch(n)`` is called after
    each batch of ``n`` rows.
    """
    items = _tokenize(model, tokenizer, prompts, choices, add_special_tokens, max_length)
    score_batch = _score_batch_seq2seq if is_encoder_decoder(model) else _score_batch_decoder
    pad = pad_id_of(tokenizer, model)

    def cost(batch: list[int]) -> int:
        width = max(len(items[i][0]) for i in batch)
        n_choices = sum(len(items[i][1]) for i in batch)
        longest = max(len(c) for i in batch for c in items[i][1])
        # inputs once, then every choice with the input (cache or encoder output) it attends to
        return width * len(batch) + n_choices * (width + longest)

    results: list[ChoiceScores | None] = [None] * len(items)
    prompts = [p for p, _, _ in items]
    order = None if is_encoder_decoder(model) else batch_order(prompts)
    plan = plan_batches([len(p) for p in prompts], batch_size=batch_size,
                        max_batch_tokens=max_batch_tokens, cost=cost, order=order)
    for batch in plan:
        if past_deadline(deadline):
            break
        scores = score_batch(model, [(items[i][0], items[i][1]) for i in batch], pad)
        for i, s in zip(batch, scores):
            results[i] = _finish(items[i], s, choices[i], length_norm)
        if on_batch is not None:
            on_batch(len(batch))
    return results


@torch.inference_mode()
def score_multiple_choice_reference(model, tokenizer, prompts: Sequence[str],
                                    choices: Sequence[Sequence[str]], *, length_norm: str = "none",
                                    add_special_tokens: bool = True,
                                    max_length: int | None = None) -> list[ChoiceScores]:
    """The definition, one row and one choice at a time, no padding and no cache.

    Decoder-only: one forward pass over ``input + choice`` per choice, summing the log-probabilities
    of the choice's tokens. T5: the input through the encoder and the choice as decoder labels.
    """
    items = _tokenize(model, tokenizer, prompts, choices, add_special_tokens, max_length)
    return [_finish(item, [float(v) for v in _reference_logprobs(model, item)], row_choices, length_norm)
            for item, row_choices in zip(items, choices)]


def _reference_logprobs(model, item) -> list[torch.Tensor]:
    """The summed log-probability of each choice of one tokenised row, as tensors (autograd flows
    when it is enabled)."""
    device = model_device(model)
    enc_dec = is_encoder_decoder(model)
    p, cs, _ = item
    logprobs = []
    for c in cs:
        if not c:
            logprobs.append(torch.zeros((), device=device))
            continue
        if enc_dec:
            dec = torch.tensor([[decoder_start_token(model)] + c[:-1]], device=device)
            logits = model(input_ids=torch.tensor([p], device=device), decoder_input_ids=dec).logits[0]
        else:
            ids = torch.tensor([p + c], device=device)
            logits = model(input_ids=ids).logits[0, len(p) - 1: len(p) + len(c) - 1]
        logprobs.append(_token_logprobs(logits, torch.tensor(c, device=device)).sum())
    return logprobs


def choice_score_tensors(model, tokenizer, prompts: Sequence[str], choices: Sequence[Sequence[str]], *,
                         length_norm: str = "none", add_special_tokens: bool = True,
                         max_length: int | None = None) -> list[torch.Tensor]:
    """:func:`score_multiple_choice_reference`'s ranked scores (``normalized``) as one tensor per row,
    differentiable in the model's weights: for learning merge coefficients by gradient."""
    items = _tokenize(model, tokenizer, prompts, choices, add_special_tokens, max_length)
    out = []
    for (p, cs, truncated), row_choices in zip(items, choices):
        s = ChoiceScores(logprobs=_reference_logprobs(model, (p, cs, truncated)), n_tokens=[len(c) for c in cs],
                         n_chars=[len(c) for c in row_choices])
        out.append(torch.stack(normalize_scores(s, length_norm).normalized))
    return out
