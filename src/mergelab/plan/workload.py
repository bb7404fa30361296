"""The work of a recipe in tokens: the evaluation files, RegMean's statistics rows, the fine-tuning examples."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from mergelab.evaluate import read_competition_csv
from mergelab.evaluate.batching import encode_prompt
from mergelab.evaluate.loading import load_tokenizer
from mergelab.evaluate.prompting import ShotPool, build_prompt
from mergelab.finetune.train import training_examples
from mergelab.merge.statistics import DEFAULT_MAX_LENGTH, DEFAULT_ROWS, GramOptions, read_inputs


@dataclass
class EvalWorkload:
    """What the evaluator will do, counted with the base's tokenizer."""

    rows_mc: int = 0
    rows_gen: int = 0
    prompt_tokens_mc: int = 0
    choice_tokens: int = 0
    prompt_tokens_gen: int = 0
    max_new_tokens: int = 64
    batches_mc: int = 0
    batches_gen: int = 0
    longest: int = 0                 # longest sequence (prompt + choice, or prompt + new tokens)
    batch_size: int = 16
    max_batch_tokens: int = 32768
    cot_rows: int = 0
    cot_max_new_tokens: int = 0

    @property
    def rows(self) -> int:
        return self.rows_mc + self.rows_gen


def eval_workload(tokenizer_dir: str | os.PathLike, files, options) -> EvalWorkload:
    """Tokenize the evaluation files as the evaluator will see them (prompts built the same way)."""
    tok = load_tokenizer(tokenizer_dir)
    pool = ShotPool.from_csv(options.shots, options.few_shot) if options.few_shot else None
    special = not options.chat
    cap = options.max_length or 10 ** 9
    w = EvalWorkload(max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                     max_batch_tokens=options.max_batch_tokens)
    mc_tokens, gen_tokens = [], []
    for f in files:
        for row in read_competition_csv(f):
            shots = pool.draw(row, options.few_shot, options.seed) if pool else []
            prompt = build_prompt(row, tok, options, shots)
            n = min(len(tok(prompt, add_special_tokens=special)["input_ids"]), cap)
            if row.is_mc:
                c = [len(tok(ch, add_special_tokens=False)["input_ids"]) for ch in row.choices]
                w.rows_mc += 1
                w.prompt_tokens_mc += n
                w.choice_tokens += sum(c)
                mc_tokens.append(n + sum(c))
                w.longest = max(w.longest, n + max(c, default=0))
                if options.cot:
                    w.cot_rows += 1
            else:
                w.rows_gen += 1
                w.prompt_tokens_gen += n
                gen_tokens.append(n + options.max_new_tokens)
                w.longest = max(w.longest, n + options.max_new_tokens)
    if options.cot:
        w.cot_max_new_tokens = options.cot_max_new_tokens

    def batches(sizes: list[int]) -> int:
        if not sizes:
            return 0
        return max(math.ceil(len(sizes) / options.batch_size), math.ceil(sum(sizes) / options.max_batch_tokens))

    w.batches_mc, w.batches_gen = batches(mc_tokens), batches(gen_tokens)
    return w


def statistics_workload(tokenizer_dir: Path, recipe, options) -> tuple[list[int], list[int]]:
    """Prompt tokens and batches of each expert's statistics rows (see :mod:`mergelab.merge.statistics`)."""
    tok = load_tokenizer(tokenizer_dir)
    rows_wanted = int(recipe.method.params.get("rows", DEFAULT_ROWS))
    batch = GramOptions().batch_size
    tokens, batches = [], []
    for e in recipe.experts:
        rows = read_inputs(list(e.data or []), rows_wanted)
        n = sum(min(len(encode_prompt(tok, build_prompt(r, tok, options), add_special_tokens=not options.chat,
                                      encoder_decoder=False)), DEFAULT_MAX_LENGTH) for r in rows)
        tokens.append(n)
        batches.append(math.ceil(len(rows) / batch))
    return tokens, batches


def mean_example_tokens(tokenizer_dir: Path, files: list[Path], max_length: int) -> tuple[float, int]:
    """Mean and longest tokenized length of the fine-tuning examples (prompt + answer + end token)."""
    tok = load_tokenizer(tokenizer_dir)
    lengths = [min(len(tok(prompt + answer, add_special_tokens=False)["input_ids"]) + 1, max_length)
               for prompt, answer, _ in training_examples(files)]
    return (sum(lengths) / len(lengths) if lengths else 0.0), max(lengths, default=0)
