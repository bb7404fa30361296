"""Merging LoRA adapters in ΔW space: adapter output (exact and truncated), full output, mixed
experts, the routes of every kind of method, the merge report, determinism and errors."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mergelab.io.checkpoint import CheckpointReader
from mergelab.merge import merge
from mergelab.errors import AdapterError, MergelabError, OutputExistsError, RecipeError
from mergelab.methods.lowrank import LowRank
from mergelab.io.adapter import load_adapter, open_lora_expert
from mergelab.merge.adapter import merge_to_adapter
from mergelab.methods import get_method
from mergelab.recipe import load_recipe, resolve_params
from mergelab.testing import load_model, make_lora


def _recipe(fz, method, experts=None, output=None, **kw):
    ex = experts if experts is not None else [{"path": str(p)} for p in fz.loras]
    data = {"base": {"path": str(fz.base)}, "experts": ex, "method": method, **kw}
    if output is not None:
        data["output"] = output
    return load_recipe(data)


def _adapter_deltas(folder) -> dict[str, torch.Tensor]:
    """ΔW per base tensor name of a written adapter, straight from its file and config."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    assert not cfg["use_rslora"]
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len("base_model.model."):-len(".lora_A.weight")]
        b = tensors[key.replace("lora_A", "lora_B")]
        r = cfg["rank_pattern"].get(path, cfg["r"])
        alpha = cfg["alpha_pattern"].get(path, cfg["lora_alpha"])
        assert a.shape[0] == r
        out[path + ".weight"] = (alpha / r) * (b.double() @ a.double())
    return out


def _expert_deltas(fz, loras):
    base = CheckpointReader(fz.base)
    return base, [open_lora_expert(p, base) for p in loras]


def _report(folder):
    return json.loads((folder / "merge_report.json").read_text())


# ------------------------------------------------------------------------------- exact routes


@pytest.mark.parametrize("method", [
    {"name": "linear"},                                   # weights 1, 2, 0.5, normalised
    {"name": "task_arithmetic", "lambda": 0.7},
    {"name": "cat"},
])
def test_linear_merge_as_adapter_equals_the_materialised_delta_merge(zoo, tmp_path, method):
    """Mixed ranks (4, 8, 2), rsLoRA, and modules that only some adapters have: the adapter holds
    exactly Σ cᵢ ΔWᵢ, with rank Σ rᵢ of the adapters that have the module."""
    fz = zoo["llama"]
    weights = [1.0, 2.0, 0.5]
    experts = [{"path": str(p), "weight": w} for p, w in zip(fz.loras, weights)]
    out = tmp_path / "out"
    res = merge(_recipe(fz, method, experts=experts, output={"format": "lora"}), out, progress=False)
    assert res.routes == {"factors" if method["name"] == "cat" else "concat": res.modules}
    base, srcs = _expert_deltas(fz, fz.loras)
    coeffs = {"linear": [w / sum(weights) for w in weights],
              "task_arithmetic": [0.7 * w for w in weights], "cat": weights}[method["name"]]
    got = _adapter_deltas(out)
    names = {n for s in srcs for n in s.modules}
    assert set(got) == names
    report = _report(out)
    for name in names:
        want = sum(c * s.delta(name).double() for c, s in zip(coeffs, srcs) if name in s.modules)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6 * float(want.abs().max()), msg=name)
        rank = sum(s.modules[name].rank for s in srcs if name in s.modules)
        assert report["modules"][name]["rank"] == report["modules"][name]["input_rank"] == rank
        assert report["modules"][name]["rel_error"] == 0.0
    assert report["summary"]["max_rel_error"] == 0.0


