"""Layer stacking (``slices`` + ``method: passthrough``): the stacked model, the mergekit form, the
rule check on the result, the plan, and the errors — on tiny random Llama models built here."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from mergelab.cli import main
from mergelab.errors import ModelMismatchError, RecipeError, ShapeMismatchError
from mergelab.hub.rules import VIOLATION, WARN, check_models, recipe_refs, recipe_stack
from mergelab.io.checkpoint import CheckpointReader
from mergelab.io.layers import plan_stack
from mergelab.merge import merge
from mergelab.recipe import load_recipe
from mergelab.testing import load_model, make_base, make_expert
from mergelab.testing.hubsim import Commit, HubSim, Repo, safetensors_header


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """``(base, expert)``: a 4-layer Llama and a fine-tune of it."""
    root = tmp_path_factory.mktemp("deep")
    base = make_base("llama", root / "base", layers=4)
    return base, make_expert(base, root / "expert", seed=1)


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def _parameters(reader) -> int:
    names = reader.keys()
    return sum(reader.get(n).numel() for n in names)


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if "mergelab-tmp" in p.name or "mergelab-old" in p.name]


# ------------------------------------------------------------------------------------ the stack


def test_passthrough_stacks_layer_ranges_renumbered_and_the_model_generates(deep, tmp_path):
    base, expert = deep
    rel = lambda p: os.path.relpath(p, tmp_path)  # paths relative to the recipe file
    recipe = _write(tmp_path / "stack.yaml", {
        "method": "passthrough",
        "slices": [{"path": rel(base), "layer_range": [0, 3]},
                   {"path": rel(expert), "layer_range": [1, 4]}],
    })
    out = tmp_path / "stacked"
    assert main(["merge", str(recipe), "--out", str(out), "-q"]) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    b, e, o = CheckpointReader(base), CheckpointReader(expert), CheckpointReader(out)
    origin = [(b, 0), (b, 1), (b, 2), (e, 1), (e, 2), (e, 3)]   # output layer j ← (model, its layer)
    names = b.keys()
    layer_names = [n.removeprefix("model.layers.0.") for n in names if n.startswith("model.layers.0.")]
    assert len(o.keys()) == 6 * len(layer_names) + 3
    for j, (src, k) in enumerate(origin):
        for rest in layer_names:
            assert torch.equal(o.get(f"model.layers.{j}.{rest}"), src.get(f"model.layers.{k}.{rest}")), (j, rest)
    # embeddings from the first slice's model; final norm and head from the last one's (as mergekit)
    assert torch.equal(o.get("model.embed_tokens.weight"), b.get("model.embed_tokens.weight"))
    assert torch.equal(o.get("model.norm.weight"), e.get("model.norm.weight"))
    assert torch.equal(o.get("lm_head.weight"), e.get("lm_head.weight"))

    model = load_model(out)
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    ids = torch.tensor([[1, 5, 9, 12]])
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    card = (out / "README.md").read_text()
    assert "| slice 1 |" in card and "| slice 2 |" in card and "passthrough" in card


def test_our_recipe_form_with_scale_base_and_dtype(deep, tmp_path):
    base, expert = deep
    r = load_recipe({"base": {"path": str(expert)}, "method": {"name": "passthrough", "scale": 2.0},
                     "slices": [{"path": str(base), "layer_range": [2, 4],
                                 "scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "mlp", "value": [0.5, 1.0]}]},
                                {"path": str(base), "layer_range": [0, 1]}],
                     "output": {"dtype": "bfloat16"}})
    assert r.base.path == expert and r.experts == [] and [s.layer_range for s in r.slices] == [(2, 4), (0, 1)]
    merge(r, tmp_path / "out", progress=False)
    b, o = CheckpointReader(base), CheckpointReader(tmp_path / "out")
    cast = lambda x: x.to(torch.bfloat16)
    assert torch.equal(o.get("model.layers.0.self_attn.o_proj.weight"),
                       cast(0.0 * b.get("model.layers.2.self_attn.o_proj.weight")))
    # a layer list runs over the slice's layers: 0.5 at its first, 1.0 at its last
    assert torch.equal(o.get("model.layers.0.mlp.up_proj.weight"), cast(0.5 * b.get("model.layers.2.mlp.up_proj.weight")))
    assert torch.equal(o.get("model.layers.1.mlp.up_proj.weight"), cast(b.get("model.layers.3.mlp.up_proj.weight")))
    # no filter of the slice matches: the method's scale
    assert torch.equal(o.get("model.layers.1.self_attn.q_proj.weight"),
                       cast(2.0 * b.get("model.layers.3.self_attn.q_proj.weight")))
    assert torch.equal(o.get("model.layers.2.self_attn.q_proj.weight"),
                       cast(2.0 * b.get("model.layers.0.self_attn.q_proj.weight")))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["dtype"] == "bfloat16"


def test_large_tensors_are_copied_in_row_blocks_with_the_same_bytes(deep, tmp_path, monkeypatch):
    """A block budget below the tensors' size: every floating tensor of more than one block is read
    and written by rows (memory: one block), and the files are the whole-tensor copy's."""
    base, expert = deep
    reads = []
    original = CheckpointReader.read_rows_into
    monkeypatch.setattr(CheckpointReader, "read_rows_into",
                        lambda self, name, r0, r1, out: reads.append((name, r0, r1)) or original(self, name, r0, r1, out))
    r = load_recipe({"method": {"name": "passthrough"}, "output": {"dtype": "bfloat16"},
                     "slices": [{"path": str(base), "layer_range": [0, 2], "scale": [{"filter": "mlp", "value": 0.5}]},
                                {"path": str(expert), "layer_range": [1, 3]}]})
    merge(r, tmp_path / "blocks", progress=False, block_bytes=4096)
    names = {name for name, _, _ in reads}
    reader = CheckpointReader(base)
    row_bytes = {n: 4 * math.prod(reader.shape(n)[1:]) for n in names}
    reader.close()
    assert len(names) > 10 and all((r1 - r0) * row_bytes[n] <= 4096 for n, r0, r1 in reads)
    n = len(reads)
    merge(r, tmp_path / "whole", progress=False)
    assert len(reads) == n
    files = sorted(p.name for p in (tmp_path / "whole").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "blocks").glob("*.safetensors"))
    assert all((tmp_path / "whole" / f).read_bytes() == (tmp_path / "blocks" / f).read_bytes() for f in files)


