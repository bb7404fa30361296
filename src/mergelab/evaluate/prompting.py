"""Prompts: few-shot examples, chat templates, and chain of thought for multiple choice.

A prompt is built in three steps, each optional:

1. **Few-shot** (``few_shot=k``, ``shots=FILE``): ``k`` solved examples are drawn from a labelled
   CSV, deterministically from ``(seed, row id)``: examples of the row's own ``eval_type`` when
   there are ``k`` of them, else of any type; never an example with the row's own input. A solved
   example shows its input and its answer (for multiple choice the *text* of the right choice).
2. **Chain of thought** (``cot``, multiple choice only): the choices are listed as ``A. …``,
   ``B. …`` (unless the input already uses the letters themselves as choices) and an instruction
   asks for reasoning ending in ``Answer: <letter>``.
3. **Chat** (``chat``): the examples become user/assistant turns and the input the last user
   turn, rendered with the tokenizer's chat template and the generation prompt; without it,
   examples and input are joined with ``shot_separator``.

:func:`extract_choice` reads the chosen option back from a generated chain of thought.
"""
from __future__ import annotations

import random
import re
import string
from pathlib import Path
from typing import Sequence

from mergelab.errors import DataError
from mergelab.evaluate.data import Row, read_competition_csv
from mergelab.evaluate.options import EvalError, EvalOptions

LETTERS = string.ascii_uppercase


def answer_text(row: Row) -> str:
    """The solved answer of a labelled row: the right choice's text, or the reference text."""
    if row.is_mc:
        return row.choices[row.target]  # type: ignore[index]
    return str(row.target)


class ShotPool:
    """Labelled rows to draw few-shot examples from."""

    def __init__(self, rows: Sequence[Row], source: str = "shots"):
        self.rows = [r for r in rows if r.target is not None]
        self.source = source
        self.by_type = {t: [r for r in self.rows if r.eval_type == t]
                        for t in ("multiple_choice", "generation")}

    @classmethod
    def from_csv(cls, path: str | Path, k: int) -> ShotPool:
        pool = cls(read_competition_csv(path), str(path))
        if len(pool.rows) < k:
            raise DataError(f"{path}: {len(pool.rows)} labelled row(s), but few_shot asks for {k} examples",
                            hint="use a CSV with targets, or a smaller --few-shot")
        return pool

    def draw(self, row: Row, k: int, seed: int) -> list[Row]:
        """``k`` examples for ``row``: seeded by ``(seed, row.id)``, so the same on every run."""
        if k <= 0:
            return []
        same = [r for r in self.by_type[row.eval_type] if r.input != row.input]
        pool = same if len(same) >= k else [r for r in self.rows if r.input != row.input]
        if len(pool) < k:
            raise DataError(f"{self.source}: only {len(pool)} labelled example(s) differ from the input of "
                            f"row id {row.id!r}; few_shot asks for {k}")
        rng = random.Random(f"{seed}:{row.eval_type}:{row.id}")  # str seeds hash with sha512: stable
        return rng.sample(pool, k)


def uses_letter_choices(choices: Sequence[str]) -> bool:
    """True when the choices are the letters themselves (``["A", "B", "C", "D"]``)."""
    return len(choices) <= len(LETTERS) and [c.strip() for c in choices] == list(LETTERS[:len(choices)])


def cot_text(row: Row, instruction: str) -> str:
    """The input of a chain-of-thought prompt: the question, its lettered options, the instruction."""
    assert row.choices is not None
    parts = [row.input.rstrip()]
    if not uses_letter_choices(row.choices):
        parts.append("\n".join(f"{LETTERS[i]}. {c.strip()}" for i, c in enumerate(row.choices)))
    parts.append(instruction)
    return "\n\n".join(parts)


def _join(example_input: str, answer: str) -> str:
    if not example_input or example_input[-1].isspace() or not answer or answer[0].isspace():
        return example_input + answer
    return f"{example_input} {answer}"


