"""Reading PEFT adapters, ΔW, the LoRA expert source, low-rank re-factoring, writing adapters."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from mergelab.io.checkpoint import CheckpointReader
from mergelab.errors import AdapterError
from mergelab.io.adapter import (EMBEDDING, LINEAR, LINEAR_T, OutputModule, load_adapter, open_lora_expert, write_adapter)
from mergelab.methods.lowrank import LowRank, concat, lowrank_approx, relative_error, truncate
from mergelab.testing import FAMILIES, load_model, make_lora


def _peft_merged_state(base_dir, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base_dir), str(adapter_dir))
    return model.merge_and_unload().state_dict()


def _assert_fold_matches_peft(base_dir, adapter_dir):
    base = CheckpointReader(base_dir)
    src = open_lora_expert(adapter_dir, base)
    ref = _peft_merged_state(base_dir, adapter_dir)
    assert src.modules, "adapter must change something"
    for name in src.keys():
        got = src.get(name)
        assert got.dtype == base.dtype(name)
        torch.testing.assert_close(got, ref[name], rtol=0, atol=1e-7, msg=name)
    return src


# ------------------------------------------------------------------------- folding one adapter


@pytest.mark.parametrize("family", FAMILIES)
def test_one_adapter_folded_equals_peft_merge_and_unload(zoo, family):
    """All three zoo adapters: ranks 4/8/2, rsLoRA on the second, different target modules."""
    fz = zoo[family]
    for lora in fz.loras:
        src = _assert_fold_matches_peft(fz.base, lora)
        # untouched tensors are the base's, adapted ones differ from it
        base = CheckpointReader(fz.base)
        name = next(iter(src.modules))
        assert not torch.equal(src.get(name), base.get(name))
        other = next(k for k in src.keys() if k not in src.modules)
        assert torch.equal(src.get(other), base.get(other))


def test_scales_rslora_rank_and_alpha_patterns(zoo, tmp_path):
    fz = zoo["llama"]
    cfg = json.loads((fz.loras[1] / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["r"] == 8
    ad = load_adapter(fz.loras[1])
    assert all(m.scale == pytest.approx(16 / math.sqrt(8)) for m in ad.modules.values())

    path = make_lora(fz.base, tmp_path / "pat", seed=7, r=4, alpha=8,
                     target_modules=["q_proj", "v_proj", "up_proj"],
                     rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
                     alpha_pattern={"up_proj": 3})
    ad = load_adapter(path)
    got = {p: (m.rank, m.scale) for p, m in ad.modules.items()}
    assert got["model.layers.0.self_attn.q_proj"] == (4, 8 / 4)
    assert got["model.layers.1.self_attn.q_proj"] == (6, 8 / 6)
    assert got["model.layers.0.self_attn.v_proj"] == (2, 8 / 2)
    assert got["model.layers.1.mlp.up_proj"] == (4, 3 / 4)
    _assert_fold_matches_peft(fz.base, path)


def test_embedding_lora_folds_like_peft(zoo, tmp_path):
    fz = zoo["mistral"]
    path = make_lora(fz.base, tmp_path / "emb", seed=3, r=3, alpha=5,
                     target_modules=["embed_tokens", "q_proj"])
    ad = load_adapter(path)
    assert ad.modules["model.embed_tokens"].kind == EMBEDDING
    _assert_fold_matches_peft(fz.base, path)


@pytest.fixture(scope="module")
def gpt2_base(tmp_path_factory):
    """A tiny GPT-2, whose attention and MLP are Conv1D layers storing weights as (in, out)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(str(out), safe_serialization=True)
    return out


def _gpt2_lora(base_dir, out, fan_in_fan_out=True):
    from peft import LoraConfig, get_peft_model

    model = load_model(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                                                  fan_in_fan_out=fan_in_fan_out))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(str(out))
    return out


def test_fan_in_fan_out_conv1d_folds_like_peft(gpt2_base, tmp_path):
    path = _gpt2_lora(gpt2_base, tmp_path / "a")
    ad = load_adapter(path)
    assert {m.kind for m in ad.modules.values()} == {LINEAR_T}
    _assert_fold_matches_peft(gpt2_base, path)


def test_fan_in_fan_out_missing_is_a_clear_error(gpt2_base, tmp_path):
    path = _gpt2_lora(gpt2_base, tmp_path / "a")
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError) as err:
        open_lora_expert(path, CheckpointReader(gpt2_base))
    assert "fan_in_fan_out" in str(err.value) and "Conv1D" in str(err.value)