MERGEKIT_STACK = """\
merge_method: passthrough
slices:
  - sources:
      - model: {base}
        layer_range: [0, 3]
  - sources:
      - model: {expert}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
  - sources:
      - model: {base}
        layer_range: [3, 4]
    parameters:
      scale: [{{filter: down_proj, value: 0.0}}]
dtype: float32
"""


def test_mergekit_passthrough_yaml_imports(deep, tmp_path):
    base, expert = deep
    cfg = tmp_path / "frankenmerge.yml"
    cfg.write_text(MERGEKIT_STACK.format(base=os.path.relpath(base, tmp_path), expert=expert))
    r = load_recipe(cfg)
    assert r.method.name == "passthrough" and r.base.path == base   # mergekit: config from the first model
    assert [(s.path, s.layer_range) for s in r.slices] == [(base, (0, 3)), (expert, (1, 4)), (base, (3, 4))]
    assert r.slices[1].params["scale"][0] == {"filter": "o_proj", "value": 0.5}
    assert r.slices[2].params == {"scale": [{"filter": "down_proj", "value": 0.0}]}   # the slice's parameters
    assert r.output.dtype == "float32"


def test_same_tensors_as_mergekit(deep, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit==0.1.5 is in the test extra")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    base, expert = deep
    cfg = yaml.safe_load(MERGEKIT_STACK.format(base=base, expert=expert))
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mergekit"),
              MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))
    merge(load_recipe(cfg), tmp_path / "mergelab", progress=False)
    theirs, ours = CheckpointReader(tmp_path / "mergekit"), CheckpointReader(tmp_path / "mergelab")
    assert sorted(theirs.keys()) == sorted(ours.keys())
    names = ours.keys()
    for name in names:
        a, b = ours.get(name), theirs.get(name)
        assert a.dtype == b.dtype and torch.equal(a, b), name   # the same bytes
    config = lambda d: json.loads((tmp_path / d / "config.json").read_text())
    assert config("mergelab")["num_hidden_layers"] == config("mergekit")["num_hidden_layers"] == 7


