"""RegMean: the pure method against a hand solution, the measured Gram matrices, and the
merge/LoRA/tune paths that feed them in."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
import yaml

from mergelab.errors import RecipeError
from mergelab.methods import MethodParams, get_method

WORDS = "the quick brown fox jumps over lazy dog yes no true false one two three red blue".split()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Statistics are cached under $MERGELAB_CACHE: one fresh cache per test."""
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spd(n: int, gen: torch.Generator, tokens: int = 40) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=gen, dtype=torch.float64)
    return x.T @ x / tokens


def _hand(base, experts, grams, weights, alpha, ridge, lam):
    """The RegMean formula written out with an explicit inverse, in float64."""
    red = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    m = sum(w * g for w, g in zip(weights, red))
    m = m + ridge * torch.diag(m).mean() * torch.eye(m.shape[0], dtype=m.dtype)
    r = sum(w * (e - base) @ g for w, e, g in zip(weights, experts, red))
    return base + lam * r @ torch.linalg.inv(m)


def _params(weights, grams, **glob) -> MethodParams:
    return MethodParams(globals=glob, experts=[{"weight": w} for w in weights],
                        stats=None if grams is None else [g.float() for g in grams])


# ------------------------------------------------------------------------------- the method


def test_regmean_equals_the_hand_solution():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    experts = [base + 0.1 * torch.randn(5, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    grams = [_spd(6, gen) for _ in range(3)]
    weights = [1.0, 0.5, 2.0]
    fn = get_method("regmean").fn
    got = fn(base.float(), [e.float() for e in experts], _params(weights, grams, alpha=0.7, ridge=1e-3, **{"lambda": 1.4}))
    want = _hand(base, experts, grams, weights, 0.7, 1e-3, 1.4)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_regmean_is_the_least_squares_merge():
    """With alpha 1 and no ridge the result zeroes the gradient of Σᵢ wᵢ‖Xᵢ(W − Wᵢ)ᵀ‖², and its loss is
    below the plain average's."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    experts = [base + torch.randn(4, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    xs = [torch.randn(30, 8, generator=gen, dtype=torch.float64) * (1 + 3 * i) for i in range(2)]
    grams = [x.T @ x / 30 for x in xs]
    w = get_method("regmean").fn(base.float(), [e.float() for e in experts],
                                 _params([1.0, 1.0], grams, alpha=1.0, ridge=0.0)).double()
    grad = sum((w - e) @ g for e, g in zip(experts, grams))
    assert grad.abs().max() < 1e-4

    def loss(v):
        return sum(float(((x @ (v - e).T) ** 2).sum()) / 30 for x, e in zip(xs, experts))

    assert loss(w) < 0.9 * loss(sum(experts) / 2)


def test_equal_grams_give_the_weighted_average_and_no_stats_fall_back_to_it():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(3, 5, generator=gen)
    experts = [base + torch.randn(3, 5, generator=gen) for _ in range(3)]
    weights = [1.0, 3.0, 0.0]
    avg = base + 0.8 * sum(w * (e - base) for w, e in zip(weights, experts)) / 4.0
    g = _spd(5, gen)
    fn = get_method("regmean").fn
    same = fn(base, experts, _params(weights, [g, g, g], alpha=0.5, ridge=0.0, **{"lambda": 0.8}))
    torch.testing.assert_close(same, avg, rtol=1e-5, atol=1e-5)
    none = fn(base, experts, _params(weights, None, **{"lambda": 0.8}))
    torch.testing.assert_close(none, avg, rtol=1e-6, atol=1e-6)
    bias = fn(base[0], [e[0] for e in experts], _params(weights, [g, g, g], **{"lambda": 0.8}))
    torch.testing.assert_close(bias, avg[0], rtol=1e-6, atol=1e-6)   # 1-D: no Gram applies


def test_factor_form_equals_dense_form():
    from mergelab.methods.lowrank import LowRank

    gen = torch.Generator().manual_seed(3)
    parts = [LowRank(torch.randn(7, 2, generator=gen), torch.randn(2, 6, generator=gen)), None,
             LowRank(torch.randn(7, 3, generator=gen), torch.randn(3, 6, generator=gen))]
    grams = [_spd(6, gen) for _ in range(3)]
    p = _params([1.0, 0.5, 2.0], grams, alpha=0.8, **{"lambda": 1.2})
    lr = get_method("regmean").factors(parts, p, (7, 6))
    assert lr.rank == 5
    zero = torch.zeros(7, 6)
    dense = get_method("regmean").fn(zero, [zero if q is None else q.dense() for q in parts], p)
    torch.testing.assert_close(lr.dense(), dense, rtol=1e-5, atol=1e-5)


def test_bad_parameters_are_one_clear_error():
    fn = get_method("regmean").fn
    t = torch.zeros(2, 2)
    with pytest.raises(RecipeError, match="must be ≥ 0 and not all 0"):
        fn(t, [t, t], _params([1.0, -1.0], None))
    g = torch.eye(3)
    with pytest.raises(RecipeError, match="does not fit a weight with 2 inputs"):
        fn(t, [t, t], _params([1.0, 1.0], [g, g]))
    with pytest.raises(RecipeError, match="1 of 2 experts have input statistics"):
        fn(t, [t, t], MethodParams(stats=[torch.eye(2), None]))


# ---------------------------------------------------------------------------- measured Grams


def _data_csv(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
            w.writerow([f"r{i}", text, "", "", "generation"])
    return path


def test_measured_gram_equals_a_row_by_row_sum(zoo, tmp_path):
    """Batched, padded measurement = Σ over rows of XᵀX on unpadded single rows, over all tokens;
    q/k/v and gate/up share one matrix."""
    from mergelab.evaluate import read_competition_csv
    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.merge.statistics import GramOptions, measure_grams

    fz = zoo["llama"]
    model, tok = load_model_and_tokenizer(fz.base, device="cpu", dtype="float32")
    rows = read_competition_csv(_data_csv(tmp_path / "d.csv", 7, 0))
    gs = measure_grams(model, tok, rows, None, GramOptions(rows=7, batch_size=3))
    layer = model.model.layers[1]
    assert gs.aliases["model.layers.1.self_attn.k_proj.weight"] == "model.layers.1.self_attn.q_proj.weight"
    assert gs.aliases["model.layers.1.mlp.up_proj.weight"] == "model.layers.1.mlp.gate_proj.weight"
    assert gs.aliases["model.layers.1.self_attn.o_proj.weight"] == "model.layers.1.self_attn.o_proj.weight"

    seen = {}
    for mod_name, mod in (("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj), ("head", model.lm_head)):
        mod.register_forward_pre_hook(lambda m, a, k=mod_name: seen.setdefault(k, []).append(a[0][0].double()))
    for r in rows:
        ids = tok(r.input, return_tensors="pt")
        model(**ids)
    n = sum(x.shape[0] for x in seen["q"])
    assert gs.tokens == n
    assert not model.config.tie_word_embeddings   # the untied head is measured on every token too
    for key, name in (("q", "model.layers.1.self_attn.q_proj.weight"), ("down", "model.layers.1.mlp.down_proj.weight"),
                      ("head", "lm_head.weight")):
        want = sum(x.T @ x for x in seen[key]) / n
        torch.testing.assert_close(gs.get(name).double(), want, rtol=1e-4, atol=1e-6)


def _regmean_recipe(zoo_family, data, experts=None, **method):
    experts = experts or zoo_family.loras[:2]
    return {"base": {"path": str(zoo_family.base)},
            "experts": [{"path": str(e), "data": str(d)} for e, d in zip(experts, data)],
            "method": {"name": "regmean", **method}}


def test_merge_lora_and_full_outputs_agree_and_load(zoo, tmp_path):
    """The recipe path: statistics measured once and cached, full output = base + adapter output,
    the result loads in transformers and generates, and one tensor matches the formula."""
    from mergelab.merge import statistics as gram
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge import merge
    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.io.adapter import open_lora_expert
    from mergelab.testing import load_model

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 12, i) for i in range(2)]
    rec = _regmean_recipe(fz, data, alpha=0.6, rows=10)
    merge(rec, tmp_path / "full", progress=False)
    cached = sorted((tmp_path / "cache" / "gram").glob("*.safetensors"))
    assert len(cached) == 2
    merge({**rec, "output": {"format": "lora"}}, tmp_path / "adapter", progress=False)
    assert sorted((tmp_path / "cache" / "gram").glob("*.safetensors")) == cached   # reused

    base = CheckpointReader(fz.base)
    full = CheckpointReader(tmp_path / "full")
    merged_adapter = open_lora_expert(tmp_path / "adapter", base)
    experts = [open_lora_expert(p, base) for p in fz.loras[:2]]
    # which cached file is which expert: recompute the keys
    from mergelab.merge.statistics import GramOptions, cache_key
    keys = [cache_key(fz.base, Path(p), [d], sorted({n for e in experts for n in e.modules}),
                      GramOptions(rows=10), None, torch.device("cpu")) for p, d in zip(fz.loras[:2], data)]
    grams = [gram.GramSet.load(tmp_path / "cache" / "gram" / f"{k}.safetensors") for k in keys]
    try:
        assert set(merged_adapter.modules) == {n for e in experts for n in e.modules}
        for name in merged_adapter.modules:
            torch.testing.assert_close(merged_adapter.get(name), full.get(name), rtol=1e-5, atol=1e-6)
        name = "model.layers.0.self_attn.v_proj.weight"
        w0 = base.get(name).double()
        want = _hand(w0, [w0 + (e.delta(name).double() if e.delta(name) is not None else 0) for e in experts],
                     [g.get(name).double() for g in grams], [1.0, 1.0], 0.6, 1e-6, 1.0)
        torch.testing.assert_close(full.get(name).double(), want, rtol=1e-5, atol=1e-6)
        untouched = "model.layers.0.mlp.down_proj.weight"
        assert torch.equal(full.get(untouched), base.get(untouched))
    finally:
        for r in (base, full, merged_adapter, *experts):
            r.close()
    model = load_model(tmp_path / "full")
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    m2, _ = load_model_and_tokenizer(fz.base, adapter=tmp_path / "adapter", device="cpu", dtype="float32")
    torch.testing.assert_close(m2.state_dict()[name], model.state_dict()[name], rtol=1e-5, atol=1e-6)
    assert torch.equal(m2.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False), out)


def test_full_experts_and_t5(zoo, tmp_path):
    """Full fine-tunes: every linear layer gets statistics; embeddings and norms take the mean."""
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge import merge

    for fam in ("llama", "t5"):
        fz = zoo[fam]
        data = [_data_csv(tmp_path / f"{fam}{i}.csv", 6, i) for i in range(2)]
        out = tmp_path / f"out_{fam}"
        merge(_regmean_recipe(fz, data, experts=fz.experts[:2], rows=6), out, progress=False)
        base, merged = CheckpointReader(fz.base), CheckpointReader(out)
        e = [CheckpointReader(p) for p in fz.experts[:2]]
        try:
            norm = next(k for k in base.keys() if "norm" in k or "layer_norm" in k)
            torch.testing.assert_close(merged.get(norm), (e[0].get(norm) + e[1].get(norm)) / 2)
            lin = next(k for k in base.keys() if k.endswith(("q_proj.weight", ".q.weight")))
            mean = (e[0].get(lin) + e[1].get(lin)) / 2
            assert not torch.allclose(merged.get(lin), mean, atol=1e-7)   # the Grams did something
        finally:
            for r in (base, merged, *e):
                r.close()


def test_cached_statistics_are_not_measured_again(zoo, tmp_path, monkeypatch):
    from mergelab.merge import statistics as gram
    from mergelab.merge import merge

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 5, i) for i in range(2)]
    rec = _regmean_recipe(fz, data, rows=5)
    merge(rec, tmp_path / "a", progress=False)

    def boom(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr(gram, "measure_grams", boom)
    merge(rec, tmp_path / "b", progress=False)
    data[1].write_text(data[1].read_text().replace("r0,", "r0,changed "))
    with pytest.raises(AssertionError, match="measured again"):
        merge(rec, tmp_path / "c", progress=False)


def test_recipe_errors_name_the_key(zoo, tmp_path):
    from mergelab.recipe import load_recipe

    fz = zoo["llama"]
    d = _data_csv(tmp_path / "d.csv", 3, 0)
    rec = _regmean_recipe(fz, [d, d])
    del rec["experts"][1]["data"]
    with pytest.raises(RecipeError, match=r"experts\[1\]\.data: regmean needs unlabelled inputs"):
        load_recipe(rec)
    rec = _regmean_recipe(fz, [d, tmp_path / "missing.csv"])
    with pytest.raises(RecipeError, match=r"experts\[1\]\.data\[0\]: file .*missing.csv does not exist"):
        load_recipe(rec)
    rec = _regmean_recipe(fz, [d, d])
    rec["method"] = {"name": "ties"}
    with pytest.raises(RecipeError, match=r"experts\[0\]\.data: ties does not use data"):
        load_recipe(rec)
    rec = _regmean_recipe(fz, [d, d], alpha=1.5)
    with pytest.raises(RecipeError, match=r"method\.alpha: expected a number between 0 and 1"):
        load_recipe(rec)
    # relative data paths count from the recipe file
    path = tmp_path / "r.yaml"
    rec = _regmean_recipe(fz, ["d.csv", "d.csv"])
    path.write_text(yaml.safe_dump({**rec, "eval": {"few_shot": 1, "shots": "shots.csv"}}))
    loaded = load_recipe(path)
    assert loaded.experts[0].data == [tmp_path / "d.csv"]
    assert loaded.eval["shots"] == str(tmp_path / "shots.csv")   # the prompts of the statistics pass


def test_tune_trial_with_regmean_equals_the_written_merge(zoo, tmp_path):
    """The in-place trial merge of tune gets the same statistics and gives the engine's weights."""
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge import merge
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model
    from mergelab.merge.inplace import InPlaceMerger

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 8, i) for i in range(3)]
    rec = _regmean_recipe(fz, data, experts=fz.loras, rows=8, alpha=0.5, **{"lambda": 1.3})
    rec["experts"][2]["weight"] = 0.4
    recipe = load_recipe(rec)
    model = load_model(fz.base)
    InPlaceMerger(recipe, model).apply(recipe)
    merge(recipe, tmp_path / "merged", progress=False)
    r = CheckpointReader(tmp_path / "merged")
    try:
        got = model.state_dict()
        for name in r.keys():
            torch.testing.assert_close(got[name], r.get(name), rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")
    finally:
        r.close()


def test_tune_starts_from_regmean_and_finds_a_known_lambda(zoo, tmp_path):
    """A tune study on a regmean recipe: its first trial is the recipe's own RegMean, the search
    finds the λ of a target RegMean merge, and the tuned recipe keeps each expert's data and
    merges to the best trial's weights."""
    from mergelab.merge import merge
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model
    from mergelab.tune import run_tune
    from mergelab.merge.inplace import InPlaceMerger

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 6, i) for i in range(2)]
    rec = _regmean_recipe(fz, data, rows=6, alpha=0.5)
    model = load_model(fz.base)
    target_rec = load_recipe({**rec, "method": {**rec["method"], "lambda": 1.6}})
    InPlaceMerger(target_rec, model).apply(target_rec)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    target = {n: model.state_dict()[n].clone() for n in names}

    def objective(m, part):
        dist = sum(float((m.state_dict()[n] - target[n]).norm()) for n in names)
        return -dist, {"synthetic": -dist}

    val = tmp_path / "val.csv"
    val.write_text("id,input,target,answer_choices,eval_type\n"
                   + "".join(f'r{i},q {i},0,"[""a"", ""b""]",multiple_choice\n' for i in range(4)))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**rec, "method": {**rec["method"], "lambda": 1.0},
                                    "tune": {"params": {"lambda": {"low": 0.5, "high": 2.5}},
                                             "data": [str(val)], "trials": 20, "seed": 1}}))
    res = run_tune(path, tmp_path / "out", objective=objective, direction="maximize")
    start = next(t for t in res.trials if t.start)
    assert start.values == {"lambda": 1.0}
    assert abs(res.best.values["lambda"] - 1.6) < 0.05
    tuned = load_recipe(tmp_path / "out" / "recipe.tuned.yaml")
    assert [e.data for e in tuned.experts] == [[d] for d in data]
    assert tuned.method.params["lambda"] == res.best.values["lambda"]
    merge(tuned, tmp_path / "merged", progress=False)
    r = CheckpointReader(tmp_path / "merged")
    try:
        base = load_model(fz.base).state_dict()
        for n in names:   # within 5 % of the target's change from the base (λ off by < 0.05 of 1.6)
            assert float((r.get(n) - target[n]).norm()) <= 0.05 * float((target[n] - base[n]).norm())
    finally:
        r.close()


def test_run_records_the_data_and_reruns_when_it_changes(zoo, tmp_path):
    """`mergelab run` hashes each expert's data with its inputs; a rerun with unchanged data skips
    the merge, changed data merges again (and `reproduce` would name the file)."""
    from mergelab.util import sha256_file
    from mergelab.run.pipeline import run_recipe

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 5, i) for i in range(2)]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_regmean_recipe(fz, data, rows=5)))
    out = tmp_path / "run"
    first = run_recipe(path, out, rules=False)
    experts = [m for m in first.manifest["models"] if m["role"].startswith("expert")]
    assert [m["files"][f"data:{d}"] for m, d in zip(experts, data)] == [sha256_file(d) for d in data]
    again = run_recipe(path, out, rules=False)
    assert {s.name: s.status for s in again.stages}["merge"] == "skipped"
    data[0].write_text(data[0].read_text().replace("r1,", "r1,more words "))
    third = run_recipe(path, out, rules=False)
    assert {s.name: s.status for s in third.stages}["merge"] == "ran"
    assert third.manifest["outputs"] != first.manifest["outputs"]