def test_rank_pattern_adapters_merge_exactly(zoo, tmp_path):
    fz = zoo["mistral"]
    pat = make_lora(fz.base, tmp_path / "pat", seed=9, r=4, alpha=6, target_modules=["q_proj", "v_proj", "o_proj"],
                    rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6}, alpha_pattern={"o_proj": 1.5})
    loras = [pat, fz.loras[1]]  # + rsLoRA r=8 on q/k/v/o
    out = tmp_path / "out"
    merge(_recipe(fz, {"name": "cat"}, experts=[{"path": str(p)} for p in loras], output={"format": "lora"}),
          out, progress=False)
    base, srcs = _expert_deltas(fz, loras)
    got = _adapter_deltas(out)
    for name in got:
        want = sum(s.delta(name).double() for s in srcs if name in s.modules)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6 * float(want.abs().max()), msg=name)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"]  # ranks 4+8, 2+8, 6+8, 4 (k_proj: 8 only) ...
    assert cfg["rank_pattern"]["model.layers.1.self_attn.q_proj"] == 14


def test_lower_rank_asked_for_is_an_exact_svd_with_its_error_recorded(zoo, tmp_path):
    fz = zoo["gemma"]
    out = tmp_path / "out"
    merge(_recipe(fz, {"name": "task_arithmetic"}, output={"format": "lora", "rank": 3}), out, progress=False)
    base, srcs = _expert_deltas(fz, fz.loras)
    got, report = _adapter_deltas(out), _report(out)
    for name, entry in report["modules"].items():
        full = sum(s.delta(name).double() for s in srcs if name in s.modules)
        s = torch.linalg.svdvals(full)
        k = min(3, entry["input_rank"])
        assert entry["rank"] == k
        eckart_young = float((s[k:] ** 2).sum().sqrt() / s.norm())
        direct = float((full - got[name]).norm() / full.norm())
        assert entry["rel_error"] == pytest.approx(eckart_young, rel=1e-3, abs=1e-6)
        assert entry["rel_error"] == pytest.approx(direct, rel=1e-3, abs=1e-6)


# ------------------------------------------------------------------------------- dense routes


def test_ties_adapter_equals_the_full_merge_minus_the_base(zoo, tmp_path):
    """TIES through the factors (adapter output, lossless rank) = the engine's TIES on
    base + ΔWᵢ (full output), minus the base."""
    fz = zoo["llama"]
    method = {"name": "ties", "density": 0.4, "lambda": 0.9}
    experts = [{"path": str(p), "weight": w} for p, w in zip(fz.loras, (1.0, 0.6, -0.8))]
    lora_out, full_out = tmp_path / "lora", tmp_path / "full"
    res = merge(_recipe(fz, method, experts=experts, output={"format": "lora", "rank": 64}), lora_out, progress=False)
    assert res.routes == {"ties-factors": res.modules}
    merge(_recipe(fz, method, experts=experts), full_out, progress=False)
    base, merged = CheckpointReader(fz.base), CheckpointReader(full_out)
    got = _adapter_deltas(lora_out)
    for name in got:
        want = merged.get(name).double() - base.get(name).double()
        torch.testing.assert_close(got[name], want, rtol=0, atol=2e-6 * float(want.abs().max()), msg=name)
        assert _report(lora_out)["modules"][name]["rel_error"] < 1e-5


def test_truncation_error_of_a_dense_route_is_recorded_and_correct(zoo, tmp_path):
    fz = zoo["mistral"]
    out = tmp_path / "out"
    method = {"name": "ties", "density": 0.3}
    recipe = _recipe(fz, method, output={"format": "lora", "rank": 5})
    merge(recipe, out, progress=False)
    base, srcs = _expert_deltas(fz, fz.loras)
    got, report = _adapter_deltas(out), _report(out)
    ties = get_method("ties")
    for name, entry in report["modules"].items():
        deltas = [s.delta(name) if name in s.modules else torch.zeros(base.shape(name)) for s in srcs]
        full = ties.fn(torch.zeros(base.shape(name)), deltas, resolve_params(recipe, name, 2)).double()
        direct = float((full - got[name]).norm() / full.norm())
        s = torch.linalg.svdvals(full)
        assert entry["rank"] == 5
        assert entry["rel_error"] == pytest.approx(direct, rel=1e-4)
        assert entry["rel_error"] == pytest.approx(float((s[5:] ** 2).sum().sqrt() / s.norm()), rel=1e-3)
    # an energy threshold keeps the fewest singular directions that reach it
    out2 = tmp_path / "energy"
    merge(_recipe(fz, method, output={"format": "lora", "energy": 0.8}), out2, progress=False)
    for name, entry in _report(out2)["modules"].items():
        assert entry["rel_error"] ** 2 <= 0.2 + 1e-9
        deltas = [s.delta(name) if name in s.modules else torch.zeros(base.shape(name)) for s in srcs]
        s = torch.linalg.svdvals(ties.fn(torch.zeros(base.shape(name)), deltas, resolve_params(recipe, name, 2)))
        captured = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
        assert entry["rank"] == int((captured < 0.8).sum()) + 1