def test_plan_stack_alone():
    layer = {"a.weight": (4, 4), "b.weight": (4,)}
    model = {f"model.layers.{k}.{n}": s for k in range(3) for n, s in layer.items()}
    model.update({"model.embed_tokens.weight": (10, 4), "model.norm.weight": (4,), "lm_head.weight": (10, 4)})
    layout = plan_stack([(model, 1, 3), (model, 0, 3)], ["first", "second"])
    assert layout.layers == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert layout.parameters == 5 * 20 + 84
    names = [t.name for t in layout.tensors]
    assert names[0] == "lm_head.weight" and "model.layers.4.b.weight" in names   # natural order
    moved = {t.name: (t.part, t.source, t.t) for t in layout.tensors}
    assert moved["model.layers.1.a.weight"] == (0, "model.layers.2.a.weight", 1.0)
    assert moved["model.layers.3.a.weight"] == (1, "model.layers.1.a.weight", 0.5)
    assert moved["model.norm.weight"][0] == 1 and moved["model.embed_tokens.weight"][0] == 0
    with pytest.raises(RecipeError, match=r"first.layer_range: \[1, 4\] is not a range of the model's 3 layers"):
        plan_stack([(model, 1, 4)], ["first"])
    odd = {**model, "model.layers.1.c.weight": (2,)}
    with pytest.raises(ShapeMismatchError, match="layer 1 of second does not fit the stack: it has c.weight"):
        plan_stack([(model, 0, 1), (odd, 0, 3)], ["first", "second"])


def test_per_layer_config_lists_follow_the_layers(tmp_path):
    """A config with ``layer_types`` (Gemma-2: sliding and full attention by turns) gets the list of
    the copied layers; the stacked model loads and runs. Gemma-2 also ties its head to the
    embeddings: the stack stores no lm_head."""
    import transformers as tf

    cfg = tf.Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          layer_types=["sliding_attention", "full_attention", "full_attention", "sliding_attention"])
    torch.manual_seed(0)
    tf.Gemma2ForCausalLM(cfg).save_pretrained(str(tmp_path / "g"))
    merge({"method": "passthrough", "slices": [{"path": str(tmp_path / "g"), "layer_range": [0, 3]},
                                               {"path": str(tmp_path / "g"), "layer_range": [2, 4]}]},
          tmp_path / "out", progress=False)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == ["sliding_attention", "full_attention", "full_attention",
                                  "full_attention", "sliding_attention"]
    assert "lm_head.weight" not in CheckpointReader(tmp_path / "out")
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert len(model.model.layers) == 5
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


# ----------------------------------------------------------------------------------- the errors


def test_a_layer_range_past_the_model_is_one_error_and_leaves_nothing(deep, tmp_path):
    base, expert = deep
    recipe = _write(tmp_path / "r.yaml", {"method": "passthrough",
                                          "slices": [{"path": str(base), "layer_range": [0, 2]},
                                                     {"path": str(expert), "layer_range": [2, 9]}]})
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(recipe), "--out", str(out)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    message = " ".join(r.stderr.split())
    assert f"slices[1] ({expert}).layer_range: [2, 9] is not a range of the model's 4 layers (0 to 3)" in message
    assert not out.exists() and not _leftovers(tmp_path)
    # the same from the library, and for a range that the recipe itself cannot hold
    with pytest.raises(RecipeError, match=r"slices\[1\] .*layer_range: \[2, 9\]"):
        merge(recipe, out, progress=False)
    with pytest.raises(RecipeError, match=r"slices\[0\].layer_range: expected \[start, end\] with 0 ≤ start < end"):
        load_recipe({"method": "passthrough", "slices": [{"path": str(base), "layer_range": [3, 1]}]})
    assert not out.exists() and not _leftovers(tmp_path)


