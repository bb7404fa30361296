"""Competition CSV files: the reader's edge cases and errors, and the submission writer."""
from __future__ import annotations

import csv
import json

import pytest

from mergelab.errors import DataError
from mergelab.evaluate.data import parse_choices, read_competition_csv, write_submission

HEADER = ["id", "input", "target", "answer_choices", "eval_type"]


def _write(tmp_path, rows, header=HEADER, name="data.csv", **kw):
    path = tmp_path / name
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh, **kw)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_multiline_commas_quotes_unicode(tmp_path):
    text = 'Line one, with a comma\nline "two" with quotes\n東京 naïve 🙂'
    choices = ["yes, sir", 'say "hi"', "it's", "東京"]
    path = _write(tmp_path, [
        ["q1", text, "2", repr(choices), "multiple_choice"],
        ["q2", "Summarise:\n\nA long, long text.", "A short\ntext, \"quoted\"", "", "generation"],
        ["q3", "json choices", "0", json.dumps(["a\\b", "c"]), "multiple_choice"],
    ])
    rows = read_competition_csv(path)
    assert [r.id for r in rows] == ["q1", "q2", "q3"]
    assert rows[0].input == text and rows[0].choices == choices and rows[0].target == 2
    assert rows[0].is_mc and not rows[1].is_mc
    assert rows[1].target == 'A short\ntext, "quoted"' and rows[1].choices is None
    assert rows[2].choices == ["a\\b", "c"]
    assert [r.line for r in rows] == [2, 5, 9]  # where each row starts (q1 and q2 span lines)


def test_line_numbers_follow_multiline_fields(tmp_path):
    path = _write(tmp_path, [["a", "one\ntwo\nthree", "", "", "generation"],
                             ["b", "x", "", "", "generation"]])
    a, b = read_competition_csv(path)
    assert (a.line, b.line) == (2, 5)


def test_test_file_without_targets_and_crlf_and_bom(tmp_path):
    path = tmp_path / "test.csv"
    content = ("\ufeffid,input,eval_type,answer_choices\r\n"
               '0,"Pick one\r\nplease",multiple_choice,"[\'x\', \'y\']"\r\n'
               "1,Write a poem,generation,\r\n")
    path.write_bytes(content.encode("utf-8"))
    rows = read_competition_csv(path)
    assert [(r.id, r.target, r.choices) for r in rows] == [("0", None, ["x", "y"]), ("1", None, None)]
    assert rows[0].input == "Pick one\r\nplease"


def test_empty_target_is_allowed_and_blank_lines_skipped(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("id,input,target,answer_choices,eval_type\n"
                    "1,hello,,\"['a','b']\",multiple_choice\n\n"
                    "2,bye,,,generation\n", encoding="utf-8")
    rows = read_competition_csv(path)
    assert [(r.id, r.target) for r in rows] == [("1", None), ("2", None)]


def test_header_only_gives_no_rows(tmp_path):
    assert read_competition_csv(_write(tmp_path, [])) == []


def test_generation_row_may_carry_choices(tmp_path):
    # the public test file has generation rows with answer_choices (classification prompts)
    rows = read_competition_csv(_write(tmp_path, [["g", "Similar?", "", "['Similar', 'Dissimilar']", "generation"]]))
    assert rows[0].choices == ["Similar", "Dissimilar"] and rows[0].eval_type == "generation"


def _error(path) -> str:
    with pytest.raises(DataError) as info:
        read_competition_csv(path)
    return str(info.value)


@pytest.mark.parametrize("literal, why", [
    ("['a', 'b'", "not a list literal"),
    ("[a, b]", "not a list literal"),
    ("['a', 1]", "only strings"),
    ("{'a': 1}", "must be a list"),
    ("'just a string'", "must be a list"),
    ("[]", "empty list"),
])
def test_bad_choice_literals_name_file_and_row(tmp_path, literal, why):
    path = _write(tmp_path, [["ok", "fine", "0", "['x']", "multiple_choice"],
                             ["row-7", "question", "0", literal, "multiple_choice"]])
    msg = _error(path)
    assert str(path) in msg and "row id 'row-7'" in msg and "line 3" in msg and why in msg


def test_choices_are_never_evaluated(tmp_path):
    marker = tmp_path / "pwned"
    literal = f"__import__('pathlib').Path({str(marker)!r}).touch() or ['a']"
    msg = _error(_write(tmp_path, [["x", "q", "", literal, "multiple_choice"]]))
    assert "not a list literal" in msg and "row id 'x'" in msg
    assert not marker.exists()


@pytest.mark.parametrize("rows, expected", [
    ([["1", "q", "", "", "classification"]], "unknown eval_type 'classification'"),
    ([["1", "q", "", "", "multiple_choice"]], "needs answer_choices"),
    ([["1", "q", "", "", "generation"], ["1", "r", "", "", "generation"]], "duplicate id"),
    ([["", "q", "", "", "generation"]], "empty id"),
    ([["1", "q", "4", "['a', 'b']", "multiple_choice"]], "out of range"),
    ([["1", "q", "b", "['a', 'b']", "multiple_choice"]], "must be the index"),
    ([["1", "q", "", "", "generation", "extra"]], "has 6 fields but the header has 5"),
])
def test_row_errors_are_clear(tmp_path, rows, expected):
    msg = _error(_write(tmp_path, rows))
    assert expected in msg and "data.csv" in msg


def test_duplicate_id_names_both_lines(tmp_path):
    msg = _error(_write(tmp_path, [["a", "q", "", "", "generation"], ["b", "q", "", "", "generation"],
                                   ["a", "r", "", "", "generation"]]))
    assert "row id 'a' (line 4)" in msg and "first used on line 2" in msg


def test_missing_columns_and_missing_file(tmp_path):
    msg = _error(_write(tmp_path, [["1", "q"]], header=["id", "input"]))
    assert "missing column(s) eval_type" in msg
    assert "no such file" in _error(tmp_path / "nope.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "the file is empty" in _error(empty)
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,input,eval_type\n1,caf\xe9,generation\n".encode("latin-1"))
    assert "not UTF-8" in _error(latin)


def test_parse_choices_accepts_json_and_python_literals():
    assert parse_choices('["a", "b \\"c\\""]') == ["a", 'b "c"']
    assert parse_choices("['it\\'s', \"x\"]") == ["it's", "x"]
    assert parse_choices("('a', 'b')") == ["a", "b"]
    with pytest.raises(ValueError):
        parse_choices("[" * 10000)  # deeply nested garbage fails cleanly


def test_submission_shape_and_order(tmp_path):
    out = tmp_path / "sub.csv"
    ids = ["b", "a", "c", "10"]
    preds = [2, "two\nlines, with \"quotes\"", "carriage\rreturn", 0]
    write_submission(out, ids, preds)
    with out.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["id", "prediction", "dummy_field"]
    assert rows[1:] == [["b", "2", "0"], ["a", 'two\nlines, with "quotes"', "0"], ["c", "carriage\rreturn", "0"],
                        ["10", "0", "0"]]
    with pytest.raises(ValueError):
        write_submission(out, ids, preds[:-1])
