"""The streaming engine: end-to-end merges of every fixture family, parameters per layer and module,
tied embeddings, determinism, bounded memory, and every bad input's clear error (with no output)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.io.checkpoint import CheckpointReader, ShardedWriter, copy_model_files
from mergelab.merge.inputs import MissingTensorError, open_expert
from mergelab.merge import merge
from mergelab.errors import CheckpointError, MergelabError, OutputExistsError, RecipeError, ShapeMismatchError
from mergelab.methods import get_method
from mergelab.recipe import load_recipe, resolve_params
from mergelab.testing import load_model


def _recipe(fz, method, n=3, experts=None, **kw):
    ex = experts if experts is not None else [{"path": str(p)} for p in fz.experts[:n]]
    return load_recipe({"base": {"path": str(fz.base)}, "experts": ex, "method": method, **kw})


def _state(folder):
    r = CheckpointReader(folder)
    return {k: r.get(k) for k in r.keys()}


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _weights(out) -> dict:
    """``_digest`` without the model card (it names the inputs' paths, which these tests change)."""
    return {k: v for k, v in _digest(out).items() if k != "README.md"}


def _rewrite(src, dst, edit=None, order=None, shard_size="5GB", config=None):
    """Copy a model folder with its tensors edited, reordered or re-sharded."""
    state = _state(src)
    if edit:
        state = edit(state)
    dst.mkdir(parents=True)
    w = ShardedWriter(dst, shard_size)
    for k in (order(list(state)) if order else list(state)):
        w.add(k, state[k])
    w.close()
    copy_model_files(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _no_output_left(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.mergelab")]


# --------------------------------------------------------------------------------- end to end

FAMILY_METHODS = {
    "llama": {"name": "dare_ties", "density": [0.3, 0.7], "weight": 0.8},
    "mistral": {"name": "ties", "density": 0.5},
    "gemma": {"name": "slerp", "t": [{"filter": "self_attn", "value": [0.2, 0.8]}, {"value": 0.5}]},
    "t5": {"name": "model_stock"},
}


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma", "t5"])
def test_merge_each_family_loads_and_generates(zoo, tmp_path, family):
    fz = zoo[family]
    method = FAMILY_METHODS[family]
    recipe = _recipe(fz, method, n=1 if method["name"] == "slerp" else 3,
                     output={"dtype": "bfloat16", "shard_size": "100KB"}, seed=5)
    out = tmp_path / "merged"
    result = merge(recipe, out, progress=False)

    base_keys = set(CheckpointReader(fz.base).keys())
    merged = _state(out)
    assert set(merged) == base_keys and result.tensors == len(base_keys)  # only the base's names
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / f).is_file()

    # one layer tensor, recomputed from the inputs with the parameters of its layer and module
    name = next(n for n in sorted(base_keys) if ".1." in n and ("q_proj" in n or ".q." in n))
    inputs = [CheckpointReader(p).get(name).float() for p in [fz.base, *fz.experts[:len(recipe.experts)]]]
    expect = get_method(method["name"]).fn(inputs[0], inputs[1:], resolve_params(recipe, name, 2))
    assert torch.equal(merged[name], expect.bfloat16())
    assert not torch.equal(merged[name], inputs[0].bfloat16())

    model, info = load_model(out), None
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    cls = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    model, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Question: What is two plus three? Answer:", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    assert gen.shape[1] > (1 if family == "t5" else ids["input_ids"].shape[1])
    if family == "gemma":  # tied: the head is the (merged) embedding
        assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)


def test_resolve_params_layers_filters_experts_and_seed(zoo):
    fz = zoo["llama"]
    recipe = _recipe(fz, {"name": "ties", "density": [0.2, 0.4, 1.0],
                          "lambda": [{"filter": "self_attn", "value": 0.5}, {"filter": "mlp", "value": [1, 3]}]},
                     experts=[{"path": str(fz.experts[0]), "weight": [1, 0]},
                              {"path": str(fz.experts[1]), "density": 0.9}], seed=3)
    p0 = resolve_params(recipe, "model.layers.0.self_attn.q_proj.weight", 5)
    assert p0.globals == {"density": 0.2, "lambda": 0.5}
    assert p0.experts == [{"weight": 1.0}, {"density": 0.9}]
    assert p0.per_expert("density") == [0.2, 0.9]
    p3 = resolve_params(recipe, "model.layers.3.mlp.up_proj.weight", 5)  # t = 3/4
    assert p3.globals["density"] == pytest.approx(0.7) and p3.globals["lambda"] == pytest.approx(2.5)
    assert p3.experts[0]["weight"] == pytest.approx(0.25)
    # outside the layer stack: t = 0; no filter matches → the method's default applies
    pe = resolve_params(recipe, "model.embed_tokens.weight", 5)
    assert pe.globals == {"density": 0.2}
    # the generator is keyed by (seed, tensor name) only
    draw = lambda p: torch.rand(4, generator=p.generator)  # noqa: E731
    assert torch.equal(draw(p0), draw(resolve_params(recipe, "model.layers.0.self_attn.q_proj.weight", 5)))
    assert not torch.equal(draw(resolve_params(recipe, "model.layers.0.self_attn.q_proj.weight", 5)), draw(p3))


def test_t5_encoder_and_decoder_depths_are_separate(zoo, tmp_path):
    fz = zoo["t5"]
    recipe = _recipe(fz, {"name": "task_arithmetic", "lambda": [0.0, 1.0]})
    out = tmp_path / "m"
    merge(recipe, out, progress=False)
    merged, base = _state(out), _state(fz.base)
    name = "decoder.block.1.layer.0.SelfAttention.q.weight"  # last decoder layer → lambda 1
    experts = [CheckpointReader(p).get(name) for p in fz.experts]
    assert torch.allclose(merged[name], base[name] + sum(e - base[name] for e in experts), atol=1e-6)
    assert torch.equal(merged["decoder.block.0.layer.0.SelfAttention.q.weight"],
                       base["decoder.block.0.layer.0.SelfAttention.q.weight"])  # lambda 0


# ------------------------------------------------------------------------------- determinism


def test_dare_gives_the_same_bytes_whatever_the_tensor_order(zoo, tmp_path):
    fz = zoo["llama"]
    method = {"name": "dare_ties", "density": 0.4}
    a = tmp_path / "a"
    merge(_recipe(fz, method, seed=9), a, progress=False)
    # The same models with their tensors stored in reverse order, in different shards.
    rev = lambda names: names[::-1]  # noqa: E731
    base2 = _rewrite(fz.base, tmp_path / "base2", order=rev, shard_size="30KB")
    experts2 = [{"path": str(_rewrite(e, tmp_path / f"e{i}", order=rev, shard_size="45KB"))}
                for i, e in enumerate(fz.experts)]
    b = tmp_path / "b"
    merge(load_recipe({"base": {"path": str(base2)}, "experts": experts2, "method": method, "seed": 9}),
          b, progress=False, workers=1)
    c = tmp_path / "c"
    merge(_recipe(fz, method, seed=9), c, progress=False, workers=3)
    assert _weights(a) == _weights(b) == _weights(c)
    assert _digest(a) == _digest(c)
    d = tmp_path / "d"
    merge(_recipe(fz, method, seed=10), d, progress=False)
    assert _digest(a)["config.json"] == _digest(d)["config.json"]
    assert _state(a)["model.layers.0.mlp.up_proj.weight"].ne(_state(d)["model.layers.0.mlp.up_proj.weight"]).any()


def test_streaming_memory_follows_the_largest_tensor_not_the_model(tmp_path):
    """Peak RSS of a TIES merge of 3 × 144 MiB of inputs stays far below their total (on the CPU:
    a CUDA context alone adds hundreds of MiB of host memory). Loading the models would grow it by
    ≥ 576 MiB (inputs + output); streaming measured 100–150 MiB here (allocator arenas and the
    buffer pool vary between runs), so the bound is half the inputs."""
    g = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.mlp.w.weight": torch.randn(1024, 1024, generator=g) for i in range(36)}
    for name, scale in (("base", 0.0), ("e0", 0.01), ("e1", -0.01)):
        d = tmp_path / name
        d.mkdir()
        save_file({k: v + scale for k, v in state.items()}, str(d / "model.safetensors"))
    script = textwrap.dedent(f"""
        import psutil
        from mergelab.merge import merge
        from mergelab.recipe import load_recipe
        r = load_recipe({{"base": {{"path": "base"}}, "experts": [{{"path": "e0"}}, {{"path": "e1"}}],
                          "method": {{"name": "ties", "density": 0.5}}}}, base_dir={str(tmp_path)!r})
        import torch; torch.zeros(1) + 1
        before = psutil.Process().memory_info().rss
        merge(r, {str(tmp_path / "out")!r}, device="cpu", progress=False, workers=2)
        # VmHWM: this process' own peak (ru_maxrss would include the forked parent's)
        status = open("/proc/self/status").read()
        peak = int(status.split("VmHWM:")[1].split()[0]) * 1024
        print(peak - before)
    """)
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}  # as the CLI sets it: fewer page faults, faster
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    grew = int(run.stdout.strip().splitlines()[-1])
    total_inputs = 3 * 36 * 4 * 2**20
    assert grew < total_inputs / 2, f"peak RSS grew by {grew / 2**20:.0f} MiB for {total_inputs / 2**20:.0f} MiB of inputs"


