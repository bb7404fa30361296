"""evaluate(): outputs, scores against hand computations, adapters, in-memory models, deadlines."""
from __future__ import annotations

import csv
import json
import time

import pytest
import torch

from mergelab.errors import DataError, OutputExistsError
from mergelab.evaluate import EvalError, EvalOptions, read_competition_csv
from mergelab.evaluate.runner import evaluate
from mergelab.evaluate.generate import generate_reference
from mergelab.evaluate.loading import load_model_and_tokenizer
from mergelab.evaluate.metrics import rouge
from mergelab.evaluate.scoring import score_multiple_choice_reference


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HEADER = ["id", "input", "target", "answer_choices", "eval_type"]
MC = [  # id, input, choices (different counts and lengths)
    ("q7", "Question: What is two plus three?\nAnswer:", [" five", " six", " four plus one"]),
    ("q2", "Sentiment: I loved this film, it was wonderful. Label:", [" positive", " negative"]),
    ("q9", "héllo wörld, naïve café, 東京 🙂, \"quotes\"", ["yes", "no", "true", "false"]),
    ("q1", "A B C", [" D", " E F G H"]),
]
GEN = [("g5", "The quick brown fox"), ("g3", "Translate to SQL: list all users older than 30.")]
ORDER = ["q7", "g5", "q2", "q9", "g3", "q1"]  # mixed, not sorted: outputs must keep this order


def _write_csv(path, rows):
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def llama(zoo):
    return load_model_and_tokenizer(zoo["llama"].base, device="cpu")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, llama):
    """A labelled file whose expected scores are computed by hand from the reference functions."""
    model, tok = llama
    ref = score_multiple_choice_reference(model, tok, [p for _, p, _ in MC], [c for _, _, c in MC])
    best = [r.best() for r in ref]
    # the first two rows get the model's choice as target, the others a wrong one: accuracy 2/4
    targets = {mc[0]: (b if i < 2 else (b + 1) % len(mc[2])) for i, (mc, b) in enumerate(zip(MC, best))}
    gens = generate_reference(model, tok, [p for _, p in GEN], max_new_tokens=8)
    gen_targets = {"g5": gens[0].text, "g3": "select star from users"}
    rows = {rid: [rid, p, str(targets[rid]), repr(c), "multiple_choice"] for rid, p, c in MC}
    rows.update({rid: [rid, p, gen_targets[rid], "", "generation"] for rid, p in GEN})
    path = _write_csv(tmp_path_factory.mktemp("data") / "labelled.csv", [rows[r] for r in ORDER])
    expected = {"best": dict(zip([m[0] for m in MC], best)), "ref": dict(zip([m[0] for m in MC], ref)),
                "gen": dict(zip([g[0] for g in GEN], gens)), "gen_targets": gen_targets}
    return path, expected


def _read_sub(path):
    with path.open(encoding="utf-8", newline="") as fh:
        return list(csv.reader(fh))


