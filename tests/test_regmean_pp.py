"""RegMean++ (`regmean_pp`): statistics measured in the merged model, layer by layer — against a
hand-built merged model, against RegMean on layer 0, the two ways of feeding the layers against
each other, the merge paths, the cache key and the tune trial."""
from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch

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


def _data_csv(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
        for i in range(n):
            w.writerow([f"r{i}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))), "", "", "generation"])
    return path


def _hand(base, experts, grams, weights, alpha, ridge, lam):
    """The RegMean formula written out with an explicit inverse, in float64."""
    red = [alpha * g + (1 - alpha) * torch.diag(torch.diag(g)) for g in grams]
    m = sum(w * g for w, g in zip(weights, red))
    m = m + ridge * torch.diag(m).mean() * torch.eye(m.shape[0], dtype=m.dtype)
    r = sum(w * (e - base) @ g for w, e, g in zip(weights, experts, red))
    return base + lam * r @ torch.linalg.inv(m)


def _recipe(base, experts, data, name="regmean_pp", **method):
    return {"base": {"path": str(base)},
            "experts": [{"path": str(e), "data": str(d)} for e, d in zip(experts, data)],
            "method": {"name": name, **method}}


def _pass(rec, experts, mode="auto", cache=False):
    """(RegMean++'s statistics, each expert's own statistics) of a loaded recipe."""
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge.inputs import open_expert
    from mergelab.merge.merged_stats import merged_grams
    from mergelab.merge.statistics import changed_names, own_grams

    base = rec.base.resolve()
    reader = CheckpointReader(base)
    srcs = [open_expert(e, reader) for e in experts]
    names = changed_names(srcs)
    for s in (*srcs, reader):
        s.close()
    return (merged_grams(rec, base, experts, names=names, mode=mode, cache=cache),
            own_grams(rec, base, experts, names=names))


# ------------------------------------------------------------------------------- the method


def test_regmean_pp_is_regmean_with_other_statistics():
    """The same closed form and factor form as RegMean; only where the statistics come from differs."""
    pp, rm = get_method("regmean_pp"), get_method("regmean")
    assert pp.needs_gram and pp.merged_stats and not rm.merged_stats
    assert pp.factors is rm.factors and pp.global_params == rm.global_params and pp.expert_params == rm.expert_params
    assert "arXiv:2508.03121" in pp.doc
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(5, 6, generator=gen)
    experts = [base + 0.1 * torch.randn(5, 6, generator=gen) for _ in range(2)]
    x = [torch.randn(30, 6, generator=gen) for _ in range(2)]
    p = MethodParams(globals={"alpha": 0.7}, experts=[{"weight": 1.0}, {"weight": 2.0}], stats=[v.T @ v / 30 for v in x])
    assert torch.equal(pp.fn(base, experts, p), rm.fn(base, experts, p))


# ------------------------------------------------------------------------- the measured pass


def test_layer0_is_regmeans_and_layer1_is_measured_on_the_merged_layer0(zoo, tmp_path):
    """Two LoRA experts of the 2-layer Llama: layer 0's matrices are RegMean's (the merged
    embeddings are the base's); layer 1's are those of a model built by hand — layer 0 merged with
    the RegMean formula from layer 0's matrices, layer 1 the expert's own — run on the expert's
    rows one at a time, unpadded."""
    from mergelab.evaluate import read_competition_csv
    from mergelab.io.adapter import open_lora_expert
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model
    from mergelab.evaluate.loading import load_tokenizer

    fz = zoo["llama"]
    experts = fz.loras[:2]            # q/v rank 4; q/k/v/o rank 8
    data = [_data_csv(tmp_path / f"d{i}.csv", 6, i) for i in range(2)]
    rec = load_recipe(_recipe(fz.base, experts, data, alpha=0.6, rows=6))
    pp, own = _pass(rec, experts)

    layer0 = [f"model.layers.0.self_attn.{m}_proj.weight" for m in "qkvo"]
    for i in range(2):
        for n in layer0:
            torch.testing.assert_close(pp[i].get(n), own[i].get(n), rtol=1e-5, atol=1e-7)

    reader = CheckpointReader(fz.base)
    srcs = [open_lora_expert(e, reader) for e in experts]
    tok = load_tokenizer(fz.base)
    try:
        merged0 = {}
        for n in layer0:
            w0 = reader.get(n).double()
            ws = [w0 if s.delta(n) is None else w0 + s.delta(n).double() for s in srcs]
            merged0[n] = _hand(w0, ws, [g.get(n).double() for g in own], [1.0, 1.0], 0.6, 1e-6, 1.0)
        for i, src in enumerate(srcs):
            model = load_model(fz.base)
            sd = model.state_dict()
            with torch.no_grad():
                for n, w in merged0.items():
                    sd[n].copy_(w.float())
                for n in src.modules:
                    if n.startswith("model.layers.1."):
                        sd[n].copy_(src.get(n))
            seen: dict[str, list] = {}
            layer1 = model.model.layers[1].self_attn
            for key, mod in (("q", layer1.q_proj), ("o", layer1.o_proj)):
                mod.register_forward_pre_hook(lambda m, a, k=key: seen.setdefault(k, []).append(a[0][0].double()))
            with torch.no_grad():
                for r in read_competition_csv(data[i]):
                    model(**tok(r.input, return_tensors="pt"))
            for key in ("q", "o"):
                xs = seen[key]
                want = sum(x.T @ x for x in xs) / sum(x.shape[0] for x in xs)
                name = f"model.layers.1.self_attn.{key}_proj.weight"
                torch.testing.assert_close(pp[i].get(name).double(), want, rtol=1e-4, atol=1e-6)
                # …and they are not RegMean's: the merged layer 0 feeds layer 1 something else
                assert (own[i].get(name) - pp[i].get(name)).abs().max() > 1e-3 * want.abs().max()
    finally:
        for s in (*srcs, reader):
            s.close()


def test_cached_and_rerun_passes_agree(zoo, tmp_path):
    """Full fine-tunes (every linear layer and the untied head, measured in the whole merged
    model): layer by layer on cached hidden states = rerunning the model up to each layer. T5's
    layers take the first layer's position bias and the decoder reads the encoder: only reruns."""
    from mergelab.merge.statistics import GramError
    from mergelab.recipe import load_recipe

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 5, i) for i in range(2)]
    rec = load_recipe(_recipe(fz.base, fz.experts[:2], data, rows=5, **{"lambda": 0.8}))
    cached, own = _pass(rec, fz.experts[:2], mode="cached")
    rerun, _ = _pass(rec, fz.experts[:2], mode="rerun")
    for a, b, o in zip(cached, rerun, own):
        assert set(a.tensors) == set(b.tensors) == set(o.tensors) and "lm_head.weight" in a.tensors
        assert a.aliases == b.aliases == o.aliases and a.tokens == b.tokens == o.tokens
        for k in a.tensors:
            torch.testing.assert_close(a.tensors[k], b.tensors[k], rtol=1e-6, atol=1e-8)

    t5 = zoo["t5"]
    rec = load_recipe(_recipe(t5.base, t5.loras[:2], data, rows=5))
    with pytest.raises(GramError, match="do not form one chain"):
        _pass(rec, t5.loras[:2], mode="cached")
    pp, own = _pass(rec, t5.loras[:2])
    first = "encoder.block.0.layer.0.SelfAttention.q.weight"          # fed by the embeddings: RegMean's
    cross = "decoder.block.0.layer.1.EncDecAttention.k.weight"        # fed by the merged encoder
    for a, o in zip(pp, own):
        torch.testing.assert_close(a.get(first), o.get(first), rtol=1e-5, atol=1e-7)
        assert (a.get(cross) - o.get(cross)).abs().max() > 1e-3 * o.get(cross).abs().max()


# ---------------------------------------------------------------------------- the merge paths


def test_merge_full_and_adapter_outputs_agree_load_and_generate(zoo, tmp_path):
    """LoRA experts: the full output is base + the adapter output, the statistics are measured once
    and cached, a layer-1 weight is the RegMean formula on the merged-model matrices, layer 0 is
    plain RegMean's merge, and both outputs load and generate the same tokens."""
    from mergelab.evaluate.loading import load_model_and_tokenizer
    from mergelab.io.adapter import open_lora_expert
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge import merge
    from mergelab.merge.merged_stats import merge_context
    from mergelab.merge.statistics import GramOptions, GramSet, cache_key
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model

    fz = zoo["llama"]
    experts = fz.loras[:2]
    data = [_data_csv(tmp_path / f"d{i}.csv", 8, i) for i in range(2)]
    rec = _recipe(fz.base, experts, data, alpha=0.6, rows=8)
    merge(rec, tmp_path / "full", progress=False)
    gram_dir = tmp_path / "cache" / "gram"
    cached = sorted(gram_dir.glob("*.safetensors"))
    assert len(cached) == 2
    merge({**rec, "output": {"format": "lora"}}, tmp_path / "adapter", progress=False)
    assert sorted(gram_dir.glob("*.safetensors")) == cached      # reused
    merge({**rec, "method": {**rec["method"], "name": "regmean"}}, tmp_path / "plain", progress=False)

    base, full, plain = (CheckpointReader(p) for p in (fz.base, tmp_path / "full", tmp_path / "plain"))
    adapter = open_lora_expert(tmp_path / "adapter", base)
    srcs = [open_lora_expert(p, base) for p in experts]
    loaded = load_recipe(rec)
    names = sorted({n for s in srcs for n in s.modules})
    keys = [cache_key(fz.base, Path(e), [d], names, GramOptions(rows=8), None, torch.device("cpu"),
                      merged=merge_context(loaded, experts, i)) for i, (e, d) in enumerate(zip(experts, data))]
    grams = [GramSet.load(gram_dir / f"{k}.safetensors") for k in keys]
    try:
        assert set(adapter.modules) == set(names)
        for n in adapter.modules:
            torch.testing.assert_close(adapter.get(n), full.get(n), rtol=1e-5, atol=1e-6)
        for layer in (0, 1):
            n = f"model.layers.{layer}.self_attn.v_proj.weight"
            w0 = base.get(n).double()
            want = _hand(w0, [w0 + s.delta(n).double() for s in srcs], [g.get(n).double() for g in grams],
                         [1.0, 1.0], 0.6, 1e-6, 1.0)
            torch.testing.assert_close(full.get(n).double(), want, rtol=1e-5, atol=1e-6)
            if layer == 0:
                torch.testing.assert_close(full.get(n), plain.get(n), rtol=1e-5, atol=1e-7)
            else:
                assert not torch.allclose(full.get(n), plain.get(n), atol=1e-5)
        untouched = "model.layers.1.mlp.down_proj.weight"
        assert torch.equal(full.get(untouched), base.get(untouched))
    finally:
        for r in (base, full, plain, adapter, *srcs):
            r.close()
    model = load_model(tmp_path / "full")
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
    m2, _ = load_model_and_tokenizer(fz.base, adapter=tmp_path / "adapter", device="cpu", dtype="float32")
    assert torch.equal(m2.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False), out)