def test_dare_goes_dense_and_slerp_goes_through_the_base(zoo, tmp_path):
    fz = zoo["llama"]
    res = merge(_recipe(fz, {"name": "dare_ties", "density": 0.5}, output={"format": "lora", "rank": 64}),
                tmp_path / "dare", progress=False)
    assert res.routes == {"dense": res.modules}
    # SLERP is not a task-vector method: ΔW = slerp(W, W + ΔW₁, t) − W, rarely low rank
    recipe = _recipe(fz, {"name": "slerp", "t": 0.5}, experts=[{"path": str(fz.loras[0])}],
                     output={"format": "lora", "rank": 64})
    res = merge(recipe, tmp_path / "slerp", progress=False)
    assert res.routes == {"dense-from-base": res.modules}
    base, (src,) = _expert_deltas(fz, fz.loras[:1])
    got = _adapter_deltas(tmp_path / "slerp")
    slerp = get_method("slerp")
    for name in src.modules:
        w = base.get(name)
        want = (slerp.fn(w, [src.get(name)], resolve_params(recipe, name, 2)) - w).double()
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("method", [
    {"name": "tsv"}, {"name": "tsv", "k": 2, "lambda": 1.2}, {"name": "iso_c", "lambda": 0.8},
    {"name": "knots"}, {"name": "knots", "merge": "dare_ties", "density": 0.6},
])
def test_subspace_methods_on_factors_equal_their_dense_form(zoo, tmp_path, method):
    fz = zoo["t5"]
    recipe = _recipe(fz, method, output={"format": "lora"})
    res = merge(recipe, tmp_path / "out", progress=False)
    assert res.routes == {"factors": res.modules}
    base, srcs = _expert_deltas(fz, fz.loras)
    got = _adapter_deltas(tmp_path / "out")
    spec = get_method(method["name"])
    for name in sorted({n for s in srcs for n in s.modules})[:6]:
        w = base.get(name)
        experts = [s.get(name) for s in srcs]
        want = (spec.fn(w, experts, resolve_params(recipe, name, 2)) - w).double()
        torch.testing.assert_close(got.get(name, torch.zeros_like(want)), want, rtol=0,
                                   atol=2e-5 * float(want.abs().max()), msg=name)


def test_a_layer_list_scale_grows_iso_c_with_depth_as_lines(zoo, tmp_path):
    """LiNeS' layer-increasing scale is a layer list of Iso-C's λ: ``lambda: [1, 3]`` on two layers
    gives layer 0 the ΔW of λ 1 and layer 1 three times it; both by hand from the SVD of ΣΔWᵢ."""
    fz = zoo["llama"]
    loras = fz.loras[:2]                            # q/v at rank 4; q/k/v/o at rank 8 (rsLoRA)
    recipe = _recipe(fz, {"name": "iso_c", "lambda": [1.0, 3.0]}, [{"path": str(p)} for p in loras],
                     output={"format": "lora"})
    merge(recipe, tmp_path / "out", progress=False)
    got = _adapter_deltas(tmp_path / "out")
    base, srcs = _expert_deltas(fz, loras)
    checked = set()
    for name in sorted(got):
        layer = int(name.split(".layers.")[1].split(".")[0])
        w = base.get(name).double()
        total = sum(s.get(name).double() - w for s in srcs if name in s.modules)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        keep = s > s[0] * 1e-6
        want = (1.0 + 2.0 * layer) * s[keep].mean() * u[:, keep] @ vh[keep]
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-5 * float(want.abs().max()), msg=name)
        checked.add((layer, name.split(".")[-2]))
    assert checked == {(layer, m) for layer in (0, 1) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}