# ---------------------------------------------------------------------------- tied embeddings


def test_tied_aliases_in_experts_are_found(zoo, tmp_path):
    # T5 expert saved the old way (encoder/decoder embeddings, no `shared`); gemma expert that also
    # stored its (tied) lm_head: both merge exactly as their plain versions do.
    fz = zoo["t5"]

    def old_t5(s):
        shared = s.pop("shared.weight")
        return {**s, "encoder.embed_tokens.weight": shared, "decoder.embed_tokens.weight": shared.clone()}

    t5_old = _rewrite(fz.experts[0], tmp_path / "t5old", edit=old_t5)
    plain, aliased = tmp_path / "plain", tmp_path / "aliased"
    merge(_recipe(fz, "linear", n=1), plain, progress=False)
    merge(_recipe(fz, "linear", experts=[{"path": str(t5_old)}]), aliased, progress=False)
    assert _weights(plain) == _weights(aliased)
    assert "encoder.embed_tokens.weight" not in _state(aliased)

    fz = zoo["gemma"]
    both = _rewrite(fz.experts[0], tmp_path / "gboth",
                    edit=lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"].clone()})
    plain, aliased = tmp_path / "gplain", tmp_path / "galiased"
    merge(_recipe(fz, "task_arithmetic", n=1), plain, progress=False)
    merge(_recipe(fz, "task_arithmetic", experts=[{"path": str(both)}]), aliased, progress=False)
    assert _weights(plain) == _weights(aliased) and "lm_head.weight" not in _state(aliased)


def test_untied_head_cannot_go_into_a_tied_base(zoo, tmp_path):
    fz = zoo["gemma"]
    untied = _rewrite(fz.experts[0], tmp_path / "untied", config={"tie_word_embeddings": False},
                      edit=lambda s: {**s, "lm_head.weight": s["model.embed_tokens.weight"] * 2})
    out = tmp_path / "out"
    with pytest.raises(ShapeMismatchError, match="untied.*lm_head.weight"):
        merge(_recipe(fz, "linear", experts=[{"path": str(untied)}]), out, progress=False)
    _no_output_left(out)


# ---------------------------------------------------------------------------------- LoRA dispatch


def test_lora_experts_mix_with_full_experts(zoo, tmp_path):
    fz = zoo["llama"]
    src = open_expert(fz.loras[0], CheckpointReader(fz.base))
    assert getattr(src, "is_lora", False)
    out = tmp_path / "mixed"
    merge(_recipe(fz, "task_arithmetic", experts=[{"path": str(fz.experts[0])}, {"path": str(fz.loras[0])}]),
          out, progress=False)
    merged, base, full = _state(out), _state(fz.base), _state(fz.experts[0])
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        lora = src.get(name)  # base + ΔW where adapted, else the base
        assert torch.allclose(merged[name], base[name] + (full[name] - base[name]) + (lora - base[name]), atol=1e-6)
    assert torch.allclose(merged["model.layers.0.mlp.up_proj.weight"], full["model.layers.0.mlp.up_proj.weight"])


# ------------------------------------------------------------------------------------ bad input


def _bad_expert(zoo, tmp_path, edit):
    fz = zoo["llama"]
    return fz, _rewrite(fz.experts[0], tmp_path / "bad", edit=edit)


def test_shape_mismatch_names_the_tensor_and_both_shapes(zoo, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    fz, bad = _bad_expert(zoo, tmp_path, lambda s: {**s, name: s[name][:, :-1].contiguous()})
    out = tmp_path / "out"
    with pytest.raises(ShapeMismatchError) as err:
        merge(_recipe(fz, "ties", experts=[{"path": str(fz.experts[1])}, {"path": str(bad)}]), out, progress=False)
    text = str(err.value)
    assert name in text and "[64, 128]" in text and "[64, 127]" in text and "expert 1" in text
    _no_output_left(out)


def test_vocabulary_mismatch_is_an_error_not_a_truncation(zoo, tmp_path):
    grow = lambda t: torch.cat([t, t[:8]])  # noqa: E731 - 8 added tokens
    fz, bad = _bad_expert(zoo, tmp_path, lambda s: {**s, "model.embed_tokens.weight": grow(s["model.embed_tokens.weight"]),
                                                    "lm_head.weight": grow(s["lm_head.weight"])})
    out = tmp_path / "out"
    with pytest.raises(ShapeMismatchError, match=r"vocabulary sizes differ \(base 400 rows, expert 408\)"):
        merge(_recipe(fz, "linear", experts=[{"path": str(bad)}]), out, progress=False)
    _no_output_left(out)


def test_missing_tensor_is_named(zoo, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    fz, bad = _bad_expert(zoo, tmp_path, lambda s: {k: v for k, v in s.items() if k != name})
    out = tmp_path / "out"
    with pytest.raises(MissingTensorError, match=f"has no tensor '{name}'"):
        merge(_recipe(fz, "ties", experts=[{"path": str(bad)}]), out, progress=False)
    _no_output_left(out)


def test_extra_tensor_in_an_expert_is_an_error(zoo, tmp_path):
    fz, bad = _bad_expert(zoo, tmp_path, lambda s: {**s, "model.layers.2.mlp.up_proj.weight": torch.zeros(2)})
    with pytest.raises(ShapeMismatchError, match="model.layers.2.mlp.up_proj.weight"):
        merge(_recipe(fz, "ties", experts=[{"path": str(bad)}]), tmp_path / "out", progress=False)


def test_pickle_only_expert_is_refused_with_no_output(zoo, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(zoo["llama"].base / "config.json", old)
    (old / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-pickle")
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="pickle"):
        merge(_recipe(zoo["llama"], "ties", experts=[{"path": str(old)}]), out, progress=False)
    _no_output_left(out)


def test_existing_output_needs_force(zoo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        merge(_recipe(zoo["llama"], "linear"), out, progress=False)
    assert (out / "precious.txt").read_text() == "mine"
    merge(_recipe(zoo["llama"], "linear"), out, progress=False, force=True)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()


def test_unknown_method_and_bad_parameters(zoo, tmp_path):
    fz = zoo["llama"]
    with pytest.raises(RecipeError, match="method.name: unknown merge method 'tiez'") as err:
        _recipe(fz, "tiez")
    assert "ties" in err.value.hint
    with pytest.raises(RecipeError, match=r"experts\[1\]\.density: expected a number between 0 and 1, got 1.5"):
        _recipe(fz, "ties", experts=[{"path": str(fz.experts[0])}, {"path": str(fz.experts[1]), "density": 1.5}])
    with pytest.raises(RecipeError, match=r"method\.lambda\[1\]: expected a number, got 'x'"):
        _recipe(fz, {"name": "ties", "lambda": [1, "x"]})
    with pytest.raises(RecipeError, match="slerp takes exactly 1 expert"):
        _recipe(fz, {"name": "slerp", "t": 0.5})
    # a parameter only the method can judge fails on the first tensor, leaving nothing behind
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="della on tensor .*density ± epsilon"):
        merge(_recipe(fz, {"name": "della", "density": 0.1, "epsilon": 0.2}), out, progress=False)
    _no_output_left(out)


def test_device_choice():
    from mergelab.util import pick_device

    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergelabError, match="no CUDA GPU"):
            pick_device("cuda")
    with pytest.raises(MergelabError, match="unknown device"):
        pick_device("tpu:x")


# ------------------------------------------------------------------------------------ recipes


def test_recipe_forms_relative_paths_and_hub_refs(tmp_path, monkeypatch):
    import yaml

    from mergelab.recipe import ModelRef

    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "r.yaml"
    f.write_text(yaml.safe_dump({"base": {"path": "../base"},
                                 "experts": [{"path": "e1", "density": [{"filter": "mlp", "value": 0.3}]},
                                             {"model": "org/expert", "revision": "a" * 40, "weight": 0.5}],
                                 "method": {"name": "ties", "params": {"lambda": 0.9}}, "seed": 4}))
    r = load_recipe(f)
    assert r.base.path == tmp_path / "sub" / ".." / "base" and r.experts[0].path == tmp_path / "sub" / "e1"
    assert r.method.params == {"lambda": 0.9} and r.experts[1].params == {"weight": 0.5}
    calls = []
    monkeypatch.setattr("mergelab.recipe.schema.resolve_model", lambda ref: calls.append(ref) or tmp_path / "snap")
    assert r.experts[1].resolve() == tmp_path / "snap" and calls[0].model == "org/expert"
    assert load_recipe({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "linear"}).method.name == "linear"
    with pytest.raises(ValueError, match="exactly one of `path`"):
        ModelRef(path="x", model="a/b")


@pytest.mark.parametrize("data, message", [
    ({"experts": [{"path": "e"}], "method": "ties"}, "base: Field required"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "ties", "tunes": {}}, "tunes: unknown key; allowed here: base, experts"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "ties", "tune": {}}, "tune.data: Field required"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "ties", "tune": {"data": ["a.csv"]}},
     "tune: params: give the parameters to search"),
    ({"base": {"path": "b", "revision": "x"}, "experts": [{"path": "e"}], "method": "ties"}, "`revision` goes with `model`"),
    ({"base": {"path": "b"}, "experts": [{"path": "e", "gamma": 0.1}], "method": "ties"},
     "experts[0].gamma: not a per-expert parameter of ties"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": {"name": "ties", "normalize": "yes"}},
     "method.normalize: expected true or false, got 'yes'"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": {"name": "ties", "density": []}},
     "method.density: an empty list has no value"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "ties", "output": {"rank": 8}},
     "`rank` and `energy` apply to `format: lora` only"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "ties", "output": {"dtype": "int8"}},
     "output.dtype"),
    ({"base": {"path": "b"}, "experts": [{"path": "e"}], "method": "model_stock"}, "model_stock takes at least 2 expert"),
])
def test_recipe_errors_name_the_key_the_value_and_the_expectation(data, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(data)
    assert message in str(err.value)


def test_recipe_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {path: b}\nexperts: [\n  - oops: : :\n")
    with pytest.raises(RecipeError, match=r"bad.yaml: not valid YAML \(line \d+, column \d+\)"):
        load_recipe(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping"):
        load_recipe(tmp_path / "list.yaml")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("cfg, message", [
    ({"merge_method": "arcee_fusion", "models": [{"model": "a/b"}]}, "'arcee_fusion' is not supported"),
    ({"merge_method": "ties", "modules": {}, "base_model": "a/b"}, "modules: is not supported"),
    ({"merge_method": "ties", "models": [{"model": "a/b+c/lora"}], "base_model": "a/b"}, "model+lora"),
    ({"merge_method": "ties", "models": [{"model": "a/b"}]}, "ties needs a base_model"),
    ({"merge_method": "slerp", "base_model": "a/b", "slices": [
        {"sources": [{"model": "a/b", "layer_range": [0, 16]}, {"model": "c/d", "layer_range": [0, 16]}]},
        {"sources": [{"model": "a/b", "layer_range": [16, 32]}, {"model": "c/d", "layer_range": [16, 32]}]}]},
     "only one slice spanning all layers"),
    ({"merge_method": "ties", "base_model": "a/b", "models": [{"model": "c/d"}],
      "tokenizer": {"source": "union", "pad_to_multiple_of": 64}}, "pad_to_multiple_of"),
])
def test_mergekit_configs_that_cannot_be_translated_say_why(cfg, message):
    with pytest.raises(RecipeError, match="mergekit config") as err:
        load_recipe(cfg)
    assert message in str(err.value)


def test_mergekit_translation(zoo, tmp_path):
    fz = zoo["llama"]
    r = load_recipe({"merge_method": "dare_ties", "base_model": str(fz.base), "dtype": "bfloat16", "out_dtype": "float16",
                     "models": [{"model": str(fz.base)}, {"model": str(fz.experts[0]), "parameters": {"weight": 0.5}},
                                {"model": "org/name@" + "b" * 40}],
                     "parameters": {"density": 0.5, "int8_mask": True}, "seed": 7})
    assert r.base.path == fz.base and len(r.experts) == 2  # the base is not an expert
    assert r.experts[0].params == {"weight": 0.5} and r.experts[1].model == "org/name"
    assert r.experts[1].revision == "b" * 40
    assert r.method.params == {"density": 0.5} and r.output.dtype == "float16" and r.seed == 7
    # linear: every model is averaged, the first gives config and tokenizer
    r = load_recipe({"merge_method": "linear", "models": [{"model": str(e)} for e in fz.experts[:2]]})
    assert r.base.path == fz.experts[0] and [e.path for e in r.experts] == fz.experts[:2]


def test_lora_output_goes_to_the_lora_merger(monkeypatch, tmp_path):
    import mergelab.merge as entry

    seen = {}
    monkeypatch.setattr(entry, "merge_to_adapter",
                        lambda recipe, out_dir, **kw: seen.update(recipe=recipe, out=out_dir, **kw) or "done")
    r = load_recipe({"base": {"path": "b"}, "experts": [{"path": "l"}], "method": "ties",
                     "output": {"format": "lora", "rank": 8}})
    assert merge(r, tmp_path / "o", device="cpu", force=True, progress=False, workers=3) == "done"
    assert seen["device"] == "cpu" and seen["force"] is True and seen["out"] == tmp_path / "o"
    assert seen["workers"] == 3  # the entry hands workers on to the adapter path too


def test_output_inside_an_input_is_refused(zoo, tmp_path):
    fz = zoo["llama"]
    base = tmp_path / "models" / "base"  # a copy: a regression here must not delete the session zoo
    shutil.copytree(fz.base, base)
    recipe = load_recipe({"base": {"path": str(base)}, "experts": [{"path": str(fz.experts[0])}],
                          "method": "linear"})
    for out in (base, base.parent):  # --force must never delete an input
        with pytest.raises(MergelabError, match="(is|holds) the input"):
            merge(recipe, out, force=True, progress=False)
    assert (base / "config.json").is_file()


@pytest.mark.parametrize("method", ["ties", "model_stock", "slerp"])
def test_tensors_no_expert_changes_come_out_as_the_base(zoo, tmp_path, method):
    """A LoRA expert leaves most tensors as they are: those must be the base's exact bytes, for
    every method (model stock's angle of two zero task vectors must not turn into NaN)."""
    fz = zoo["llama"]
    n = 1 if method == "slerp" else 2
    params = {"ties": {"density": 0.5}, "slerp": {"t": 0.5}, "model_stock": {}}[method]
    recipe = {"base": {"path": str(fz.base)},
              "experts": [{"path": str(p)} for p in fz.loras[:n]],
              "method": {"name": method, **params}}
    merge(load_recipe(recipe), tmp_path / "out", progress=False)
    out, base = _state(tmp_path / "out"), _state(fz.base)
    adapted = {k for k in base if any(m in k for m in ("q_proj", "k_proj", "v_proj", "o_proj"))}
    untouched = [k for k in base if k not in adapted]
    assert untouched and all(torch.equal(out[k], base[k]) for k in untouched)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert any(not torch.equal(out[k], base[k]) for k in adapted)