@pytest.mark.parametrize("family", ["gemma", "t5"])
def test_full_experts_merge_load_and_generate(zoo, tmp_path, family):
    """Full fine-tunes of Gemma (tied head; cached pass) and T5 (reruns): norms take the mean,
    linear layers move away from it, and the merged model generates."""
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge import merge
    from mergelab.testing import load_model

    fz = zoo[family]
    data = [_data_csv(tmp_path / f"d{i}.csv", 5, i) for i in range(2)]
    merge(_recipe(fz.base, fz.experts[:2], data, rows=5), tmp_path / "out", progress=False)
    merged, e = CheckpointReader(tmp_path / "out"), [CheckpointReader(p) for p in fz.experts[:2]]
    try:
        keys = merged.keys()
        norm = next(k for k in keys if "norm" in k)
        torch.testing.assert_close(merged.get(norm), (e[0].get(norm) + e[1].get(norm)) / 2)
        deep = [k for k in keys if ".1." in k and k.endswith(("o_proj.weight", ".o.weight"))][-1]
        assert not torch.allclose(merged.get(deep), (e[0].get(deep) + e[1].get(deep)) / 2, atol=1e-6)
    finally:
        for r in (merged, *e):
            r.close()
    model = load_model(tmp_path / "out")
    assert model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3, do_sample=False).shape[0] == 1


