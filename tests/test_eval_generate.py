"""Greedy generation: batched (left padding) equals one prompt at a time; stop strings; budget."""
from __future__ import annotations

import pytest
import torch

from mergelab.evaluate.generate import Generation, cut_at_stop, generate_reference, generate_texts
from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.testing import FAMILIES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SHARED = "Merging models combines what fine-tuned experts learned into one set of weights. Question: "
PROMPTS = [
    SHARED + "is it good?",   # rows sharing a long prefix: computed once in a batch
    SHARED + "is it good? Really?",
    SHARED + "what now",
    "Question: What is two plus three? Answer:",
    "The quick brown fox",
    "héllo wörld, naïve café, 東京, emoji 🙂 and quotes \"like this\". Merging models combines experts.",
    "A",
    "Translate to SQL: list all users older than 30.",
    "Dates: 2024-05-31 is the thirty-first of May, 2024. Sentiment: I loved this film",
    "",
]


@pytest.fixture(scope="module")
def models(zoo):
    return {fam: load_model_and_tokenizer(zoo[fam].base, device="cpu") for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_one_at_a_time(models, family):
    model, tok = models[family]
    ref = generate_reference(model, tok, PROMPTS, max_new_tokens=10)
    assert all(r.new_tokens >= 1 for r in ref[:-1])
    assert len({r.text for r in ref}) > 3, "the fixture model should say different things"
    for batch_size in (3, 16):
        got = generate_texts(model, tok, PROMPTS, max_new_tokens=10, batch_size=batch_size)
        assert got == ref, (family, batch_size)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_stop_strings_cut_text_and_end_early(models, family):
    model, tok = models[family]
    free = generate_reference(model, tok, PROMPTS, max_new_tokens=10)
    # a stop string that really occurs: a character from the middle of some row's free output
    sample = next(r.text for r in free if len(r.text) >= 4)
    stop = [sample[len(sample) // 2]]
    ref = generate_reference(model, tok, PROMPTS, max_new_tokens=10, stop=stop)
    got = generate_texts(model, tok, PROMPTS, max_new_tokens=10, stop=stop, batch_size=4)
    assert got == ref
    for r, f in zip(got, free):
        assert stop[0] not in r.text and f.text.startswith(r.text)
        if stop[0] in f.text:
            assert r.stopped_by == "stop" and r.text == f.text[: f.text.index(stop[0])]
            assert stop[0] in r.raw and r.new_tokens <= f.new_tokens  # raw ends with the token holding it
    assert any(r.stopped_by == "stop" for r in got)


def test_cut_at_stop_takes_the_earliest_stop_string():
    assert cut_at_stop("abc\nInput: x", ["Input:", "\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["z"]) == ("abc", False)
    assert cut_at_stop("abc", []) == ("abc", False)


def test_generation_stops_at_eos(models):
    model, tok = models["llama"]
    free = generate_reference(model, tok, ["The quick brown fox"], max_new_tokens=6)[0]
    # make EOS the model's 3rd token: generation must end there, dropping the EOS itself
    ids = tok("The quick brown fox")["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    third = int(out[0, len(ids) + 2])
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = third
    try:
        got = generate_texts(model, tok, ["The quick brown fox"], max_new_tokens=6)[0]
    finally:
        model.generation_config.eos_token_id = old
    assert got.stopped_by == "eos" and got.new_tokens == 2 and free.text.startswith(got.text)


def test_max_length_truncates_prompt_from_the_left(models):
    model, tok = models["mistral"]
    long = " ".join(["Merging models combines what fine-tuned experts learned."] * 5)
    (g,) = generate_texts(model, tok, [long], max_new_tokens=4, max_length=20)
    (r,) = generate_reference(model, tok, [long], max_new_tokens=4, max_length=20)
    assert g == r and g.truncated and g.prompt_tokens == 16
    assert isinstance(g, Generation)


def test_deadline_returns_none_for_rows_not_run(models):
    import time

    model, tok = models["gemma"]
    got = generate_texts(model, tok, PROMPTS, max_new_tokens=4, deadline=time.monotonic() - 1)
    assert got == [None] * len(PROMPTS)


def test_stop_check_ignores_an_unfinished_character():
    from mergelab.evaluate.generate import stop_in_partial

    # a byte-level tokenizer decodes half a character as U+FFFD; the next token may complete it
    assert not stop_in_partial("abc\ufffd", ["\ufffd"])
    assert stop_in_partial("a\ufffdb", ["\ufffd"])
    assert stop_in_partial("x\nInput:", ["Input:"]) and not stop_in_partial("x\nInput", ["Input:"])
