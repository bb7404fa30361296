"""Multiple-choice scoring: the batched computation equals the one-choice-at-a-time definition."""
from __future__ import annotations

import pytest
import torch

from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.evaluate.scoring import (
    ChoiceScores,
    normalize_scores,
    score_multiple_choice,
    score_multiple_choice_reference,
)
from mergelab.testing import FAMILIES


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models run faster on one thread, and much faster when other processes share the CPU
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Rows of different input lengths, numbers of choices (1 to 5) and choice lengths (one token,
# many tokens, empty), with unicode.
SHARED = "Merging models combines what fine-tuned experts learned into one set of weights. Question: "
PROMPTS = [
    SHARED + "is it good?",   # three rows share a long prefix (computed once in a batch),
    SHARED + "is it good? Really, truly good?",   # one of them a prefix of another
    SHARED + "what now",
    "Question: What is two plus three? Answer:",
    "The quick brown fox",
    "Merging models combines what fine-tuned experts learned into one set of weights. "
    "Sentiment: I loved this film, it was wonderful. Label:",
    "héllo wörld, 東京 🙂",
    "A",
    "Translate to SQL: list all users older than 30.",
]
CHOICES = [
    [" yes", " no"],
    [" yes", " no", " maybe so"],
    ["?", " nothing at all"],
    [" five", " six", " four plus one"],
    ["jumps", " over the lazy dog.", "x", "yes no true", " 2024-05-31"],
    [" positive", " negative"],
    ["\"like this\"", " naïve café"],
    [" B C D"],
    [" SELECT * FROM users WHERE age > 30;", "", " no"],
]


def _maxdiff(a: list[ChoiceScores], b: list[ChoiceScores]) -> float:
    assert [len(x.logprobs) for x in a] == [len(y.logprobs) for y in b]
    return max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x.logprobs, y.logprobs))


@pytest.fixture(scope="module")
def models(zoo):
    return {fam: load_model_and_tokenizer(zoo[fam].base, device="cpu") for fam in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_reference(models, family):
    model, tok = models[family]
    ref = score_multiple_choice_reference(model, tok, PROMPTS, CHOICES)
    assert all(s.logprobs[i] < 0 for s in ref for i, n in enumerate(s.n_tokens) if n > 0)
    assert ref[8].logprobs[1] == 0.0 and ref[8].n_tokens[1] == 0  # the empty choice
    for batch_size in (1, 4, 64):
        got = score_multiple_choice(model, tok, PROMPTS, CHOICES, batch_size=batch_size)
        assert _maxdiff(got, ref) < 1e-4, (family, batch_size)
        assert [g.best() for g in got] == [r.best() for r in ref]
        assert [g.prompt_tokens for g in got] == [r.prompt_tokens for r in ref]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_token_budget_and_truncation(models, family):
    model, tok = models[family]
    ref = score_multiple_choice_reference(model, tok, PROMPTS, CHOICES)
    tiny_batches = score_multiple_choice(model, tok, PROMPTS, CHOICES, batch_size=64, max_batch_tokens=1)
    assert _maxdiff(tiny_batches, ref) < 1e-4
    # A short max_length cuts the beginning of long inputs, the same way in both computations.
    ref_cut = score_multiple_choice_reference(model, tok, PROMPTS, CHOICES, max_length=24)
    got_cut = score_multiple_choice(model, tok, PROMPTS, CHOICES, max_length=24)
    assert _maxdiff(got_cut, ref_cut) < 1e-4
    assert got_cut[5].truncated and not got_cut[7].truncated
    assert _maxdiff([got_cut[5]], [ref[5]]) > 1e-3  # it did change the long row


def test_decoder_score_is_sum_of_token_logprobs(models):
    """Hand computation on one row: log-softmax of the full sequence's logits at the choice tokens."""
    model, tok = models["llama"]
    prompt, choice = "The quick brown fox", " over the lazy dog."
    p = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([p + c])).logits[0].log_softmax(-1)
    expected = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(c))
    (got,) = score_multiple_choice(model, tok, [prompt], [[choice, "x"]])
    assert got.logprobs[0] == pytest.approx(expected, abs=1e-4)
    assert got.n_tokens[0] == len(c) and got.n_chars[0] == len(choice)