def test_a_slice_of_another_width_is_refused_before_writing(deep, zoo, tmp_path):
    base, _ = deep
    wide = make_base("llama", tmp_path / "wide", hidden=96, layers=2)
    with pytest.raises(ModelMismatchError, match=r"slices\[1\] .* is another model than the base .*: hidden_size 96"):
        merge({"method": "passthrough", "slices": [{"path": str(base), "layer_range": [0, 2]},
                                                   {"path": str(wide), "layer_range": [0, 2]}]},
              tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)
    with pytest.raises(RecipeError, match="is a LoRA adapter"):
        merge({"method": "passthrough", "base": {"path": str(base)},
               "slices": [{"path": str(zoo["llama"].loras[0]), "layer_range": [0, 2]}]}, tmp_path / "out",
              progress=False)
    with pytest.raises(RecipeError, match=r"base \(.*\): is a LoRA adapter"):
        merge({"method": "passthrough", "base": {"path": str(zoo["llama"].loras[0])},
               "slices": [{"path": str(base), "layer_range": [0, 2]}]}, tmp_path / "out", progress=False)
    with pytest.raises(RecipeError, match="2 layer stacks"):
        merge({"method": "passthrough", "slices": [{"path": str(zoo["t5"].base), "layer_range": [0, 1]}]},
              tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


@pytest.mark.parametrize("data, message", [
    ({"method": "ties", "slices": [{"path": "a", "layer_range": [0, 2]}]}, "layer stacking takes method passthrough"),
    ({"method": "passthrough", "base": {"path": "a"}, "experts": [{"path": "b"}]}, "passthrough stacks layers"),
    ({"method": "passthrough", "experts": [{"path": "b"}], "slices": [{"path": "a", "layer_range": [0, 2]}]},
     "experts: a layer stack names its models in `slices`"),
    ({"method": "passthrough", "slices": []}, "slices: an empty list stacks nothing"),
    ({"method": "passthrough", "slices": [{"path": "a", "layer_range": [0, 2]}], "output": {"format": "lora"}},
     "output.format: a layer stack is written as a full model"),
    ({"method": "passthrough", "slices": [{"path": "a", "layer_range": [0, 2], "weight": 1}]},
     "slices[0].weight: not a key of a slice"),
    ({"method": {"name": "passthrough", "density": 0.5}, "slices": [{"path": "a", "layer_range": [0, 2]}]},
     "method.density: passthrough has no parameter 'density'"),
    ({"method": "passthrough", "slices": [{"path": "a", "layer_range": [0, 2], "scale": "x"}]},
     "slices[0].scale: expected a number"),
    ({"method": "passthrough", "slices": [{"path": "a", "layer_range": [0.5, 2]}]}, "two whole numbers"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a/b", "layer_range": [0, 2]},
                                                             {"model": "c/d", "layer_range": [0, 2]}]}]},
     "passthrough copies the layers of one model per slice, got 2 sources"),
    ({"merge_method": "passthrough", "models": [{"model": "a/b"}]}, "passthrough stacks layer ranges listed under"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a/b"}]}]}, "layer_range: expected [start, end]"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a/b", "layer_range": [0, 2]}],
                                                 "base_model": "a/b"}]}, "unsupported key(s) ['base_model']"),
    ({"merge_method": "ties", "base_model": "a/b", "slices": [
        {"sources": [{"model": "a/b", "layer_range": [0, 16]}, {"model": "c/d", "layer_range": [0, 16]}]},
        {"sources": [{"model": "a/b", "layer_range": [16, 32]}, {"model": "c/d", "layer_range": [16, 32]}]}]},
     "only one slice spanning all layers"),
])
def test_recipe_errors_of_a_stack(data, message):
    with pytest.raises(RecipeError) as err:
        load_recipe(data)
    assert message in str(err.value)
    assert err.value.hint or "mergekit" not in str(err.value)   # mergekit refusals say what to do


