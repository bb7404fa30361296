"""Competition CSV files: reading (strictly validated) and writing submission files.

The format (see COMPETITION.md): a header, then one row per example with the columns ``id``,
``input``, ``target`` (may be absent or empty in a test file), ``answer_choices`` (a Python/JSON
list literal of strings; empty for generation) and ``eval_type`` (``multiple_choice`` or
``generation``). Fields may span several lines (standard CSV quoting).
"""
from __future__ import annotations

import ast
import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from mergelab.errors import DataError
from mergelab.io.jsonfile import clip

EVAL_TYPES = ("multiple_choice", "generation")
REQUIRED_COLUMNS = ("id", "input", "eval_type")
OPTIONAL_COLUMNS = ("target", "answer_choices")
SUBMISSION_COLUMNS = ("id", "prediction", "dummy_field")
_COLUMN_NAME = re.compile(r"[\w .-]{0,40}")


@dataclass(frozen=True)
class Row:
    """One example of a competition file.

    ``target`` is the reference: for multiple choice the index of the right choice (an ``int``),
    for generation the reference text; ``None`` when the file has none (a test file).
    ``choices`` is the parsed ``answer_choices`` list, or ``None`` when the field is empty.
    ``line`` is the line of the file where the row starts (for messages).
    """

    id: str
    input: str
    target: int | str | None
    choices: list[str] | None
    eval_type: str
    line: int = 0

    @property
    def is_mc(self) -> bool:
        return self.eval_type == "multiple_choice"


#: answer_choices longer than this are refused (a list of answers is a few hundred characters)
MAX_CHOICES_CHARS = 1_000_000
MAX_CHOICES = 10_000
#: a Python literal that is not a flat list of strings is parsed with ast only up to this length
_MAX_AST_CHARS = 10_000
#: the longest field a CSV row may hold (long few-shot prompts exceed csv's default of 128 KiB)
MAX_FIELD_CHARS = 64 * 1024 * 1024

_PY_STR = r"""[rRuU]?(?:'(?:[^'\\\n]|\\[\s\S])*'|"(?:[^"\\\n]|\\[\s\S])*")"""
_PY_LIST = re.compile(rf"\s*\[\s*(?:{_PY_STR}\s*,\s*)*(?:{_PY_STR}\s*)?\]\s*")
_PY_STR_RE = re.compile(_PY_STR)


def parse_choices(text: str) -> list[str]:
    """Parse an ``answer_choices`` literal into a list of strings, without ever calling ``eval``.

    JSON (``["a", "b"]``) is tried first, then a Python list of string literals (``['a', "b"]``),
    recognised by a regular expression and each string read by :func:`ast.literal_eval`; any other
    Python literal (a tuple, or a list holding something else) goes through
    :func:`ast.literal_eval` only when it is short, so time and memory stay bounded by the text's
    length. Raises ``ValueError`` saying why.
    """
    if len(text) > MAX_CHOICES_CHARS:
        raise ValueError(f"answer_choices is {len(text):,} characters long; at most "
                         f"{MAX_CHOICES_CHARS:,} are read")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = _python_literal(text)
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise ValueError(f"answer_choices must be a list of strings, got a {type(value).__name__}: "
                         f"{_clip(text)}")
    if not value:
        raise ValueError("answer_choices is an empty list")
    if len(value) > MAX_CHOICES:
        raise ValueError(f"answer_choices has {len(value):,} items; at most {MAX_CHOICES:,} are read")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ValueError(f"answer_choices must hold only strings; found {clip(bad[0])} "
                         f"({type(bad[0]).__name__})")
    return value


def _python_literal(text: str):
    if _PY_LIST.fullmatch(text):
        literals = _PY_STR_RE.findall(text)
        if len(literals) > MAX_CHOICES:
            raise ValueError(f"answer_choices has {len(literals):,} items; at most {MAX_CHOICES:,} are read")
        try:  # a literal without prefix or backslash is its own text; ast reads the others
            return [lit[1:-1] if "\\" not in lit and lit[0] in "'\"" else ast.literal_eval(lit)
                    for lit in literals]
        except (ValueError, SyntaxError, MemoryError, RecursionError) as exc:
            raise ValueError(f"answer_choices is not a list literal ({type(exc).__name__}): "
                             f"{_clip(text)}") from None
    if len(text) > _MAX_AST_CHARS:
        raise ValueError(f"answer_choices is not a list literal of strings: {_clip(text)}")
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, (MemoryError, RecursionError)) else type(exc).__name__
        raise ValueError(f"answer_choices is not a list literal ({why}): {_clip(text)}") from None


def _clip(text: str, n: int = 60) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= n else text[:n] + "...")