# ------------------------------------------------------------------------- refused adapters


def _copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("changes, words", [
    ({"use_dora": True}, ["DoRA", "merge_and_unload"]),
    ({"bias": "all"}, ["bias training", "merge_and_unload"]),
    ({"lora_bias": True}, ["LoRA bias"]),
    ({"modules_to_save": ["lm_head"]}, ["modules_to_save", "whole trained copies"]),
    ({"peft_type": "IA3"}, ["IA3 adapter", "LoRA adapters only"]),
    ({"init_lora_weights": "pissa_niter_4"}, ["pissa", "modified base", "path_initial_model_for_weight_conversion"]),
    ({"init_lora_weights": "loftq"}, ["loftq", "modified base"]),
    ({"layer_replication": [[0, 1]]}, ["layer_replication"]),
    ({"alora_invocation_tokens": [1, 2]}, ["activated LoRA"]),
    ({"r": 3}, ["rank 4", "r = 3"]),
])
def test_unsupported_adapters_are_refused_clearly(zoo, tmp_path, changes, words):
    path = _copy(zoo["llama"].loras[0], tmp_path / "bad", **changes)
    with pytest.raises(AdapterError) as err:
        load_adapter(path)
    text = str(err.value)
    assert str(path) in text
    for w in words:
        assert w in text, (w, text)


def test_real_dora_adapter_is_refused(zoo, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(zoo["llama"].base),
                           LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(tmp_path / "dora")
    # the weights alone give it away too
    cfg = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lora_magnitude_vector"):
        load_adapter(tmp_path / "dora")


def test_conv_lora_and_foreign_tensors_are_refused(zoo, tmp_path):
    from safetensors.torch import save_file

    path = _copy(zoo["llama"].loras[0], tmp_path / "conv")
    pre = "base_model.model.model.conv"
    save_file({f"{pre}.lora_A.weight": torch.zeros(4, 3, 3, 3), f"{pre}.lora_B.weight": torch.zeros(8, 4, 1, 1)},
              str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="convolution"):
        load_adapter(path)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.ones(4, 64),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)},
              str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(path)


def test_stored_copies_of_base_tensors_must_be_the_bases(zoo, tmp_path):
    """PEFT stores embeddings beside the factors when they are targeted or resized: a copy equal
    to the base is fine, a changed or resized one is refused."""
    from safetensors.torch import load_file, save_file

    fz = zoo["llama"]
    path = make_lora(fz.base, tmp_path / "emb", seed=3, r=2, target_modules=["embed_tokens"])
    tensors = load_file(str(path / "adapter_model.safetensors"))
    copy = "base_model.model.model.embed_tokens.base_layer.weight"
    assert copy in tensors
    open_lora_expert(path, CheckpointReader(fz.base))  # the copy is the base's: accepted
    tensors[copy] = tensors[copy] + 1.0
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="differs from the base"):
        open_lora_expert(path, CheckpointReader(fz.base))
    tensors[copy] = torch.zeros(401, 64)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="resized vocabulary"):
        open_lora_expert(path, CheckpointReader(fz.base))


def test_pickle_only_and_missing_files(zoo, tmp_path):
    path = _copy(zoo["llama"].loras[0], tmp_path / "pkl")
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="never\\s+unpickles"):
        load_adapter(path)
    with pytest.raises(AdapterError, match="not a PEFT adapter folder"):
        load_adapter(zoo["llama"].base)


def test_adapter_of_another_base_names_the_module(zoo):
    with pytest.raises(AdapterError) as err:
        open_lora_expert(zoo["t5"].loras[0], CheckpointReader(zoo["llama"].base))
    assert "SelfAttention.q" in str(err.value) and "trained on another base" in str(err.value)
    with pytest.raises(AdapterError, match=r"\[64, 64\] matrix but the base tensor"):
        open_lora_expert(zoo["llama"].loras[0], CheckpointReader(_small_llama(zoo)))


def _small_llama(zoo):
    """A llama base of another width (32), built once per session next to the zoo."""
    from mergelab.testing import make_base

    out = zoo["llama"].base.parent / "base32"
    if not out.exists():
        make_base("llama", out, hidden=32)
    return out


