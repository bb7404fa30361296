"""Experts whose vocabularies differ (issue 18): ``tokenizer: {source: base | union | <expert>}``.

Fixtures: a tiny llama base (400 tokens) and experts built from one fine-tune of it: ``grown``
adds ``<tool>`` and ``<think>`` (rows 400, 401), ``tool`` adds ``<tool>`` only, ``short`` has the
base's tokenizer but only 398 embedding rows (it lacks the last two tokens), ``swapped`` has the
base's tokens with two ids exchanged (and its rows exchanged with them).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergelab.errors import RecipeError, ShapeMismatchError
from mergelab.io.checkpoint import CheckpointReader
from mergelab.merge import merge
from mergelab.recipe import load_recipe
from mergelab.testing import make_base, make_expert, make_lora

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SWAP = (100, 200)   # ids exchanged in the swapped expert


def _variant(src: Path, out: Path, *, added=(), rows: int | None = None, swap=None, seed=0) -> Path:
    """A copy of ``src`` with tokens added (new random rows), rows cut, or two token ids swapped."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(str(f)))
    tok = AutoTokenizer.from_pretrained(str(src))
    gen = torch.Generator().manual_seed(seed)
    if added:
        tok.add_tokens(list(added))
        for n in (EMB, HEAD) if HEAD in state else (EMB,):
            state[n] = torch.cat([state[n], 0.1 * torch.randn(len(added), state[n].shape[1], generator=gen)])
    if rows is not None:
        for n in (EMB, HEAD) if HEAD in state else (EMB,):
            state[n] = state[n][:rows].contiguous()
    if swap is not None:
        a, b = swap
        for n in (EMB, HEAD) if HEAD in state else (EMB,):
            state[n][[a, b]] = state[n][[b, a]]
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(str(out))
    if swap is not None:   # exchange the two ids in the BPE vocabulary itself
        tj = json.loads((out / "tokenizer.json").read_text())
        vocab = tj["model"]["vocab"]
        ta, tb = (next(t for t, i in vocab.items() if i == k) for k in swap)
        vocab[ta], vocab[tb] = vocab[tb], vocab[ta]
        (out / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((src / "config.json").read_text())
    cfg["vocab_size"] = state[EMB].shape[0]
    (out / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "generation_config.json", out / "generation_config.json")
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    base = make_base("llama", root / "base", hidden=32, layers=1)
    e = make_expert(base, root / "e", seed=1)
    e2 = make_expert(base, root / "e2", seed=2)
    return {"base": base, "plain": e,
            "grown": _variant(e, root / "grown", added=["<tool>", "<think>"], seed=1),
            "tool": _variant(e2, root / "tool", added=["<tool>"], seed=2),
            "short": _variant(e2, root / "short", rows=398),
            "swapped": _variant(e, root / "swapped", swap=SWAP)}


def _t(path, name=EMB) -> torch.Tensor:
    return CheckpointReader(path).get(name).float()


def _recipe(models, method, experts, tokenizer=None, **params):
    r = {"base": {"path": str(models["base"])}, "method": {"name": method, **params},
         "experts": [{"path": str(models[k]), "weight": w} for k, w in experts]}
    if tokenizer is not None:
        r["tokenizer"] = {"source": tokenizer}
    return r


def test_union_task_arithmetic_matches_a_hand_computation(models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    w = [0.5, 0.3, 0.7]
    out = tmp_path / "out"
    res = merge(_recipe(models, "task_arithmetic", list(zip(["grown", "tool", "short"], w)), "union"), out,
                progress=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 402
    assert "tokenizer.json" in res.copied_files
    for name in (EMB, HEAD):
        m, g, t, s = (_t(models[k], name) for k in ("base", "grown", "tool", "short"))
        got = _t(out, name)
        assert got.shape == (402, 32)
        # rows every model has: the method on the aligned rows
        want = m[:398] + w[0] * (g[:398] - m[:398]) + w[1] * (t[:398] - m[:398]) + w[2] * (s[:398] - m[:398])
        torch.testing.assert_close(got[:398], want)
        # 398, 399: `short` lacks them → filled with the base's row, its task vector is zero there
        want = m[398:400] + w[0] * (g[398:400] - m[398:400]) + w[1] * (t[398:400] - m[398:400])
        torch.testing.assert_close(got[398:400], want)
        # <tool> (400): grown and tool have it → the base and short get the mean of their rows
        f = (g[400] + t[400]) / 2
        torch.testing.assert_close(got[400], f + w[0] * (g[400] - f) + w[1] * (t[400] - f))
        # <think> (401): only grown has it → every model gets grown's row, and so does the result
        torch.testing.assert_close(got[401], g[401])
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 402 and tok.convert_tokens_to_ids(["<tool>", "<think>"]) == [400, 401]
    assert tok("a <tool> b <think>").input_ids[-1] == 401 and 400 in tok("a <tool> b").input_ids
    assert tok.get_vocab() == {**AutoTokenizer.from_pretrained(str(models["base"])).get_vocab(),
                               "<tool>": 400, "<think>": 401}
    model = AutoModelForCausalLM.from_pretrained(str(out))
    gen = model.generate(torch.tensor([tok("a <tool> b").input_ids]), max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == len(tok("a <tool> b").input_ids) + 3


def test_union_linear_aligns_and_fills_from_the_only_holder(models, tmp_path):
    out = tmp_path / "out"
    merge(_recipe(models, "linear", [("grown", 1.0), ("tool", 3.0)], "union"), out, progress=False)
    g, t, got = _t(models["grown"]), _t(models["tool"]), _t(out)
    torch.testing.assert_close(got[:401], (g[:401] + 3 * t[:401]) / 4)   # <tool> is 400 in both
    torch.testing.assert_close(got[401], g[401])                          # <think>: grown's row


def test_row_blocks_and_tied_embeddings(models, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = _recipe(models, "task_arithmetic", [("grown", 0.5), ("tool", 0.5)], "union")
    stale = tmp_path / ".whole.mergelab-vocab-killed"          # as a killed run leaves it
    (stale / "x").mkdir(parents=True)
    merge(recipe, tmp_path / "whole", progress=False)
    assert not stale.exists()
    merge(recipe, tmp_path / "blocks", progress=False, block_bytes=8192)   # the aligned rows in row blocks
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):   # deterministic
        assert (tmp_path / "whole" / f).read_bytes() == (tmp_path / "blocks" / f).read_bytes(), f
    assert not [p for p in tmp_path.iterdir() if "vocab" in p.name]   # the scratch folder is gone
    base = make_base("gemma", tmp_path / "gemma", hidden=32, layers=1)   # lm_head is the embedding
    grown = _variant(make_expert(base, tmp_path / "ge", seed=1), tmp_path / "gg", added=["<tool>"], seed=3)
    out = tmp_path / "tied"
    merge({"base": {"path": str(base)}, "experts": [{"path": str(grown)}], "method": "task_arithmetic",
           "tokenizer": "union"}, out, progress=False)
    assert HEAD not in CheckpointReader(out).keys()
    torch.testing.assert_close(_t(out)[400], _t(grown)[400])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.get_output_embeddings().weight.shape[0] == 401
    model.generate(torch.tensor([[1, 400]]), max_new_tokens=2, do_sample=False)


def test_source_base_drops_the_expert_rows_the_base_lacks(models, tmp_path):
    out = tmp_path / "out"
    merge(_recipe(models, "task_arithmetic", [("grown", 0.5)], "base"), out, progress=False)
    m, g, got = _t(models["base"]), _t(models["grown"]), _t(out)
    assert got.shape == (400, 32)
    torch.testing.assert_close(got, m + 0.5 * (g[:400] - m))
    for f in ("tokenizer.json", "tokenizer_config.json"):   # the base's files, as they are
        assert (out / f).read_bytes() == (models["base"] / f).read_bytes()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 400


def test_rows_are_aligned_by_token_not_by_index(models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["swapped"]))
    text = AutoTokenizer.from_pretrained(str(models["base"])).convert_ids_to_tokens(SWAP[0])
    assert tok.convert_tokens_to_ids(text) == SWAP[1]   # the fixture really swaps
    merge(_recipe(models, "task_arithmetic", [("swapped", 0.6)], "base"), tmp_path / "aligned", progress=False)
    merge(_recipe(models, "task_arithmetic", [("plain", 0.6)]), tmp_path / "plain", progress=False)
    a, b = CheckpointReader(tmp_path / "aligned"), CheckpointReader(tmp_path / "plain")
    for name in a.keys():
        assert torch.equal(a.get(name), b.get(name)), name
    # without a tokenizer section, rows are merged by index: row 100 mixes two tokens
    merge(_recipe(models, "task_arithmetic", [("swapped", 0.6)]), tmp_path / "index", progress=False)
    assert not torch.equal(_t(tmp_path / "index")[SWAP[0]], a.get(EMB)[SWAP[0]].float())


def test_source_named_expert(models, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "out"
    recipe = _recipe(models, "task_arithmetic", [("grown", 0.5), ("plain", 0.5)])
    merge({**recipe, "tokenizer": {"source": str(models["grown"])}}, out, progress=False)
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == \
        AutoTokenizer.from_pretrained(str(models["grown"])).get_vocab()
    g, got = _t(models["grown"]), _t(out)
    torch.testing.assert_close(got[400:], g[400:])


def test_lora_expert_keeps_the_base_vocabulary(models, tmp_path):
    lora = make_lora(models["base"], tmp_path / "lora", seed=3, r=2)
    recipe = _recipe(models, "task_arithmetic", [("grown", 0.5)], "union")
    recipe["experts"].append({"path": str(lora), "weight": 0.5})
    merge(recipe, tmp_path / "out", progress=False)
    m, g, got = _t(models["base"]), _t(models["grown"]), _t(tmp_path / "out")
    torch.testing.assert_close(got[:400], m + 0.5 * (g[:400] - m))   # the adapter leaves embeddings alone
    torch.testing.assert_close(got[400:], g[400:])
    with pytest.raises(RecipeError, match="LoRA adapter, which keeps the base's tokenizer"):
        merge({**recipe, "tokenizer": {"source": str(lora)}}, tmp_path / "bad", progress=False)


def test_vocabulary_mismatch_without_a_tokenizer_section_says_what_to_write(models, tmp_path):
    with pytest.raises(ShapeMismatchError, match="vocabulary sizes differ") as err:
        merge(_recipe(models, "linear", [("grown", 1.0)]), tmp_path / "out", progress=False)
    assert "tokenizer: {source: union}" in str(err.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bad_tokenizer_sources_are_recipe_errors(models, tmp_path):
    with pytest.raises(RecipeError, match=r"tokenizer.source: '?nowhere'? names none of the recipe's models") as err:
        load_recipe(_recipe(models, "linear", [("grown", 1.0)], "nowhere"))
    assert "union" in err.value.hint and str(models["grown"]) in err.value.hint
    with pytest.raises(RecipeError, match="LoRA adapter output keeps the base's tokenizer"):
        load_recipe({**_recipe(models, "linear", [("grown", 1.0)], "union"), "output": {"format": "lora"}})
    # a relative path resolves against the recipe's folder, as the experts' paths do
    rel = load_recipe({**_recipe(models, "linear", [("grown", 1.0)]), "tokenizer": {"source": "grown"}},
                      base_dir=models["grown"].parent)
    assert rel.tokenizer_expert() == 0 and load_recipe(_recipe(models, "linear", [("grown", 1)])).tokenizer is None


def test_mergekit_tokenizer_source_is_translated(models):
    def cfg(**top):
        return {"merge_method": "task_arithmetic", "base_model": str(models["base"]),
                "models": [{"model": str(models["grown"]), "parameters": {"weight": 0.5}}], **top}

    assert load_recipe(cfg()).tokenizer is None
    assert load_recipe(cfg(tokenizer_source="base")).tokenizer.source == "base"
    assert load_recipe(cfg(tokenizer_source="union")).tokenizer.source == "union"
    assert load_recipe(cfg(tokenizer={})).tokenizer.source == "union"   # mergekit's default
    assert load_recipe(cfg(tokenizer_source=str(models["grown"]))).tokenizer_expert() == 0
    assert load_recipe(cfg(tokenizer_source=str(models["base"]))).tokenizer.source == "base"
    with pytest.raises(RecipeError, match="tokens"):
        load_recipe(cfg(tokenizer={"source": "union", "tokens": {"<x>": {"source": "base"}}}))


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_same_tensors_and_vocabulary_as_mergekit_union(models, tmp_path, method):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoTokenizer

    cfg = {"merge_method": method, "tokenizer_source": "union", "dtype": "float32",
           "models": [{"model": str(models["grown"]), "parameters": {"weight": 0.7}},
                      {"model": str(models["tool"]), "parameters": {"weight": 0.4}}]}
    if method == "task_arithmetic":
        cfg["base_model"] = str(models["base"])
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mergekit"),
              MergeOptions(quiet=True, write_model_card=False))
    merge(load_recipe(cfg), tmp_path / "mergelab", progress=False)
    a, b = CheckpointReader(tmp_path / "mergekit"), CheckpointReader(tmp_path / "mergelab")
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():
        torch.testing.assert_close(a.get(name), b.get(name), rtol=1e-5, atol=1e-6)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "mergekit")).get_vocab() == \
        AutoTokenizer.from_pretrained(str(tmp_path / "mergelab")).get_vocab()


def test_a_misspelt_source_gets_a_suggestion(models):
    with pytest.raises(RecipeError, match="'unoin' names none") as err:
        load_recipe(_recipe(models, "linear", [("grown", 1.0)], "unoin"))
    assert err.value.hint.startswith("did you mean union?")


def test_tuning_in_place_refuses_rows_it_would_merge_by_index(models):
    from mergelab.merge.inplace import InPlaceMerger
    from mergelab.testing import load_model

    model = load_model(models["base"])
    InPlaceMerger(load_recipe(_recipe(models, "linear", [("plain", 1.0)], "base")), model)   # same vocabulary
    for expert, source in (("swapped", "base"), ("grown", "union")):
        with pytest.raises(RecipeError, match="tuning in place merges embedding rows by index"):
            InPlaceMerger(load_recipe(_recipe(models, "linear", [(expert, 1.0)], source)), model)