def _read_preds(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_outputs_and_scores_by_hand(tmp_path, labelled, zoo):
    path, exp = labelled
    test_file = _write_csv(tmp_path / "test.csv", [[r, f"input {r}", "", "", "generation"] for r in ("b", "a")])
    out = tmp_path / "out"
    opts = EvalOptions(max_new_tokens=8, batch_size=3)
    scores = evaluate(zoo["llama"].base, [path, test_file], out, opts)

    assert sorted(p.name for p in out.iterdir()) == ["labelled.csv", "predictions", "scores.json", "test.csv",
                                                     "timing.json"]
    assert json.loads((out / "scores.json").read_text()) == {k: v for k, v in scores.items() if k != "timing"}
    assert json.loads((out / "timing.json").read_text()) == scores["timing"]
    sub = _read_sub(out / "labelled.csv")
    assert sub[0] == ["id", "prediction", "dummy_field"]
    assert [r[0] for r in sub[1:]] == ORDER and all(r[2] == "0" for r in sub[1:])
    by_id = {r[0]: r[1] for r in sub[1:]}
    for rid, b in exp["best"].items():
        assert by_id[rid] == str(b)
    for rid, g in exp["gen"].items():
        assert by_id[rid] == g.text
    assert [r[0] for r in _read_sub(out / "test.csv")[1:]] == ["b", "a"]

    preds = _read_preds(out / "predictions" / "labelled.jsonl")
    assert [p["id"] for p in preds] == ORDER
    for p in preds:
        if p["eval_type"] == "multiple_choice":
            ref = exp["ref"][p["id"]]
            assert p["method"] == "logprob" and p["choices"] == next(c for i, _, c in MC if i == p["id"])
            assert max(abs(a - b) for a, b in zip(p["logprobs"], ref.logprobs)) < 1e-4
            assert p["choice_tokens"] == ref.n_tokens and "prompt" in p
        else:
            assert p["method"] == "generate" and p["generated"] == exp["gen"][p["id"]].raw

    # hand computation: accuracy 2/4; generation g5 matches its target exactly, g3 does not
    s = scores["files"]["labelled.csv"]
    assert s["multiple_choice"] == {"rows": 4, "scored": 4, "accuracy": 0.5}
    r5 = rouge(exp["gen"]["g5"].text, exp["gen_targets"]["g5"])
    r3 = rouge(exp["gen"]["g3"].text, exp["gen_targets"]["g3"])
    g = s["generation"]
    assert g["scored"] == 2 and g["exact_match"] == 0.5
    for k in ("rouge1", "rouge2", "rougeL"):
        assert g[k] == pytest.approx((r5[k] + r3[k]) / 2)
    assert s["score"] == pytest.approx((1 + 1 + 0 + 0 + r5["rougeL"] + r3["rougeL"]) / 6)
    t = scores["files"]["test.csv"]
    assert t["rows"] == 2 and t["generation"]["scored"] == 0 and t["score"] is None
    o = scores["overall"]
    assert o["rows"] == 8 and o["multiple_choice"]["accuracy"] == 0.5 and o["generation"]["rows"] == 4
    assert scores["complete"] and scores["timing"]["rows"] == 8 and scores["timing"]["rows_per_s"] > 0
    assert scores["options"]["batch_size"] == 3


def test_t5_end_to_end(tmp_path, labelled, zoo):
    path, _ = labelled
    scores = evaluate(zoo["t5"].base, [path], tmp_path / "out", EvalOptions(max_new_tokens=4),)
    preds = _read_preds(tmp_path / "out" / "predictions" / "labelled.jsonl")
    assert [p["id"] for p in preds] == ORDER and scores["overall"]["rows"] == 6
    assert {p["method"] for p in preds} == {"logprob", "generate"}


def test_adapter_changes_predictions_in_memory_form_matches_and_restores(tmp_path, labelled, zoo, llama):
    path, _ = labelled
    model, tok = llama
    opts = EvalOptions(max_new_tokens=8)
    evaluate(zoo["llama"].base, [path], tmp_path / "base", opts)
    evaluate(zoo["llama"].base, [path], tmp_path / "lora", opts, adapter=zoo["llama"].loras[1])
    base = _read_preds(tmp_path / "base" / "predictions" / "labelled.jsonl")
    lora = _read_preds(tmp_path / "lora" / "predictions" / "labelled.jsonl")
    diff = max(abs(a - b) for p, q in zip(base, lora) if "logprobs" in p
               for a, b in zip(p["logprobs"], q["logprobs"]))
    assert diff > 1e-2, "the adapter must change the scores"

    # the same adapter on the already-loaded model (not merged), then removed again
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = evaluate(model, [path], tmp_path / "mem", opts, adapter=zoo["llama"].loras[1], tokenizer=tok)
    mem = _read_preds(tmp_path / "mem" / "predictions" / "labelled.jsonl")
    assert [p["prediction"] for p in mem] == [p["prediction"] for p in lora]
    assert max(abs(a - b) for p, q in zip(mem, lora) if "logprobs" in p
               for a, b in zip(p["logprobs"], q["logprobs"])) < 1e-4
    assert scores["adapter"] == str(zoo["llama"].loras[1])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in name for name, _ in model.named_modules())


def test_in_memory_model_without_writing(labelled, llama):
    path, exp = labelled
    model, tok = llama
    model.train()
    scores = evaluate(model, path, None, EvalOptions(max_new_tokens=8), tokenizer=tok)
    assert scores["files"]["labelled.csv"]["multiple_choice"]["accuracy"] == 0.5
    assert model.training, "the model's mode is restored"
    model.eval()
    with pytest.raises(EvalError, match="no tokenizer"):
        evaluate(model, path, None)


def test_deadline_already_passed_gives_complete_fallback_submission(tmp_path, labelled, zoo):
    path, _ = labelled
    out = tmp_path / "out"
    scores = evaluate(zoo["llama"].base, [path], out, EvalOptions(), deadline=time.monotonic() - 1)
    sub = _read_sub(out / "labelled.csv")
    assert [r[0] for r in sub[1:]] == ORDER
    assert [r[1] for r in sub[1:]] == ["0", "", "0", "0", "", "0"]  # choice 0 / empty text
    preds = _read_preds(out / "predictions" / "labelled.jsonl")
    assert all(p["not_reached"] and p["method"] == "not_reached" for p in preds)
    assert not scores["complete"] and scores["overall"]["not_reached"] == 6
    assert scores["timing"]["rows"] == 0