def test_lora_on_tied_lm_head_is_explained(zoo, tmp_path):
    path = _copy(zoo["llama"].loras[0], tmp_path / "lmhead")
    from safetensors.torch import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": torch.ones(2, 64),
               "base_model.model.lm_head.lora_B.weight": torch.ones(400, 2)},
              str(path / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(r=2, target_modules=["lm_head"])
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="tied to the input embeddings"):
        open_lora_expert(path, CheckpointReader(zoo["gemma"].base))


# ------------------------------------------------------------------------- low-rank maths


def _rand_lowrank(g, m, n, r):
    return LowRank(torch.randn(m, r, generator=g), torch.randn(r, n, generator=g))


def test_lowrank_svd_is_the_exact_svd_without_forming_the_matrix():
    g = torch.Generator().manual_seed(0)
    lr = concat([_rand_lowrank(g, 60, 40, 3), None, _rand_lowrank(g, 60, 40, 4)], [2.0, 1.0, -0.5])
    assert lr.rank == 7
    dense = lr.dense()
    u, s, vh = lr.svd()
    ref = torch.linalg.svdvals(dense.double())
    assert s.shape == (7,)
    torch.testing.assert_close(s.double(), ref[:7], rtol=1e-5, atol=0)
    assert ref[7:].max() < 1e-5 * ref[0]  # the rest is rounding noise
    torch.testing.assert_close(u @ torch.diag(s) @ vh, dense, rtol=0, atol=1e-4)
    torch.testing.assert_close(u.T @ u, torch.eye(7), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.T, torch.eye(7), rtol=0, atol=1e-5)
    assert lr.norm() == pytest.approx(float(dense.double().norm()), rel=1e-6)
    # rank-deficient sums lose their zero directions: B1 A1 - B1 A1 + B2 A2 has rank 2
    p1, p2 = _rand_lowrank(g, 30, 20, 3), _rand_lowrank(g, 30, 20, 2)
    assert len(concat([p1, p1, p2], [1.0, -1.0, 1.0]).svd()[1]) == 2


def test_truncation_error_is_recorded_and_matches_a_direct_computation():
    g = torch.Generator().manual_seed(1)
    lr = concat([_rand_lowrank(g, 50, 30, 4), _rand_lowrank(g, 50, 30, 4)])
    dense = lr.dense()
    s = torch.linalg.svdvals(dense.double())
    for k in (1, 3, 5, 8):
        approx, err = truncate(lr, rank=k)
        assert approx.rank == k
        direct = float((dense - approx.dense()).double().norm() / dense.double().norm())
        expect = float((s[k:] ** 2).sum().sqrt() / s.norm())  # Eckart–Young
        assert err == pytest.approx(direct, rel=1e-4, abs=1e-6)
        assert err == pytest.approx(expect, rel=1e-4, abs=1e-6)
    # energy threshold: the smallest k whose leading σ² reach the fraction
    energy = torch.cumsum(s**2, 0) / (s**2).sum()
    want = int((energy < 0.95).sum()) + 1
    approx, err = truncate(lr, energy=0.95)
    assert approx.rank == want and err**2 <= 0.05 + 1e-9
    # no limit: exact, minimal rank
    approx, err = truncate(lr)
    assert approx.rank == 8 and err < 1e-6
    torch.testing.assert_close(approx.dense(), dense, rtol=0, atol=1e-4)


def test_dense_lowrank_approx_randomised_is_near_optimal_and_error_is_direct():
    g = torch.Generator().manual_seed(2)
    m = (torch.randn(700, 12, generator=g) @ torch.randn(12, 600, generator=g)
         + 0.05 * torch.randn(700, 600, generator=g))
    s = torch.linalg.svdvals(m.double())
    best = float((s[10:] ** 2).sum().sqrt() / s.norm())
    lr, err = lowrank_approx(m, rank=10, generator=torch.Generator().manual_seed(0))
    assert lr.rank == 10
    assert err == pytest.approx(relative_error(m, lr), rel=1e-9)
    direct = float((m - lr.dense()).double().norm() / m.double().norm())
    assert err == pytest.approx(direct, rel=1e-4)
    assert best * (1 - 1e-6) <= err <= best * 1.01
    # the same generator seed gives the same factors
    lr2, _ = lowrank_approx(m, rank=10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lr.B, lr2.B) and torch.equal(lr.A, lr2.A)
    # small matrices use the exact SVD
    small = m[:100, :80]
    lr, err = lowrank_approx(small, rank=5)
    sv = torch.linalg.svdvals(small.double())
    assert err == pytest.approx(float((sv[5:] ** 2).sum().sqrt() / sv.norm()), rel=1e-4)