# ------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["mistral", "t5"])
def test_adapter_output_loads_in_peft_and_generates(zoo, tmp_path, family):
    from peft import PeftModel
    from transformers import AutoTokenizer

    fz = zoo[family]
    out = tmp_path / "adapter"
    merge(_recipe(fz, {"name": "ties", "density": 0.5}, output={"format": "lora", "rank": 8, "dtype": "bfloat16"}),
          out, progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(fz.base)
    assert cfg["task_type"] == ("SEQ_2_SEQ_LM" if family == "t5" else "CAUSAL_LM")
    assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.bfloat16}
    model = PeftModel.from_pretrained(load_model(fz.base), str(out)).eval()
    tok = AutoTokenizer.from_pretrained(str(fz.base))
    ids = tok("Question: What is two plus three?", return_tensors="pt")
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
        base_logits = load_model(fz.base)(**ids, **({"decoder_input_ids": gen[:, :1]} if family == "t5" else {})).logits
        logits = model(**ids, **({"decoder_input_ids": gen[:, :1]} if family == "t5" else {})).logits
    new = gen.shape[1] - (0 if family == "t5" else ids["input_ids"].shape[1])
    assert new >= 1
    assert (logits - base_logits).abs().max() > 1e-4, "the adapter must change the model"


@pytest.mark.parametrize("family", ["gemma", "t5"])
def test_full_output_from_lora_experts_loads_and_generates(zoo, tmp_path, family):
    from transformers import AutoTokenizer

    fz = zoo[family]
    out = tmp_path / "full"
    merge(_recipe(fz, {"name": "tsv"}, output={"dtype": "bfloat16"}), out, progress=False)
    model = load_model(out)
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Sentiment: I loved this film.", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > (0 if family == "t5" else ids["input_ids"].shape[1])


def test_lora_and_full_experts_mixed_in_one_recipe(zoo, tmp_path):
    """TIES over a full fine-tune and two adapters (full output) — the adapters' task vectors
    are their ΔW, and tensors no adapter touches come from the full expert alone."""
    fz = zoo["mistral"]
    experts = [{"path": str(fz.experts[0])}, {"path": str(fz.loras[0])}, {"path": str(fz.loras[2])}]
    out = tmp_path / "mixed"
    recipe = _recipe(fz, {"name": "ties", "density": 0.5}, experts=experts)
    merge(recipe, out, progress=False)
    base, full = CheckpointReader(fz.base), CheckpointReader(fz.experts[0])
    merged = CheckpointReader(out)
    l0, l2 = open_lora_expert(fz.loras[0], base), open_lora_expert(fz.loras[2], base)
    ties = get_method("ties")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight"):
        w = base.get(name)
        want = ties.fn(w, [full.get(name), l0.get(name), l2.get(name)], resolve_params(recipe, name, 2))
        torch.testing.assert_close(merged.get(name), want, rtol=0, atol=1e-6)
    tok_ids = torch.tensor([[5, 6, 7, 8]])
    assert load_model(out).generate(tok_ids, max_new_tokens=3, do_sample=False).shape[1] == 7
    with pytest.raises(RecipeError, match="needs every expert to be a LoRA adapter"):
        merge(_recipe(fz, {"name": "ties"}, experts=experts, output={"format": "lora"}), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------- determinism, errors


def test_adapter_output_is_deterministic_whatever_the_workers(zoo, tmp_path):
    fz = zoo["llama"]
    recipe = _recipe(fz, {"name": "ties", "density": 0.3}, output={"format": "lora", "rank": 6}, seed=3)
    digests = []
    for i, workers in enumerate((1, 2, 1)):
        out = tmp_path / f"o{i}"
        merge_to_adapter(recipe, out, progress=False, workers=workers)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())})
    assert digests[0] == digests[1] == digests[2]
    assert set(digests[0]) == {"adapter_config.json", "adapter_model.safetensors", "merge_report.json", "README.md"}