def test_deadline_midway_keeps_finished_rows(tmp_path, labelled, zoo, monkeypatch):
    import mergelab.evaluate.batching as batching

    path, exp = labelled
    clock = iter(range(1000))

    class FakeTime:  # each deadline check advances the clock by one
        @staticmethod
        def monotonic():
            return next(clock)

    monkeypatch.setattr(batching, "time", FakeTime)
    # batch_size 1: the 4 multiple-choice rows take checks 0..3, generation rows checks 4, 5
    scores = evaluate(zoo["llama"].base, [path], tmp_path / "out", EvalOptions(batch_size=1), deadline=4.5)
    preds = {p["id"]: p for p in _read_preds(tmp_path / "out" / "predictions" / "labelled.jsonl")}
    assert all(preds[r]["method"] == "logprob" and preds[r]["prediction"] == exp["best"][r] for r, _, _ in MC)
    reached = [preds[r]["method"] for r, _ in GEN]
    assert sorted(reached) == ["generate", "not_reached"]
    assert scores["overall"]["not_reached"] == 1 and not scores["complete"]
    assert len(_read_sub(tmp_path / "out" / "labelled.csv")) == 7


def test_cot_extracts_or_falls_back(tmp_path, labelled, zoo, monkeypatch):
    import mergelab.evaluate.runner as runner
    from mergelab.evaluate.generate import Generation

    path, exp = labelled
    real = runner.generate_texts
    seen = {}

    def fake(model, tok, prompts, **kw):  # chains of thought answer "B" for the first row only
        if kw["max_new_tokens"] != 13:
            return real(model, tok, prompts, **kw)
        seen["prompts"] = list(prompts)
        return [Generation(text="Reasoning. Answer: (B)" if "two plus three" in p else "Hmm.",
                           raw="", new_tokens=3, stopped_by="length") for p in prompts]

    monkeypatch.setattr(runner, "generate_texts", fake)
    opts = EvalOptions(cot=True, cot_max_new_tokens=13, max_new_tokens=8)
    scores = evaluate(zoo["llama"].base, [path], tmp_path / "out", opts)
    preds = {p["id"]: p for p in _read_preds(tmp_path / "out" / "predictions" / "labelled.jsonl")}
    assert len(seen["prompts"]) == 4 and all("A. " in p and "Answer: <letter>" in p for p in seen["prompts"])
    assert preds["q7"]["method"] == "cot" and preds["q7"]["prediction"] == 1
    assert preds["q7"]["cot_extraction"] == "letter" and preds["q7"]["cot_generated"].endswith("(B)")
    for rid in ("q2", "q9", "q1"):  # nothing found: the log-probability choice stands
        assert preds[rid]["method"] == "cot_fallback" and preds[rid]["cot_extraction"] == "none"
        assert preds[rid]["prediction"] == exp["best"][rid]
    assert scores["overall"]["multiple_choice"]["cot"] == {"extracted": 1, "fallback": 3}


def test_cot_runs_for_real(tmp_path, labelled, zoo):
    path, exp = labelled
    evaluate(zoo["mistral"].base, [path], tmp_path / "out", EvalOptions(cot=True, cot_max_new_tokens=6,
                                                                          max_new_tokens=4))
    preds = _read_preds(tmp_path / "out" / "predictions" / "labelled.jsonl")
    mc = [p for p in preds if p["eval_type"] == "multiple_choice"]
    assert all(p["method"] in ("cot", "cot_fallback") and "cot_generated" in p for p in mc)
    assert all("cot_prompt" in p and p["cot_prompt"].startswith(p["prompt"].rstrip()) for p in mc)


def test_output_folder_rules(tmp_path, labelled, zoo):
    path, _ = labelled
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--force"):
        evaluate(zoo["llama"].base, [path], out, EvalOptions(max_new_tokens=2))
    assert (out / "keep.txt").exists()
    evaluate(zoo["llama"].base, [path], out, EvalOptions(max_new_tokens=2), force=True)
    assert not (out / "keep.txt").exists() and (out / "scores.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_bad_inputs_fail_before_loading_and_write_nothing(tmp_path, labelled, zoo):
    path, _ = labelled
    bad = _write_csv(tmp_path / "bad.csv", [["x", "q", "", "['a', 'b'", "multiple_choice"]])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="row id 'x'"):
        evaluate(zoo["llama"].base, [path, bad], out)
    other = tmp_path / "sub"
    other.mkdir()
    same_name = _write_csv(other / "labelled.csv", read_rows_as_lists(path))
    with pytest.raises(DataError, match="share the name labelled.csv"):
        evaluate(zoo["llama"].base, [path, same_name], out)
    assert not out.exists()


def read_rows_as_lists(path):
    return [[r.id, r.input, "" if r.target is None else str(r.target),
             "" if r.choices is None else repr(r.choices), r.eval_type] for r in read_competition_csv(path)]