def test_finetune_before_merge_and_tune_have_nothing_to_work_on_in_a_stack(deep, tmp_path):
    base, _ = deep
    (tmp_path / "d.csv").write_text("id,input,target,answer_choices,eval_type\n1,a,b,,generation\n")
    stack = {"method": "passthrough", "slices": [{"path": str(base), "layer_range": [0, 2]}]}
    with pytest.raises(RecipeError, match="before_merge .* a layer stack"):
        load_recipe({**stack, "finetune": {"data": [{"path": "d.csv", "licence": "cc-by-4.0"}], "when": "before_merge"}},
                    base_dir=tmp_path)
    with pytest.raises(RecipeError, match="tune: a layer stack"):
        load_recipe({**stack, "tune": {"params": {"scale": {"low": 0, "high": 1}}, "data": ["d.csv"]}},
                    base_dir=tmp_path)


# ------------------------------------------------------------------- the rule check of the result

# Llama-3-8B's shapes: 32 layers, hidden 4096, MLP 14336, 8 key-value heads of 128, vocabulary 128256
HIDDEN, MLP, KV, VOCAB, LAYERS = 4096, 14336, 1024, 128256, 32


def _llama8b_headers() -> dict[str, bytes]:
    """Llama-3-8B as header-only safetensors shards (a few KB each; 8,030,261,248 parameters)."""
    shards, weight_map = {}, {}
    for k in range(LAYERS):
        layer = {f"model.layers.{k}.self_attn.q_proj.weight": ("BF16", [HIDDEN, HIDDEN]),
                 f"model.layers.{k}.self_attn.k_proj.weight": ("BF16", [KV, HIDDEN]),
                 f"model.layers.{k}.self_attn.v_proj.weight": ("BF16", [KV, HIDDEN]),
                 f"model.layers.{k}.self_attn.o_proj.weight": ("BF16", [HIDDEN, HIDDEN]),
                 f"model.layers.{k}.mlp.gate_proj.weight": ("BF16", [MLP, HIDDEN]),
                 f"model.layers.{k}.mlp.up_proj.weight": ("BF16", [MLP, HIDDEN]),
                 f"model.layers.{k}.mlp.down_proj.weight": ("BF16", [HIDDEN, MLP]),
                 f"model.layers.{k}.input_layernorm.weight": ("BF16", [HIDDEN]),
                 f"model.layers.{k}.post_attention_layernorm.weight": ("BF16", [HIDDEN])}
        shards[f"model-{k:05d}.safetensors"] = layer
    shards["model-outer.safetensors"] = {"model.embed_tokens.weight": ("BF16", [VOCAB, HIDDEN]),
                                         "model.norm.weight": ("BF16", [HIDDEN]),
                                         "lm_head.weight": ("BF16", [VOCAB, HIDDEN])}
    files = {}
    for fname, tensors in shards.items():
        files[fname] = safetensors_header(tensors)
        weight_map.update({n: fname for n in tensors})
    files["model.safetensors.index.json"] = json.dumps({"metadata": {"total_size": 0},
                                                        "weight_map": weight_map}).encode()
    files["config.json"] = json.dumps({"model_type": "llama", "num_hidden_layers": LAYERS, "hidden_size": HIDDEN,
                                       "intermediate_size": MLP, "vocab_size": VOCAB,
                                       "num_attention_heads": 32, "num_key_value_heads": 8}).encode()
    return files