# ----------------------------------------------------------------------------- cache and tune


def test_the_cache_key_covers_the_whole_merge(zoo, tmp_path, monkeypatch):
    """Merged-model statistics are keyed apart from each expert's own and by every part of the
    merge; an unchanged recipe reads them back, a changed parameter measures again."""
    from mergelab.merge import merge, merged_stats
    from mergelab.merge.merged_stats import merge_context
    from mergelab.merge.statistics import GramOptions, cache_key
    from mergelab.recipe import load_recipe

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 4, i) for i in range(2)]
    raw = _recipe(fz.base, fz.loras[:2], data, rows=4)

    def key(rec, i=0):
        rec = load_recipe(rec)
        return cache_key(fz.base, fz.loras[i], [data[i]], None, GramOptions(rows=4), None, torch.device("cpu"),
                         merged=merge_context(rec, fz.loras[:2], i))

    own = cache_key(fz.base, fz.loras[0], [data[0]], None, GramOptions(rows=4), None, torch.device("cpu"))
    k0 = key(raw)
    assert k0 != own and k0 == key(raw) and k0 != key(raw, 1)
    assert k0 != key({**raw, "method": {**raw["method"], "lambda": 1.3}})
    assert k0 != key({**raw, "method": {**raw["method"], "alpha": 0.5}})
    assert k0 != key({**raw, "experts": [raw["experts"][0], {**raw["experts"][1], "weight": 2.0}]})
    assert k0 != key({**raw, "output": {"dtype": "bfloat16"}})
    other = _data_csv(tmp_path / "other.csv", 4, 7)   # the other expert's data change this expert's stats
    assert k0 != key({**raw, "experts": [raw["experts"][0], {**raw["experts"][1], "data": str(other)}]})

    merge(raw, tmp_path / "a", progress=False)
    runs = []
    real = merged_stats._MergedPass.run
    monkeypatch.setattr(merged_stats._MergedPass, "run", lambda self, *a: runs.append(1) or real(self, *a))
    merge(raw, tmp_path / "b", progress=False)
    assert runs == []
    merge({**raw, "method": {**raw["method"], "lambda": 0.7}}, tmp_path / "c", progress=False)
    assert runs == [1]


