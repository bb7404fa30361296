"""Prompts: few-shot draws, chat templates, chain-of-thought prompts and answer extraction."""
from __future__ import annotations

import pytest

from mergelab.errors import DataError
from mergelab.evaluate.data import Row
from mergelab.evaluate.options import EvalError, EvalOptions
from mergelab.evaluate.prompting import ShotPool, build_prompt, cot_text, extract_choice
from mergelab.testing import make_tokenizer


def _mc(i, target=0, choices=("red", "green", "blue")):
    return Row(id=f"m{i}", input=f"Colour question {i}?", target=target, choices=list(choices),
               eval_type="multiple_choice")


def _gen(i):
    return Row(id=f"g{i}", input=f"Say {i}:", target=f"answer {i}", choices=None, eval_type="generation")


POOL = ShotPool([_mc(i, target=i % 3) for i in range(8)] + [_gen(i) for i in range(8)]
                + [Row(id="nolabel", input="x", target=None, choices=None, eval_type="generation")])


def test_draws_are_deterministic_typed_and_seeded():
    row = _mc(100)
    a = POOL.draw(row, 3, seed=0)
    assert a == POOL.draw(row, 3, seed=0)
    assert len(a) == 3 and all(s.eval_type == "multiple_choice" for s in a)
    assert all(s.target is not None for s in a)
    draws = {tuple(s.id for s in POOL.draw(_mc(100 + k), 3, seed=s)) for k in range(4) for s in range(4)}
    assert len(draws) > 4, "draws should vary with the seed and the row id"
    assert all(s.eval_type == "generation" for s in POOL.draw(_gen(100), 5, seed=1))


def test_draw_never_shows_the_row_itself_and_mixes_types_when_short():
    row = _mc(3, target=0)  # same input as a pool row
    for seed in range(20):
        assert all(s.input != row.input for s in POOL.draw(row, 7, seed=seed))
    mixed = POOL.draw(_mc(100), 10, seed=0)  # only 8 multiple-choice examples exist
    assert {s.eval_type for s in mixed} == {"multiple_choice", "generation"}
    with pytest.raises(DataError, match="few_shot asks for 20"):
        POOL.draw(_mc(100), 20, seed=0)


def test_from_csv_needs_enough_labelled_rows(tmp_path):
    path = tmp_path / "shots.csv"
    path.write_text("id,input,target,answer_choices,eval_type\n1,a,,,generation\n2,b,yes,,generation\n")
    with pytest.raises(DataError, match="1 labelled row"):
        ShotPool.from_csv(path, 2)


def test_plain_few_shot_prompt_shows_answer_text():
    tok = make_tokenizer(None)
    shots = [_mc(1, target=2), _gen(5)]
    opts = EvalOptions(few_shot=2, shots="unused.csv")
    prompt = build_prompt(_mc(9), tok, opts, shots)
    assert prompt == "Colour question 1? blue\n\nSay 5: answer 5\n\nColour question 9?"
    assert build_prompt(_mc(9), tok, EvalOptions()) == "Colour question 9?"


def test_chat_prompt_uses_the_template_with_turns():
    tok = make_tokenizer(None)
    opts = EvalOptions(chat=True, few_shot=1, shots="unused.csv")
    prompt = build_prompt(_gen(2), tok, opts, [_gen(1)])
    assert prompt == ("<|user|>Say 1:</s><|assistant|>answer 1</s>"
                      "<|user|>Say 2:</s><|assistant|>")


def test_chat_without_template_is_a_clear_error():
    tok = make_tokenizer(None, chat_template=False)
    with pytest.raises(EvalError, match="no chat template"):
        build_prompt(_gen(1), tok, EvalOptions(chat=True))


def test_cot_prompt_lists_options_unless_they_are_letters():
    text = cot_text(_mc(1, choices=(" red", "green")), "Think.")
    assert text == "Colour question 1?\n\nA. red\nB. green\n\nThink."
    lettered = Row(id="x", input="Q?\nA. cat\nB. dog", target=None, choices=["A", "B"],
                   eval_type="multiple_choice")
    assert cot_text(lettered, "Think.") == "Q?\nA. cat\nB. dog\n\nThink."


CHOICES = ["advertising", "shipping", "storage", "quality control"]


@pytest.mark.parametrize("text, expected", [
    ("Marketing sells things. The answer is (B).", (1, "letter")),
    ("Answer: D", (3, "letter")),
    ("**Answer:** c) storage", (2, "text")),
    ("answer: shipping, clearly", (1, "text")),
    ("Answer: Based on the text, quality control.", (3, "text")),
    ("The answer is option 3", (2, "index")),
    ("Reasoning...\nC", (2, "letter")),
    ("Clearly this is about storage.", (2, "text")),     # one choice mentioned: unambiguous
    ("It is about storage, not shipping", (None, "none")),  # two mentioned, no answer: ambiguous
    ("B. shipping", (1, "letter")),                      # one option quoted
    ("A. advertising\nB. shipping\nC. storage", (None, "none")),  # the option list echoed
    ("The answer is storage, not shipping.", (2, "text")),  # after "answer": the first mentioned
    ("I cannot tell.", (None, "none")),
    ("Answer: E", (None, "none")),                        # out of range
])
def test_extract_choice(text, expected):
    assert extract_choice(text, CHOICES) == expected


def test_extract_choice_with_numeric_and_letter_choices():
    assert extract_choice("so the Answer: 2", ["0", "1", "2"]) == (2, "text")
    assert extract_choice("The answer is B.", ["A", "B", "C", "D"]) == (1, "text")
    assert extract_choice("answer: yes", ["yes", "no"]) == (0, "text")


def test_options_validate_and_read_yaml_style_values(tmp_path):
    from pydantic import ValidationError

    assert EvalOptions(length_norm=True).length_norm == "tokens"
    assert EvalOptions(length_norm=False).length_norm == "none"
    with pytest.raises(ValidationError, match="needs `shots`"):
        EvalOptions(few_shot=2)
    with pytest.raises(ValidationError, match="few_shot is 0"):
        EvalOptions(shots=tmp_path / "s.csv")
    with pytest.raises(ValidationError, match="Extra inputs"):
        EvalOptions(batchsize=4)
    with pytest.raises(ValidationError):
        EvalOptions(stop=[""])
    opts = EvalOptions.model_validate({"batch_size": 8, "stop": ["\n\n"], "cot": True})
    assert EvalOptions.model_validate(opts.model_dump(mode="json")) == opts