def test_sampled_ties_cut_is_close_to_the_exact_one(zoo, tmp_path):
    """exact_ties=False only changes where magnitudes are cut; on these small matrices (fewer
    entries than four samples) the cut is exact anyway, so the outputs are identical."""
    fz = zoo["llama"]
    recipe = _recipe(fz, {"name": "ties", "density": 0.3}, output={"format": "lora", "rank": 6})
    merge_to_adapter(recipe, tmp_path / "a", progress=False)
    merge_to_adapter(recipe, tmp_path / "b", progress=False, exact_ties=False)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "b" / "adapter_model.safetensors").read_bytes()
    # on a matrix larger than four samples the sampled cut keeps about the asked share
    from mergelab.methods import ties_factors as lm

    g = torch.Generator().manual_seed(6)
    parts = [LowRank(torch.randn(700, 3, generator=g), torch.randn(3, 600, generator=g)) for _ in range(2)]
    total = 700 * 600
    assert total > 4 * lm.SAMPLE
    k = int(0.2 * total)
    for exact in (True, False):
        cuts = lm.magnitude_cuts(lm.FactorStack(parts, [1.0, 1.0]), [k, k], rows=64, exact=exact)
        for q, c in zip(parts, cuts):
            kept = int((q.dense().abs() >= c.v).sum()) - c.dropped
            assert kept == k if exact else abs(kept / k - 1) < 0.08


def test_recipe_key_ties_cuts_chooses_the_cut(zoo, tmp_path, monkeypatch):
    """`output.ties_cuts: sampled` reaches the magnitude cut (exact by default); refused for full output."""
    import mergelab.methods.ties_factors as lm

    seen = []
    real = lm.magnitude_cuts

    def spy(*args, exact=True, **kw):
        seen.append(exact)
        return real(*args, exact=exact, **kw)

    monkeypatch.setattr(lm, "magnitude_cuts", spy)
    fz = zoo["llama"]
    for cuts, want in (("exact", True), ("sampled", False)):
        seen.clear()
        recipe = _recipe(fz, {"name": "ties", "density": 0.3},
                         output={"format": "lora", "rank": 6, "ties_cuts": cuts})
        merge_to_adapter(recipe, tmp_path / cuts, progress=False)
        assert seen and set(seen) == {want}
    with pytest.raises(RecipeError, match="ties_cuts: sampled` applies to `format: lora` only"):
        _recipe(fz, {"name": "ties"}, output={"ties_cuts": "sampled"})


def test_errors_leave_no_output(zoo, tmp_path):
    fz = zoo["llama"]
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        merge(_recipe(fz, {"name": "cat"}, output={"format": "lora"}), out, progress=False)
    assert (out / "keep.txt").exists()
    bad = _recipe(fz, {"name": "cat"}, experts=[{"path": str(fz.loras[0])}, {"path": str(zoo["t5"].loras[0])}],
                  output={"format": "lora"})
    with pytest.raises(AdapterError, match="SelfAttention"):
        merge(bad, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()
    assert not [p for p in tmp_path.iterdir() if "mergelab-tmp" in p.name]
    # an output folder holding an input is refused, even with force (it would be deleted)
    outer = tmp_path / "outer"
    shutil.copytree(fz.loras[1], outer / "adapter")
    inside = _recipe(fz, {"name": "cat"}, experts=[{"path": str(fz.loras[0])}, {"path": str(outer / "adapter")}],
                     output={"format": "lora"})
    with pytest.raises(MergelabError, match="holds the input"):
        merge(inside, outer, force=True, progress=False)
    assert (outer / "adapter" / "adapter_config.json").is_file()


def test_cli_merge_to_an_adapter(zoo, tmp_path, capsys):
    import yaml

    from mergelab.cli import main

    fz = zoo["gemma"]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "base": {"path": str(fz.base)}, "experts": [{"path": str(p)} for p in fz.loras],
        "method": {"name": "iso_c"}, "output": {"format": "lora", "energy": 0.95}}))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    assert "LoRA modules with iso_c" in capsys.readouterr().err
    ad = load_adapter(tmp_path / "a")
    assert ad.modules and all(m.scale == 1.0 for m in ad.modules.values())
    report = _report(tmp_path / "a")
    assert all(e["rel_error"] ** 2 <= 0.05 + 1e-9 for e in report["modules"].values())