def test_tune_trial_measures_again_and_equals_the_written_merge(zoo, tmp_path):
    """The in-place trial merge of tune: a trial with another λ measures the statistics of that
    merge, and its weights are the written merge's."""
    from mergelab.io.checkpoint import CheckpointReader
    from mergelab.merge import merge
    from mergelab.merge.inplace import InPlaceMerger
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model

    fz = zoo["llama"]
    data = [_data_csv(tmp_path / f"d{i}.csv", 6, i) for i in range(2)]
    start = load_recipe(_recipe(fz.base, fz.loras[:2], data, rows=6, alpha=0.5))
    trial = load_recipe(_recipe(fz.base, fz.loras[:2], data, rows=6, alpha=0.5, **{"lambda": 1.4}))
    model = load_model(fz.base)
    merger = InPlaceMerger(start, model)
    first = {n: g[0].clone() for n, g in merger.stats.items() if n.startswith("model.layers.1.")}
    merger.apply(trial)
    assert any(not torch.equal(first[n], merger.stats[n][0]) for n in first)
    merge(trial, tmp_path / "merged", progress=False)
    r = CheckpointReader(tmp_path / "merged")
    try:
        got = model.state_dict()
        for name in r.keys():
            torch.testing.assert_close(got[name], r.get(name), rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")
    finally:
        r.close()


def test_the_plan_counts_the_passes_of_the_merged_model(zoo, tmp_path):
    """`mergelab plan`: measuring in the merged model costs 3 forward passes per row on a decoder
    with LoRA experts (4 with full experts and an untied head), (L + 1)/2 on T5 (reruns)."""
    import yaml

    from mergelab.plan import plan_recipe

    data = [_data_csv(tmp_path / f"d{i}.csv", 5, i) for i in range(2)]

    def stats(family, kind, name):
        fz = zoo[family]
        path = tmp_path / f"{family}-{kind}-{name}.yaml"
        path.write_text(yaml.safe_dump(_recipe(fz.base, getattr(fz, kind)[:2], data, name=name, rows=5)))
        return plan_recipe(path, hardware="a6000", budget="60m").stage("statistics")

    for family, kind, passes in (("llama", "loras", 3.0), ("llama", "experts", 4.0), ("t5", "loras", 2.5)):
        plain, pp = stats(family, kind, "regmean"), stats(family, kind, "regmean_pp")
        assert pp.parts["prefill"] == pytest.approx(passes * plain.parts["prefill"])
        assert pp.parts["overhead"] == pytest.approx(passes * plain.parts["overhead"])
        assert pp.parts["gram"] == plain.parts["gram"] and "merged model" in pp.detail