PER_LAYER = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * MLP * HIDDEN + 2 * HIDDEN
OUTER = 2 * VOCAB * HIDDEN + HIDDEN


REPOS = [Repo("meta-llama/Meta-Llama-3-8B", [Commit(_llama8b_headers(), date="2024-04-18")],
              card_data={"license": "apache-2.0"}),
         Repo("nous/Hermes-2-Pro-Llama-3-8B", [Commit(_llama8b_headers(), date="2024-05-01")],
              card_data={"license": "apache-2.0"})]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with HubSim(REPOS) as sim, sim.environ(cache_dir=tmp_path_factory.mktemp("hub-cache")):
        yield sim


def _stack_recipe(tmp_path, ranges, name="stack.yaml"):
    repos = ["meta-llama/Meta-Llama-3-8B", "nous/Hermes-2-Pro-Llama-3-8B"]
    return _write(tmp_path / name, {"method": "passthrough", "slices": [
        {"model": repos[i % 2], "revision": "cutoff", "layer_range": list(r)} for i, r in enumerate(ranges)]})


def test_rule_check_counts_the_stacked_model_not_only_its_inputs(hub, tmp_path, capsys):
    recipe = load_recipe(_stack_recipe(tmp_path, [(0, 32), (0, 32)]))
    report = check_models(recipe_refs(recipe), stack=recipe_stack(recipe))
    inputs = [f for f in report.findings if f.rule == "params" and f.role != "result"]
    assert len(inputs) == 2 and all(f.status == WARN for f in inputs)   # each input is 8.03B: allowed (tolerance)
    (result,) = [f for f in report.findings if f.role == "result"]
    n = 64 * PER_LAYER + OUTER
    assert result.status == VIOLATION and f"{n:,}" in result.reason and "more than 8B" in result.reason
    assert result.model == "the stacked model (64 layers from 2 slices)"
    assert report.models[-1] == {"model": result.model, "role": "result", "source": "slices", "parameters": n,
                                 "layers": 64}
    assert not report.ok
    # no weights were downloaded: the Hub was asked for headers only
    assert not any(r.method == "GET" and r.path.endswith(".safetensors") and r.range is None for r in hub.requests)

    # the command says it too, before any merge: exit 1, the result's row in the table
    code = main(["check", str(tmp_path / "stack.yaml")])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 1 and "the stacked model (64 layers from 2 slices)" in text and "more than 8B" in text

    # the same depth as the inputs (16 + 16 layers) keeps Llama-3-8B's size: within the tolerance
    fine = load_recipe(_stack_recipe(tmp_path, [(0, 16), (16, 32)], "fine.yaml"))
    report = check_models(recipe_refs(fine), stack=recipe_stack(fine))
    (result,) = [f for f in report.findings if f.role == "result"]
    assert result.status == WARN and f"{32 * PER_LAYER + OUTER:,}" in result.reason and report.ok


def test_the_judge_refuses_a_stack_over_the_limit_at_intake(hub, tmp_path, monkeypatch):
    from mergelab.judge.home import init_home
    from mergelab.judge.intake import submit
    from mergelab.testing.judge_season import write_tasks

    monkeypatch.setenv("MERGELAB_HUB_TIMEOUT", "5")
    home = init_home(tmp_path / "home", write_tasks(tmp_path / "hidden", n_mc=2, n_gen=2))
    pinned = [{"model": r.repo_id, "revision": r.commits[-1].sha} for r in REPOS]
    folder = tmp_path / "sub"
    folder.mkdir()
    _write(folder / "recipe.yaml", {"method": "passthrough", "slices": [{**pinned[0], "layer_range": [0, 32]},
                                                                        {**pinned[1], "layer_range": [0, 32]}]})
    receipt = submit(home.root, folder, "blue")
    assert receipt.status == "rejected"
    assert any("the stacked model (64 layers from 2 slices) (result) params" in r and "more than 8B" in r
               for r in receipt.reasons), receipt.reasons
    _write(folder / "recipe.yaml", {"method": "passthrough", "slices": [{**pinned[0], "layer_range": [0, 30]},
                                                                        {**pinned[1], "layer_range": [20, 40]}]})
    receipt = submit(home.root, folder, "blue")
    assert receipt.status == "rejected"
    assert any("layer_range: [20, 40] is not a range of the model's 32 layers" in r for r in receipt.reasons)