def _parse_target(raw: str, choices: list[str] | None, is_mc: bool) -> int | str | None:
    if raw.strip() == "":
        return None
    if not is_mc:
        return raw
    try:
        index = int(raw.strip())
    except ValueError:
        raise ValueError(f"target of a multiple-choice row must be the index of the right choice, "
                         f"got {_clip(raw)}") from None
    assert choices is not None
    if not 0 <= index < len(choices):
        raise ValueError(f"target {index} is out of range for {len(choices)} answer choices "
                         f"(valid: 0..{len(choices) - 1})")
    return index


def read_competition_csv(path: str | Path) -> list[Row]:
    """Read and validate a competition CSV file; raise :class:`DataError` naming file and row id.

    Checks: the file exists and is UTF-8; the header has ``id``, ``input`` and ``eval_type``; each
    row has as many fields as the header; ids are non-empty and unique; ``eval_type`` is known;
    multiple-choice rows have a valid ``answer_choices`` list of strings (a non-empty field on a
    generation row must be valid too); a multiple-choice ``target``, when present, is an index
    into the choices. Empty targets are allowed (test files).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file", hint="pass the path of a competition CSV file")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            return _read_rows(path, fh)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})",
                        hint="save the file as UTF-8") from None
    finally:
        csv.field_size_limit(old_limit)


def _read_rows(path: Path, fh) -> list[Row]:
    reader = csv.reader(fh)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected a header "
                        f"with the columns {', '.join(REQUIRED_COLUMNS)}") from None
    except csv.Error as exc:
        raise DataError(f"{path}: header: malformed CSV ({exc})") from None
    header = [h.strip() for h in header]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        # Echo the header only when it is made of column names: a path that names another kind of
        # file (a typo, or a manifest pointing elsewhere) must not put its first line in a message.
        if len(header) <= 40 and all(_COLUMN_NAME.fullmatch(h) for h in header):
            found = f"the header is {','.join(header)}"
        else:
            found = f"the first line ({len(header)} field(s)) is not a header of column names"
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; {found}",
            hint="a competition file has the columns id,input,target,answer_choices,eval_type")
    dup_cols = sorted({c for c in header if c and header.count(c) > 1})
    if dup_cols:
        raise DataError(f"{path}: column(s) {_clip(', '.join(dup_cols))} appear more than once in the header")
    col = {name: header.index(name) for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if name in header}

    rows: list[Row] = []
    seen: dict[str, int] = {}
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(f"{path}: line {line}: malformed CSV ({exc})",
                            hint="check the quoting of the row starting on that line") from None
        if not fields or (len(fields) == 1 and fields[0].strip() == ""):
            continue  # blank line
        rid = fields[col["id"]].strip() if len(fields) > col["id"] else ""
        where = f"{path}: row id {_clip(rid)} (line {line})" if rid else f"{path}: line {line}"
        if len(fields) != len(header):
            raise DataError(f"{where}: has {len(fields)} fields but the header has {len(header)}",
                            hint="quote fields that contain commas or line breaks")
        if not rid:
            raise DataError(f"{where}: empty id")
        if rid in seen:
            raise DataError(f"{where}: duplicate id (first used on line {seen[rid]})",
                            hint="row ids must be unique within a file")
        seen[rid] = line
        eval_type = fields[col["eval_type"]].strip()
        if eval_type not in EVAL_TYPES:
            raise DataError(f"{where}: unknown eval_type {_clip(eval_type)}",
                            hint=f"use one of: {', '.join(EVAL_TYPES)}")
        is_mc = eval_type == "multiple_choice"
        raw_choices = fields[col["answer_choices"]] if "answer_choices" in col else ""
        choices = None
        if raw_choices.strip():
            try:
                choices = parse_choices(raw_choices)
            except ValueError as exc:
                raise DataError(f"{where}: {exc}",
                                hint='write the choices as a list literal, e.g. ["yes", "no"]') from None
        elif is_mc:
            raise DataError(f"{where}: a multiple_choice row needs answer_choices"
                            + ("" if "answer_choices" in col else " (the file has no answer_choices column)"))
        raw_target = fields[col["target"]] if "target" in col else ""
        try:
            target = _parse_target(raw_target, choices, is_mc)
        except ValueError as exc:
            raise DataError(f"{where}: {exc}") from None
        rows.append(Row(id=rid, input=fields[col["input"]], target=target, choices=choices,
                        eval_type=eval_type, line=line))
    return rows


def write_submission(path: str | Path, ids: Iterable[str], predictions: Iterable[int | str]) -> None:
    """Write a submission file: ``id,prediction,dummy_field`` (``dummy_field`` = 0), rows in order.

    Standard CSV (RFC 4180: CRLF row ends, fields with commas, quotes or line breaks quoted). The
    CRLF terminator matters: with a bare ``\n`` terminator Python's writer leaves a ``\r`` inside
    a generated text unquoted, and readers then split the row in two.
    """
    with Path(path).open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\r\n")
        writer.writerow(SUBMISSION_COLUMNS)
        for rid, pred in zip(ids, predictions, strict=True):
            writer.writerow([rid, pred, 0])