def test_t5_scores_choices_as_decoder_continuations(models):
    model, tok = models["t5"]
    prompt, choice = "Question: What is two plus three?", " five"
    enc = tok(prompt)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    start = model.config.decoder_start_token_id
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([enc]),
                     decoder_input_ids=torch.tensor([[start] + c[:-1]])).logits[0].log_softmax(-1)
    expected = sum(float(logp[k, t]) for k, t in enumerate(c))
    (got,) = score_multiple_choice(model, tok, [prompt], [[choice, " six"]])
    assert got.logprobs[0] == pytest.approx(expected, abs=1e-4)


def test_length_normalisation_changes_the_ranking():
    s = ChoiceScores(logprobs=[-4.0, -6.0], n_tokens=[1, 6], n_chars=[2, 30])
    assert normalize_scores(s, "none").best() == 0
    assert normalize_scores(s, "tokens").normalized == [-4.0, -1.0] and s.best() == 1
    assert normalize_scores(s, "chars").normalized == [-2.0, -0.2] and s.best() == 1
    tie = normalize_scores(ChoiceScores(logprobs=[-1.0, -1.0], n_tokens=[1, 1], n_chars=[1, 1]), "none")
    assert tie.best() == 0  # ties go to the first choice


def test_deadline_leaves_rows_unscored(models, monkeypatch):
    import mergelab.evaluate.batching as batching

    clock = iter(range(100))

    class FakeTime:  # each deadline check advances the clock by one
        @staticmethod
        def monotonic():
            return next(clock)

    monkeypatch.setattr(batching, "time", FakeTime)
    model, tok = models["llama"]
    got = score_multiple_choice(model, tok, PROMPTS, CHOICES, batch_size=2, deadline=1.5)
    # checks before batches 1 and 2 pass (clock 0, 1); the third check (2) is past the deadline
    assert sum(g is not None for g in got) == 4 and sum(g is None for g in got) == 5


def test_chunks_keep_padding_within_slack():
    from mergelab.evaluate.prefill import chunk_by_length

    assert chunk_by_length([100, 98, 95, 40, 39, 5], 0.1) == [[0, 1, 2], [3, 4], [5]]
    assert chunk_by_length([10, 10, 10], 0.0) == [[0, 1, 2]]
    assert chunk_by_length([7], 0.1) == [[0]]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_joined_prefill_equals_separate_runs(models, family):
    """Chunks of different widths joined into one left-padded cache: each row's next-token logits
    and its cache entries equal those of the row run alone."""
    from mergelab.evaluate.prefill import prefill

    model, tok = models[family]
    prompts = [tok(p)["input_ids"] for p in (PROMPTS[4], PROMPTS[0], PROMPTS[5], PROMPTS[7], PROMPTS[2],
                                              PROMPTS[3], PROMPTS[1])]
    joined = prefill(model, prompts, tok.pad_token_id, slack=0.0)  # several chunks, a shared prefix
    width = max(map(len, prompts))
    assert joined.mask.shape == (len(prompts), width) and joined.lengths.tolist() == [len(p) for p in prompts]
    for i, p in enumerate(prompts):
        alone = prefill(model, [p], tok.pad_token_id)
        assert torch.allclose(joined.last_logits[i], alone.last_logits[0], atol=1e-4)
        assert sum(joined.mask[i].tolist()) == len(p) and joined.mask[i, -1] == 1
        real = joined.mask[i].bool()
        k_joined = joined.cache.layers[-1].keys[i][:, real]
        assert torch.allclose(k_joined, alone.cache.layers[-1].keys[0], atol=1e-4)


def test_prefix_groups_and_batch_order():
    from mergelab.evaluate.prefill import batch_order, prefix_groups

    a = list(range(20))
    prompts = [a + [50, 51], [7, 8, 9], a + [60], a, [7, 8]]
    groups = prefix_groups(prompts, min_shared=16)
    # rows 0, 2, 3 share 19 tokens (row 3 keeps its last token to itself); the others stand alone
    assert (19, [3, 0, 2]) in groups and (0, [4]) in groups and (0, [1]) in groups
    assert (20, [0, 2]) in prefix_groups(prompts, min_shared=20)
    assert prefix_groups(prompts, min_shared=21) == [(0, [i]) for i in (3, 0, 2, 4, 1)]
    order = batch_order(prompts, min_shared=16)
    assert order == [0, 2, 3, 1, 4]  # the group (longest 22) first, inside it longest first