def test_exact_magnitude_cuts_survive_a_bracket_that_misses(monkeypatch):
    """The sample only brackets the cut: a sample that says nothing (all zeros, or all huge)
    makes the bracket miss, and the cut found by the widened pass is still the exact one."""
    from mergelab.methods import ties_factors as lm

    g = torch.Generator().manual_seed(4)
    parts = [LowRank(torch.randn(700, 3, generator=g), torch.randn(3, 600, generator=g)) for _ in range(2)]
    ks = [84000, 300]
    want = [float(q.dense().abs().view(-1).kthvalue(700 * 600 - k + 1).values) for q, k in zip(parts, ks)]
    for fake in (0.0, 1e9):
        monkeypatch.setattr(lm.FactorStack, "sample", lambda self, size, v=fake: torch.full((self.count, size), v))
        cuts = lm.magnitude_cuts(lm.FactorStack(parts, [1.0, 1.0]), ks, rows=64)
        assert [c.v for c in cuts] == want


def _brute_force_cuts(stack, ks, rows):
    """The exact top-k cuts by sorting every |ΔWᵢ| as the row blocks give it (the values the
    trimming pass sees): v, and how many entries equal to v are kept (the first ones)."""
    from mergelab.methods.ties_factors import MagnitudeCut

    m, n, count = stack.m, stack.n, stack.count
    buf = torch.empty(count, min(rows, m), n)
    x = torch.cat([stack.block(r0, min(m, r0 + rows), buf).abs().reshape(count, -1)
                   for r0 in range(0, m, rows)], dim=1)
    cuts = []
    for i, k in enumerate(ks):
        v = x[i].sort(descending=True).values[k - 1]
        n_gt, n_eq = int((x[i] > v).sum()), int((x[i] == v).sum())
        cuts.append(MagnitudeCut(float(v), n_eq, k - n_gt))
    return cuts


def _tied_parts(g, m, n, count, rank):
    """Factors rounded to bfloat16 (or small integers): many equal |ΔWᵢ|, also at the cut."""
    parts = [LowRank(torch.randn(m, rank, generator=g).bfloat16().float(),
                     torch.randn(rank, n, generator=g).bfloat16().float()) for _ in range(count - 1)]
    parts.append(LowRank(torch.randint(-2, 3, (m, rank), generator=g).float(),
                         torch.randint(-2, 3, (rank, n), generator=g).float()))
    return parts