def test_rule_check_of_a_layer_range_past_the_model_is_a_recipe_error(hub, tmp_path):
    _stack_recipe(tmp_path, [(0, 24), (8, 40)])
    r = subprocess.run([sys.executable, "-m", "mergelab", "check", str(tmp_path / "stack.yaml")],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "40"}, check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "layer_range: [8, 40] is not a range of the model's 32 layers" in " ".join(r.stderr.split())


def test_rule_check_of_local_slices_counts_from_headers(deep, tmp_path):
    base, expert = deep
    r = load_recipe({"method": "passthrough", "slices": [{"path": str(base), "layer_range": [0, 4]},
                                                         {"path": str(expert), "layer_range": [0, 4]}]})
    report = check_models(recipe_refs(r), stack=recipe_stack(r))
    assert [f.role for f in report.findings if f.rule == "params"] == ["base", "slice 2", "result"]
    merged = merge(r, tmp_path / "out", progress=False)
    assert merged.tensors == len(CheckpointReader(tmp_path / "out").keys())
    out = CheckpointReader(tmp_path / "out")
    assert report.models[-1]["parameters"] == _parameters(out)


# -------------------------------------------------------------------------------------- the plan


def test_plan_sizes_the_stacked_model(deep, tmp_path):
    from mergelab.plan import plan_recipe

    base, expert = deep
    recipe = _write(tmp_path / "r.yaml", {"method": "passthrough",
                                          "slices": [{"path": str(base), "layer_range": [0, 4]},
                                                     {"path": str(expert), "layer_range": [1, 4]}]})
    plan = plan_recipe(recipe, hardware="a6000")
    merge(recipe, tmp_path / "out", progress=False)
    out = CheckpointReader(tmp_path / "out")
    stacked = plan.models["result"]
    assert stacked["layers"] == 7 and stacked["params"] == _parameters(out)
    assert stacked["tensors"] == len(out.keys())
    assert plan.stage("merge") is not None and "passthrough" in plan.stage("merge").detail




# ------------------------------------------------------------------------------ mergelab run


def test_run_and_reproduce_a_stack(deep, tmp_path):
    from mergelab.run.pipeline import reproduce, run_recipe
    from mergelab.testing import tree_bytes, write_mixed_csv

    base, expert = deep
    write_mixed_csv(tmp_path / "val.csv", 4, choice_input="Is {i} even?", choices=["yes", "no"],
                    gen_input="Count to {i}:", gen_target="{i}")
    recipe = _write(tmp_path / "r.yaml", {"method": "passthrough",
                                          "slices": [{"path": str(base), "layer_range": [0, 4]},
                                                     {"path": str(expert), "layer_range": [2, 4]}],
                                          "eval": {"data": ["val.csv"], "max_new_tokens": 2}})
    res = run_recipe(recipe, tmp_path / "run", rules=False, budget="60m")
    m = res.manifest
    assert [r["role"] for r in m["models"]] == ["base", "slice 1", "slice 2"]   # the base is slice 1's model
    assert m["models"][0]["files"] == m["models"][1]["files"] and m["models"][2]["files"]
    assert json.loads((tmp_path / "run/model/config.json").read_text())["num_hidden_layers"] == 6
    assert res.plan.models["result"]["layers"] == 6
    assert (tmp_path / "run/eval/val.csv").is_file()
    again = reproduce(tmp_path / "run/manifest.json", tmp_path / "again")
    assert tree_bytes(tmp_path / "run/model") == tree_bytes(tmp_path / "again/model")
    assert again.manifest["outputs"] == m["outputs"]