def test_balanced_keeps_the_product():
    g = torch.Generator().manual_seed(3)
    lr = LowRank(torch.randn(20, 3, generator=g) * 100, torch.randn(3, 10, generator=g) / 100)
    bal = lr.balanced()
    torch.testing.assert_close(bal.dense(), lr.dense(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bal.B.norm(dim=0), bal.A.norm(dim=1), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------- writing adapters


def test_written_adapter_round_trips_through_peft(zoo, tmp_path):
    """Factors of two adapters (different ranks and modules) written as one adapter load in PEFT
    and give exactly base + ΔW; the bytes are deterministic."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    fz = zoo["mistral"]
    base = CheckpointReader(fz.base)
    a0, a2 = open_lora_expert(fz.loras[0], base), open_lora_expert(fz.loras[2], base)
    modules = {name: OutputModule(src.factors(name)) for src in (a0, a2) for name in src.modules}
    ranks = {name: om.factors.rank for name, om in modules.items()}
    assert set(ranks.values()) == {4, 2}
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        cfg = write_adapter(tmp_path / d, modules, base_model_name_or_path=str(fz.base),
                            task_type="CAUSAL_LM", base_keys=base.keys())
    assert (tmp_path / "x" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "y" / "adapter_model.safetensors").read_bytes()
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "q_proj", "up_proj", "v_proj"]
    # six MLP modules of rank 2, four attention modules of rank 4: r = 2 and a pattern for the rest
    assert cfg["r"] == cfg["lora_alpha"] == 2
    assert cfg["rank_pattern"] == cfg["alpha_pattern"] == {
        n[: -len(".weight")]: 4 for n, r in ranks.items() if r == 4}

    model = PeftModel.from_pretrained(load_model(fz.base), str(tmp_path / "x")).merge_and_unload()
    state = model.state_dict()
    for name in base.keys():
        expect = base.get(name)
        for src in (a0, a2):
            if name in src.modules:
                expect = expect + src.delta(name)
        torch.testing.assert_close(state[name], expect, rtol=0, atol=2e-6, msg=name)

    tok = AutoTokenizer.from_pretrained(str(fz.base))
    peft_model = PeftModel.from_pretrained(load_model(fz.base), str(tmp_path / "x"))
    ids = tok("Question: What is two plus three?", return_tensors="pt")
    out = peft_model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_written_conv1d_and_embedding_adapters_round_trip(gpt2_base, zoo, tmp_path):
    from peft import PeftModel

    for base_dir, adapter in ((gpt2_base, _gpt2_lora(gpt2_base, tmp_path / "g")),
                              (zoo["llama"].base, make_lora(zoo["llama"].base, tmp_path / "e", seed=1, r=2,
                                                            target_modules=["embed_tokens", "o_proj"]))):
        base = CheckpointReader(base_dir)
        src = open_lora_expert(adapter, base)
        out = tmp_path / f"out_{adapter.name}"
        out.mkdir()
        write_adapter(out, {n: OutputModule(src.factors(n), src.modules[n].kind) for n in src.modules},
                      base_keys=base.keys())
        state = PeftModel.from_pretrained(load_model(base_dir), str(out)).merge_and_unload().state_dict()
        ref = _peft_merged_state(base_dir, adapter)
        kinds = {m.kind for m in src.modules.values()}
        assert kinds <= {LINEAR, LINEAR_T, EMBEDDING} and len(kinds) >= 1
        for name in src.modules:
            torch.testing.assert_close(state[name], ref[name], rtol=0, atol=2e-6, msg=name)


def test_partial_module_sets_are_listed_by_path(zoo, tmp_path):
    fz = zoo["llama"]
    base = CheckpointReader(fz.base)
    src = open_lora_expert(fz.loras[0], base)
    name = sorted(src.modules)[0]
    cfg = write_adapter(tmp_path, {name: OutputModule(src.factors(name))}, base_keys=base.keys())
    assert cfg["target_modules"] == [name[: -len(".weight")]]
    with pytest.raises(AdapterError, match="every merged ΔW is zero"):
        write_adapter(tmp_path, {name: OutputModule(LowRank.zeros((64, 64)))})