def test_exact_magnitude_cuts_are_the_brute_force_ones(monkeypatch):
    """Past the sample threshold, with many equal values, and with a sample made of the matrix'
    own values (so that the bracket ends fall exactly on entries: each is counted once)."""
    from mergelab.methods import ties_factors as lm

    g = torch.Generator().manual_seed(7)
    parts = _tied_parts(g, 700, 600, 4, 3)
    total = 700 * 600
    stack = lm.FactorStack(parts, [1.0] * 4)
    ks = [int(0.2 * total), 1, total // 2, total - 3]
    want = _brute_force_cuts(stack, ks, 64)
    assert lm.magnitude_cuts(stack, ks, rows=64) == want
    assert any(c.dropped for c in want)          # ties at a cut are part of the case

    def own_values(self, size):
        full = torch.cat([self.block(r0, min(self.m, r0 + 64), torch.empty(self.count, 64, self.n)).abs()
                          .reshape(self.count, -1) for r0 in range(0, self.m, 64)], dim=1)
        return full[:, torch.randint(full.shape[1], (size,), generator=torch.Generator().manual_seed(size))]

    monkeypatch.setattr(lm.FactorStack, "sample", own_values)
    for size in (1 << 15, 1 << 16):
        monkeypatch.setattr(lm, "SAMPLE", size)
        assert lm.magnitude_cuts(stack, ks, rows=64) == want


def test_ties_from_factors_equals_its_merge_with_brute_force_cuts(monkeypatch):
    """The merged ΔW is bit for bit the one made with cuts found by sorting (weights of both
    signs, per-expert densities, equal values beyond the quota dropped in flat order)."""
    from mergelab.methods import MethodParams
    from mergelab.methods import ties_factors as lm

    g = torch.Generator().manual_seed(8)
    m, n = 640, 512
    parts = _tied_parts(g, m, n, 5, 4)
    p = MethodParams(globals={"lambda": 0.8}, experts=[
        {"weight": w, "density": d} for w, d in zip((1.0, -0.6, 1.7, 0.4, 1.0), (0.2, 0.35, 0.1, 0.5, 0.2))])
    got = lm.ties_from_factors(parts, p, (m, n), torch.device("cpu"))
    seen = []

    def brute(stack, ks, rows, exact=True):
        cuts = _brute_force_cuts(stack, ks, rows)
        seen.append(sum(c.dropped for c in cuts))
        return cuts

    monkeypatch.setattr(lm, "magnitude_cuts", brute)
    want = lm.ties_from_factors(parts, p, (m, n), torch.device("cpu"))
    assert seen and seen[0] > 0 and torch.equal(got, want)


@pytest.mark.parametrize("normalize", [True, False])
def test_compiled_trim_equals_the_torch_form(monkeypatch, normalize):
    """The CPU's compiled trim-and-reduce and the torch form (other devices) keep the same
    entries, equal values beyond the quota included, and differ only in the order of the float
    additions over the experts."""
    from mergelab.methods import MethodParams
    from mergelab.methods import ties_factors as lm

    g = torch.Generator().manual_seed(9)
    m, n = 640, 512
    parts = _tied_parts(g, m, n, 5, 4)
    p = MethodParams(globals={"lambda": 0.8, "normalize": normalize}, experts=[
        {"weight": w, "density": d} for w, d in zip((1.0, -0.6, 1.7, 0.4, 1.0), (0.2, 0.35, 0.1, 0.5, 0.2))])
    monkeypatch.setattr(lm, "BLOCK_ELEMS", 5 * 7 * n)          # blocks of 7 rows: ties span blocks
    got = lm.ties_from_factors(parts, p, (m, n), torch.device("cpu"))
    monkeypatch.setattr(lm, "USE_KERNELS", False)
    want = lm.ties_from_factors(parts, p, (m, n), torch.device("cpu"))
    assert torch.equal(got == 0, want == 0) and (got != 0).float().mean() > 0.3
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_mostly_zero_experts_fall_back_to_the_dense_ties(zoo):
    """A cut at magnitude 0 (an expert whose ΔW is mostly exact zeros) cannot use the scaled
    indicators of the factor route: it goes dense, with the same result."""
    from mergelab.merge.adapter import merge_module
    from mergelab.methods import MethodParams

    g = torch.Generator().manual_seed(5)
    b = torch.zeros(64, 2)
    b[:3] = torch.randn(3, 2, generator=g)           # 3 non-zero rows of 64: 95 % zeros
    parts = [LowRank(b, torch.randn(2, 48, generator=g)),
             LowRank(torch.randn(64, 2, generator=g), torch.randn(2, 48, generator=g))]
    p = MethodParams(globals={"density": 0.2}, experts=[{}, {}], generator=torch.Generator().manual_seed(0))
    res = merge_module("x.weight", parts, get_method("ties"), p, (64, 48), rank=48)
    assert res.route == "dense"
    want = get_method("ties").fn(torch.zeros(64, 48), [q.dense() for q in parts], p)
    torch.testing.assert_close(res.factors.dense(), want, rtol=0, atol=1e-5)


def test_method_errors_name_the_tensor(zoo, tmp_path):
    fz = zoo["llama"]
    recipe = _recipe(fz, {"name": "slerp"}, experts=[{"path": str(fz.loras[0])}], output={"format": "lora"})
    with pytest.raises(RecipeError, match=r"slerp on tensor 'model\.layers\.0\..*needs the parameter t"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
