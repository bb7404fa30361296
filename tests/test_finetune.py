"""The `finetune:` stage: section errors, the data licence check, training (loss goes down,
same bytes twice on CPU), and runs that fine-tune before and after merging."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mergelab.errors import RecipeError
from mergelab.finetune.loop import answer_loss, collate, encode_example
from mergelab.finetune.train import DataLicenceError, check_data_licences, classify_data_licence, train_adapter
from mergelab.recipe.sections import parse_finetune_section
from mergelab.run.pipeline import run_recipe
from mergelab.testing import load_model, write_mixed_csv


def train_csv(path: Path, n: int = 16) -> Path:
    return write_mixed_csv(path, n, choice_input="Is {i} odd?", choices=["yes", "no"],
                           gen_input="Say hello {i}", gen_target="hello world")


def section(tmp_path: Path, **over) -> dict:
    csv = train_csv(tmp_path / "train.csv")
    return {"when": "after_merge", "data": [{"path": str(csv), "licence": "cc-by-4.0"}], "steps": 8,
            "lr": 1e-2, "rank": 4, "alpha": 8, "batch_size": 4, "max_length": 64, "seed": 5, **over}


def recipe(tmp_path: Path, fz, ft: dict | None, **extra) -> Path:
    data = {"base": {"path": str(fz.base)}, "experts": [{"path": str(e), "weight": 0.5} for e in fz.experts[:2]],
            "method": {"name": "task_arithmetic"}, "seed": 1, **extra}
    if ft is not None:
        data["finetune"] = ft
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("over, message", [
    ({"steps": 0}, "finetune.steps"),
    ({"when": "during_merge"}, "finetune.when"),
    ({"epochs": 3}, "finetune.epochs: unknown key"),
    ({"data": [{"path": "train.csv"}]}, "finetune.data[0].licence: declare the data's licence"),
    ({"data": [{"path": "missing.csv", "licence": "mit"}]}, "finetune.data[0].path: file"),
])
def test_section_errors_name_the_key(tmp_path, over, message):
    raw = section(tmp_path, **over)
    with pytest.raises(RecipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_finetune_section(raw, tmp_path)


@pytest.mark.parametrize("licence, ok", [
    ("cc-by-4.0", True), ("Apache-2.0", True), ("odc-by", True), ("cdla-permissive-2.0", True),
    ("cc-by-nc-4.0", False), ("cc-by-nd-4.0", False), ("proprietary", False), ("unknown", False),
    ("openai-terms-of-use", False),
])
def test_data_licences_are_checked_against_the_open_allow_list(licence, ok):
    assert classify_data_licence(licence)[0] is ok


def test_answer_loss_equals_the_transformers_loss(zoo):
    from transformers import AutoTokenizer

    base = zoo["llama"].base
    model, tok = load_model(base), AutoTokenizer.from_pretrained(str(base))
    batch = collate([encode_example(tok, "Question: what is two plus three?\n", "five", add_eos=True),
                      encode_example(tok, "Sentiment: I loved it\n", "positive", add_eos=False),
                      encode_example(tok, "Q\n", "a much longer answer than the others", add_eos=True)],
                     tok.pad_token_id, "cpu")
    with torch.no_grad():
        assert float(answer_loss(model, batch)) == pytest.approx(float(model(**batch).loss), rel=1e-5)


def test_a_closed_or_unknown_data_licence_stops_a_competition_run(zoo, tmp_path):
    ft = section(tmp_path)
    ft["data"] = [ft["data"][0] | {"licence": "cc-by-nc-4.0"}, ft["data"][0] | {"licence": "my-own-terms"}]
    path = recipe(tmp_path, zoo["llama"], ft)
    with pytest.raises(DataLicenceError) as err:
        run_recipe(path, tmp_path / "r", rules=True)
    msg = str(err.value)
    assert "finetune.data[0] train.csv: cc-by-nc-4.0 is not an open licence" in msg
    assert "finetune.data[1]" in msg and "not on mergelab's allow-list" in msg and "--no-rules" in msg
    assert not (tmp_path / "r").exists()
    # outside the competition: a warning, and the licence is recorded
    warned = []
    records = check_data_licences(parse_finetune_section(ft, tmp_path), rules=False, warn=warned.append)
    assert len(warned) == 2 and [r["open"] for r in records] == [False, False]


def test_training_reduces_the_loss_and_is_deterministic_on_cpu(zoo, tmp_path):
    fz = zoo["llama"]
    sec = parse_finetune_section(section(tmp_path, steps=12), tmp_path)
    a = train_adapter(fz.base, sec, tmp_path / "a", device="cpu")
    b = train_adapter(fz.base, sec, tmp_path / "b", device="cpu")
    assert a.complete and a.steps_done == 12
    assert sum(a.losses[-3:]) / 3 < 0.8 * sum(a.losses[:3]) / 3
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.losses == b.losses
    other = parse_finetune_section(section(tmp_path, steps=12, seed=6), tmp_path)
    c = train_adapter(fz.base, other, tmp_path / "c", device="cpu")
    assert (tmp_path / "c" / "adapter_model.safetensors").read_bytes() != \
        (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    assert c.losses != a.losses


def test_a_deadline_stops_training_and_keeps_the_adapter(zoo, tmp_path):
    import time

    sec = parse_finetune_section(section(tmp_path, steps=50), tmp_path)
    res = train_adapter(zoo["llama"].base, sec, tmp_path / "a", device="cpu", deadline=time.monotonic())
    assert res.stopped_by_deadline and res.steps_done == 1 and not res.complete
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_after_merge_run_folds_the_adapter_and_the_model_generates(zoo, tmp_path):
    import torch

    from mergelab.evaluate.loading import load_model_and_tokenizer

    fz = zoo["llama"]
    ft = section(tmp_path)
    path = recipe(tmp_path, fz, ft)
    out = tmp_path / "run"
    first = run_recipe(path, out, rules=False, device="cpu")
    status = {s.name: s.status for s in first.stages}
    assert [s.name for s in first.stages if s.status == "ran"] == ["resolve", "merge", "finetune", "fold"]
    m = first.manifest
    assert m["finetune"]["seed"] == 5 and m["finetune"]["data"][0]["licence"] == "cc-by-4.0"
    import hashlib

    assert m["finetune"]["data"][0]["sha256"] == hashlib.sha256((tmp_path / "train.csv").read_bytes()).hexdigest()
    assert any(k.startswith("finetune/") for k in m["outputs"]) and any(k.startswith("merged/") for k in m["outputs"])

    # model/ = merged + ΔW of the adapter, the same as PEFT's merge_and_unload
    folded, tok = load_model_and_tokenizer(out / "model", device="cpu")
    ref, _ = load_model_and_tokenizer(out / "merged", adapter=out / "finetune", device="cpu")
    for (n1, p1), (n2, p2) in zip(folded.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.allclose(p1, p2, atol=1e-6), n1
    ids = tok("Say hello 4", return_tensors="pt")
    gen = folded.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]

    again = run_recipe(path, out, rules=False, device="cpu")
    assert {s.name: s.status for s in again.stages} == status | {"merge": "skipped", "finetune": "skipped",
                                                                   "fold": "skipped"}
    # a changed fine-tuning parameter retrains and refolds, but does not re-merge
    path.write_text(yaml.safe_dump(yaml.safe_load(path.read_text()) | {"finetune": ft | {"steps": 9}}))
    third = run_recipe(path, out, rules=False, device="cpu")
    assert {s.name: s.status for s in third.stages}["merge"] == "skipped"
    assert {s.name: s.status for s in third.stages}["finetune"] == "ran"
    assert third.manifest["outputs"]["model/" + next(k for k in third.manifest["stages"]["fold"]["outputs"]
                                                     if k.endswith(".safetensors"))] \
        != again.manifest["outputs"]["model/" + next(k for k in again.manifest["stages"]["fold"]["outputs"]
                                                     if k.endswith(".safetensors"))]


def test_before_merge_adapter_joins_the_merge_as_an_expert(zoo, tmp_path):
    from mergelab.merge import merge
    from mergelab.testing import load_model

    fz = zoo["llama"]
    ft = section(tmp_path, when="before_merge", expert={"weight": 0.7})
    path = recipe(tmp_path, fz, ft)
    result = run_recipe(path, tmp_path / "run", rules=False, device="cpu")
    assert [s.name for s in result.stages if s.status == "ran"] == ["resolve", "finetune", "merge"]
    assert not (tmp_path / "run" / "merged").exists()
    # the same merge done by hand with the adapter as a third expert gives the same bytes
    data = yaml.safe_load(path.read_text())
    data.pop("finetune")
    data["experts"].append({"path": str(tmp_path / "run" / "finetune"), "weight": 0.7})
    merge(data, tmp_path / "by_hand", device="cpu", progress=False)
    by_hand = sorted((tmp_path / "by_hand").glob("*.safetensors"))
    assert by_hand and len(by_hand) == len(list((tmp_path / "run" / "model").glob("*.safetensors")))
    for f in by_hand:
        assert f.read_bytes() == (tmp_path / "run" / "model" / f.name).read_bytes()
    assert load_model(tmp_path / "run" / "model") is not None
    # a format: lora output cannot be fine-tuned after merging
    bad = recipe(tmp_path, fz, section(tmp_path), output={"format": "lora"})
    with pytest.raises(RecipeError, match="after_merge .* output.format: full"):
        run_recipe(bad, tmp_path / "r2", rules=False)
