"""Greedy generation, batched: left padding for decoder-only models, stop strings, max_new_tokens.

Rows are grouped into batches (decoder-only models: rows sharing a prefix together, longest
first; T5: by length). Decoder-only models: the prompts are prefilled into one left-padded
key/value cache (:func:`~.prefill.prefill`: no padding waste, shared prefixes once), then a lean greedy
loop takes the argmax token of every unfinished row per step; a row leaves the batch at EOS or
as soon as its text contains a stop string, so finished rows cost nothing. T5 uses transformers'
``generate`` (greedy, one beam, a fresh generation config so that a model's own sampling or
repetition settings never apply) with a per-row stop-string criterion.

The text of a row ends at its first EOS token and is cut at the first occurrence of any stop
string; stopping early changes nothing in the cut text. A row's result is therefore the same
batched or alone; :func:`generate_reference` (transformers' ``generate``, one prompt at a time)
is the definition the tests compare against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from mergelab.evaluate.batching import (
    encode_prompt,
    eos_ids_of,
    is_encoder_decoder,
    model_device,
    pad_id_of,
    past_deadline,
    plan_batches,
    right_pad,
    truncate_left,
)
from mergelab.evaluate.prefill import batch_order, cache_kwarg, prefill, returned_cache
from mergelab.evaluate.scoring import decoder_start_token


@dataclass
class Generation:
    """The output of one row."""

    text: str              # the prediction: decoded, cut at the first stop string, not stripped
    raw: str               # decoded up to EOS, or to the token that completed the first stop string
    new_tokens: int        # tokens in ``raw``
    stopped_by: str        # "eos", "stop" (a stop string) or "length"
    prompt_tokens: int = 0
    truncated: bool = False


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stop_in_partial(text: str, stop: Sequence[str]) -> bool:
    """Whether text decoded from the tokens so far holds a stop string for good.

    Byte-level tokenizers decode an incomplete UTF-8 character at the end as U+FFFD, which the
    next token may complete into another character; those trailing U+FFFD are not looked at.
    """
    text = text.rstrip("\ufffd")
    return any(s in text for s in stop)


def _make_stop_criteria(tokenizer, stop: Sequence[str], offset: int):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopStrings(StoppingCriteria):
        """Per sequence: done once its generated text contains a stop string."""

        def __call__(self, input_ids, scores, **kwargs):
            texts = tokenizer.batch_decode(input_ids[:, offset:], skip_special_tokens=True)
            done = [stop_in_partial(t, stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopStrings()])


def _generation_config(model, tokenizer, max_new_tokens: int):
    from transformers import GenerationConfig

    eos = eos_ids_of(tokenizer, model)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                           eos_token_id=eos or None, pad_token_id=pad_id_of(tokenizer, model))
    if is_encoder_decoder(model):
        cfg.decoder_start_token_id = decoder_start_token(model)   # the start token scoring uses
    return cfg


def _decode(tokenizer, new_ids: list[int], eos: set[int], stop: Sequence[str],
            prompt_tokens: int, truncated: bool) -> Generation:
    stopped_by = "length"
    for k, t in enumerate(new_ids):
        if t in eos:
            new_ids, stopped_by = new_ids[:k], "eos"
            break
    raw = tokenizer.decode(new_ids, skip_special_tokens=True)
    text, hit = cut_at_stop(raw, stop)
    if hit:
        # Keep what is independent of batching: the tokens up to the one that completed the
        # first stop string (a batched sequence stops there; a lone one may run on).
        k = next((k for k in range(1, len(new_ids) + 1)
                  if stop_in_partial(tokenizer.decode(new_ids[:k], skip_special_tokens=True), stop)),
                 len(new_ids))
        new_ids, stopped_by = new_ids[:k], "stop"
        raw = tokenizer.decode(new_ids, skip_special_tokens=True)
    return Generation(text=text, raw=raw, new_tokens=len(new_ids), stopped_by=stopped_by,
                      prompt_tokens=prompt_tokens, truncated=truncated)


def _encode_all(model, tokenizer, prompts, add_special_tokens, max_length, max_new_tokens):
    enc_dec = is_encoder_decoder(model)
    items = []
    for prompt in prompts:
        ids = encode_prompt(tokenizer, prompt, add_special_tokens=add_special_tokens, encoder_decoder=enc_dec)
        limit = None
        if max_length is not None:
            limit = max_length if enc_dec else max(max_length - max_new_tokens, 1)
        items.append(truncate_left(ids, limit, keep_first=tokenizer.bos_token_id))
    return items


def _stop_hit(tokenizer, ids: list[int], stop: Sequence[str]) -> bool:
    return bool(stop) and stop_in_partial(tokenizer.decode(ids, skip_special_tokens=True), stop)


@torch.inference_mode()
def _decode_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                   stop: Sequence[str], pad: int) -> list[list[int]]:
    """Greedy decoding for a decoder-only model: one prefill, then one token per step for every
    unfinished row. A row leaves the batch at EOS or once its text holds a stop string."""
    device = model_device(model)
    pre = prefill(model, prompts, pad)
    cache, mask, lengths = pre.cache, pre.mask, pre.lengths
    logits = pre.last_logits
    out: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))            # batch row -> prompt index
    kwarg = cache_kwarg(model)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1)
        keep = []
        for j, (row, tok) in enumerate(zip(active, nxt.tolist())):
            out[row].append(tok)
            if tok not in eos and not _stop_hit(tokenizer, out[row], stop):
                keep.append(j)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):               # drop finished rows from the batch
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            cache.reorder_cache(idx)
            mask, lengths, nxt = mask[idx], lengths[idx], nxt[idx]
            active = [active[j] for j in keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        res = model(input_ids=nxt.unsqueeze(1), attention_mask=mask,
                    position_ids=(lengths + step).unsqueeze(1), use_cache=True, **{kwarg: cache})
        cache = returned_cache(res)
        logits = res.logits[:, -1, :]
    return out


@torch.inference_mode()
def _generate_batch(model, tokenizer, prompts: list[list[int]], config, stop, eos: set[int]) -> list[list[int]]:
    if not is_encoder_decoder(model):
        return _decode_greedy(model, tokenizer, prompts, config.max_new_tokens, eos, stop,
                              config.pad_token_id)
    # T5: transformers' generate with right-padded encoder inputs (the decoder starts aligned)
    ids, mask = right_pad(prompts, config.pad_token_id, model_device(model))
    criteria = _make_stop_criteria(tokenizer, stop, 1) if stop else None
    seqs = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                          stopping_criteria=criteria)
    return [row[1:].tolist() for row in seqs]   # drop the decoder start token


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                   stop: Sequence[str] = (), batch_size: int = 16, max_batch_tokens: int = 32768,
                   add_special_tokens: bool = True, max_length: int | None = None,
                   deadline: float | None = None,
                   on_batch: Callable[[int], None] | None = None) -> list[Generation | None]:
    """Greedy generation for every prompt, batched; one :class:`Generation` per prompt.

    ``max_length`` caps prompt + new tokens for decoder-only models (prompts lose their beginning)
    and the encoder input for T5. When ``deadline`` (a ``time.monotonic()`` value) passes,
    remaining prompts are not run and come back as ``None``. ``on_batch(n)`` follows each batch.
    """
    items = _encode_all(model, tokenizer, prompts, add_special_tokens, max_length, max_new_tokens)
    config = _generation_config(model, tokenizer, max_new_tokens)
    eos = set(eos_ids_of(tokenizer, model))
    stop = [s for s in stop if s]

    def cost(batch: list[int]) -> int:
        return len(batch) * (max(len(items[i][0]) for i in batch) + max_new_tokens)

    results: list[Generation | None] = [None] * len(items)
    prompts = [ids for ids, _ in items]
    order = None if is_encoder_decoder(model) else batch_order(prompts)
    plan = plan_batches([len(p) for p in prompts], batch_size=batch_size,
                        max_batch_tokens=max_batch_tokens, cost=cost, order=order)
    for batch in plan:
        if past_deadline(deadline):
            break
        outs = _generate_batch(model, tokenizer, [items[i][0] for i in batch], config, stop, eos)
        for i, new_ids in zip(batch, outs):
            ids, truncated = items[i]
            results[i] = _decode(tokenizer, new_ids, eos, stop, len(ids), truncated)
        if on_batch is not None:
            on_batch(len(batch))
    return results


@torch.inference_mode()
def generate_reference(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 64,
                       stop: Sequence[str] = (), add_special_tokens: bool = True,
                       max_length: int | None = None) -> list[Generation]:
    """One prompt at a time, no padding, no early stop: the definition batched generation must match."""
    items = _encode_all(model, tokenizer, prompts, add_special_tokens, max_length, max_new_tokens)
    config = _generation_config(model, tokenizer, max_new_tokens)
    eos = set(eos_ids_of(tokenizer, model))
    device = model_device(model)
    out = []
    for ids, truncated in items:
        x = torch.tensor([ids], device=device)
        seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), generation_config=config)[0]
        new = seq[1:] if is_encoder_decoder(model) else seq[len(ids):]
        out.append(_decode(tokenizer, new.tolist(), eos, stop, len(ids), truncated))
    return out