def build_prompt(row: Row, tokenizer, options: EvalOptions, shots: Sequence[Row] = (),
                 *, cot: bool = False) -> str:
    """The prompt text for ``row`` (see the module docstring). With ``options.chat`` the text is
    already rendered by the chat template and must be tokenised without special tokens."""
    text = cot_text(row, options.cot_instruction) if cot else row.input
    if options.chat:
        messages = []
        for s in shots:
            messages.append({"role": "user", "content": s.input})
            messages.append({"role": "assistant", "content": answer_text(s)})
        messages.append({"role": "user", "content": text})
        return apply_chat_template(tokenizer, messages)
    if not shots:
        return text
    examples = [_join(s.input, answer_text(s)) for s in shots]
    return options.shot_separator.join([*examples, text])


def apply_chat_template(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise EvalError(f"{name}: the tokenizer has no chat template, so --chat cannot be used",
                        hint="drop --chat, or evaluate an instruction-tuned model whose tokenizer has one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# --- reading the answer of a chain of thought -------------------------------------------------

_ANSWER = re.compile(r"answer", re.IGNORECASE)
_LETTER = re.compile(r"^\W*(?:is\W*)?(?:(?:option|choice)\W*)?([A-Z])(?![A-Za-z])")
_INDEX = re.compile(r"^\W*(?:is\W*)?(?:(?:option|choice|number)\W*)?(\d+)(?!\d)", re.IGNORECASE)


def _norm(s: str) -> str:
    return " ".join(s.lower().split()).strip(" .")


def extract_choice(text: str, choices: Sequence[str]) -> tuple[int | None, str]:
    """The option a chain of thought chose: ``(index, how)``; ``how`` is ``letter``, ``text``,
    ``index`` or ``none`` (then ``index`` is ``None`` and the caller falls back to scoring).

    After the last "answer" (any case), in this order: its first line being exactly a choice's
    text; a letter (``Answer: (B)``); the choice whose text starts earliest in it (whole words);
    a 1-based number (``Answer: option 2``). Without such an answer, only unambiguous evidence
    counts: a bare letter on the last line, or exactly one option named by letter at the start
    of a line (``B. ...``), or exactly one choice's text mentioned. A model that echoes the
    option list names several, and gets ``none``.
    """
    n = len(choices)
    letters = LETTERS[:n]
    marks = list(_ANSWER.finditer(text))
    if marks:
        tail = text[marks[-1].end():]
        first = _norm(re.sub(r"^\W*(?:is\b)?", "", tail.strip().split("\n")[0]).strip("*_ "))
        exact = [i for i, c in enumerate(choices) if first and _norm(c) == first]
        if exact:
            return exact[0], "text"
        m = _LETTER.match(tail)
        if m and m.group(1) in letters:
            return letters.index(m.group(1)), "letter"
        found = _earliest_choice_in(tail, choices)
        if found is not None:
            return found, "text"
        m = _INDEX.match(tail)
        if m and 1 <= int(m.group(1)) <= n:
            return int(m.group(1)) - 1, "index"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = re.fullmatch(r"\W*([A-Z])\W*", lines[-1])
        if m and m.group(1) in letters:
            return letters.index(m.group(1)), "letter"
    named = {m.group(1) for m in _OPTION_LINE.finditer(text) if m.group(1) in letters}
    if len(named) == 1:
        return letters.index(named.pop()), "letter"
    mentioned = {i for i, c in enumerate(choices) if len(_norm(c)) > 1 and _find_all(_norm(c), _norm(text))}
    if len(mentioned) == 1 and not named:
        return mentioned.pop(), "text"
    return None, "none"


_OPTION_LINE = re.compile(r"^[ \t]*[\(\[]?([A-Z])[\)\].:][ \t]", re.MULTILINE)


def _find_all(needle: str, hay: str) -> list[int]:
    """Start positions of ``needle`` in ``hay`` as whole words (not inside a longer word)."""
    pattern = r"(?<!\w)" + re.escape(needle) + r"(?!\w)"
    return [m.start() for m in re.finditer(pattern, hay)]


def _earliest_choice_in(segment: str, choices: Sequence[str]) -> int | None:
    """The choice whose text (longer than one character) starts first in ``segment``; on a tie
    the longer one."""
    seg = _norm(segment)
    hits = []
    for i, c in enumerate(choices):
        c = _norm(c)
        starts = _find_all(c, seg) if len(c) > 1 else []
        if starts:
            hits.append((starts[0], -len(c), i))
    return min(hits)[2] if hits else None
