"""Property-based tests (hypothesis) of every parser a user's file reaches: safetensors headers,
adapter configs, recipes (as a mapping and as YAML text), mergekit configs, competition CSVs and
run manifests. Any input gives a result or ONE MergelabError — never another exception — in
bounded time.

Each test runs 500 examples (``settings(max_examples=500)``), derandomized so that CI runs the same
examples every time; the seven together take well under a minute on a 2-core machine. To search
further: ``HYPOTHESIS_PROFILE=explore pytest tests/test_properties.py`` (random, 5000 examples each).
The inputs are mostly *mutations of a valid file* (a value replaced by junk, a key dropped or
added, bytes flipped), so that they get past the first check and reach the deeper ones.
"""
from __future__ import annotations

import copy
import json
import os
import struct
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from mergelab.errors import MergelabError
from mergelab.evaluate.data import read_competition_csv
from mergelab.io.adapter import LoraAdapter
from mergelab.io.checkpoint import CheckpointReader, read_safetensors_header
from mergelab.recipe import read_recipe, resolve_params
from mergelab.run import pipeline
from mergelab.run.manifest import read_manifest

settings.register_profile("ci", max_examples=500, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", max_examples=5000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: one example of any parser must finish in this many seconds, even on a loaded machine
SLOW = 5.0


def gives_result_or_one_error(fn, *args, **kwargs):
    """Call ``fn``: a result or a MergelabError pass; anything else (or a slow answer) fails."""
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    except MergelabError as exc:
        assert str(exc).strip(), "an error with no message"
        return None
    finally:
        assert time.perf_counter() - t0 < SLOW, f"{fn.__name__} took {time.perf_counter() - t0:.1f} s"


# ---------------------------------------------------------------------------------- strategies

ODD_TEXT = st.sampled_from([
    "", "0", "four", "1e400", "nan", "q_proj(", "(a+)+", ".*", "[", "\x00", "é", "a" * 300, "base", "e1",
    "linear", "ties", "bfloat16", "a.csv", "/etc/passwd", "..", "~", "5GB"])
ODD_SCALARS = st.one_of(ODD_TEXT, st.sampled_from([
    None, True, False, 0, 1, -1, 2, 8, 0.5, -0.0, 1e308, 10**400, -(10**400), float("nan"), float("inf"),
    float("-inf")]))
SCALARS = st.one_of(ODD_SCALARS, st.integers(), st.floats(), st.text(max_size=8))
JSONISH = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.one_of(st.text(max_size=6), ODD_TEXT), inner, max_size=3),
                       max_leaves=6)


@st.composite
def mutated(draw, base, keys=()):
    """``base`` (a JSON-like tree) with one to three changes: a value replaced by junk, a key
    dropped, a key (from ``keys`` or random) added, a list item appended or removed."""
    tree = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        node = tree
        while True:   # walk down to a random container
            children = list(node.items()) if isinstance(node, dict) else list(enumerate(node)) \
                if isinstance(node, list) else []
            containers = [(k, v) for k, v in children if isinstance(v, (dict, list))]
            if not containers or draw(st.booleans()):
                break
            node = draw(st.sampled_from(containers))[1]
        if not isinstance(node, (dict, list)):
            continue
        op = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if isinstance(node, dict):
            if op == "add" or not node:
                key = draw(st.one_of(st.sampled_from(list(keys) or ["x"]), st.text(max_size=6)))
                node[key] = draw(JSONISH)
            elif op == "drop":
                node.pop(draw(st.sampled_from(sorted(node, key=str))))
            else:
                node[draw(st.sampled_from(sorted(node, key=str)))] = draw(JSONISH)
        else:
            if op == "add" or not node:
                node.append(draw(JSONISH))
            elif op == "drop":
                node.pop(draw(st.integers(0, len(node) - 1)))
            else:
                node[draw(st.integers(0, len(node) - 1))] = draw(JSONISH)
    return tree


@st.composite
def mangled_text(draw, text: str, alphabet: str, tokens: tuple[str, ...] = ()):
    """``text`` with a few characters inserted, deleted or replaced (from ``alphabet``, or whole
    ``tokens``)."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(chars)))
        op = draw(st.sampled_from(["insert", "delete", "replace"]))
        c = draw(st.sampled_from(list(alphabet) + list(tokens)))
        if op == "insert" or i == len(chars):
            chars.insert(i, c)
        elif op == "delete":
            del chars[i]
        else:
            chars[i] = c
    return "".join(chars)


def _dump(obj) -> bytes:
    return json.dumps(obj, default=str).encode()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with model folders, an adapter's weights and a CSV that recipes can name."""
    root = tmp_path_factory.mktemp("props")
    for d in ("base", "e1", "e2"):
        (root / d).mkdir()
    (root / "a.csv").write_text("id,input,target,answer_choices,eval_type\n1,q,0,\"['x','y']\",multiple_choice\n")
    adapter = root / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for module, r in (("q_proj", 2), ("k_proj", 4)):
        p = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[p + ".lora_A.weight"] = torch.randn(r, 8, generator=g)
        tensors[p + ".lora_B.weight"] = torch.randn(8, r, generator=g)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    return root


# --------------------------------------------------------------------------- safetensors headers

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3"]
ENTRY = st.fixed_dictionaries({
    "dtype": st.one_of(st.sampled_from(DTYPES), SCALARS),
    "shape": st.one_of(st.lists(st.integers(-2, 5), max_size=3), st.lists(SCALARS, max_size=2), SCALARS),
    "data_offsets": st.one_of(st.lists(st.integers(-4, 70), min_size=2, max_size=2), JSONISH),
})
HEADERS = st.dictionaries(st.one_of(st.sampled_from(["w", "b", "__metadata__"]), st.text(max_size=4)),
                          st.one_of(ENTRY, JSONISH), max_size=4)


@st.composite
def safetensors_files(draw):
    header = draw(HEADERS)
    if draw(st.booleans()):   # a plausible layout: make the offsets agree with the shapes
        pos = 0
        for name, e in header.items():
            if isinstance(e, dict) and e.get("dtype") in DTYPES and isinstance(e.get("shape"), list) \
                    and all(type(d) is int and d >= 0 for d in e["shape"]):
                n = 1
                for d in e["shape"]:
                    n *= d
                size = n * {"F32": 4, "F16": 2, "BF16": 2, "I64": 8}.get(e["dtype"], 1)
                e["data_offsets"] = [pos, pos + size]
                pos += size
    raw = json.dumps(header).encode()
    if draw(st.integers(0, 4)) == 0:
        raw = draw(mangled_text(raw.decode(), '{}[]",:0123456789-.eE \\\xff')).encode("utf-8", "surrogateescape")
    length = len(raw) if draw(st.integers(0, 3)) else draw(st.sampled_from([0, 7, len(raw) + 1, 2**64 - 1]))
    data = draw(st.binary(max_size=80))
    return struct.pack("<Q", length) + raw + data if draw(st.integers(0, 9)) else draw(st.binary(max_size=24))


@given(blob=safetensors_files())
def test_any_safetensors_header_gives_tensors_or_one_error(work, blob):
    f = work / "prop.safetensors"
    f.write_bytes(blob)
    infos = gives_result_or_one_error(read_safetensors_header, f)
    if infos is not None:   # whatever passed the header check is readable, within the file
        reader = CheckpointReader(f)
        for name in reader.keys():
            t = reader.get(name)
            assert tuple(t.shape) == reader.shape(name) and t.numel() * t.element_size() <= len(blob)
        reader.close()


# ------------------------------------------------------------------------------- adapter configs

ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "rank_pattern": {"k_proj": 4},
                  "alpha_pattern": {"layers.0.self_attn.q_proj": 3}, "use_rslora": False,
                  "fan_in_fan_out": False, "target_modules": ["q_proj", "k_proj"], "bias": "none",
                  "base_model_name_or_path": "org/base", "init_lora_weights": True, "use_dora": False}
REGEXISH = st.text(alphabet="kq_proj.()*+?[]{}|\\^$0-9,", max_size=12)


@st.composite
def adapter_configs(draw):
    cfg = draw(mutated(ADAPTER_CONFIG, keys=list(ADAPTER_CONFIG) + ["modules_to_save", "layer_replication"]))
    if isinstance(cfg, dict) and draw(st.booleans()):   # regex-ish pattern keys
        cfg[draw(st.sampled_from(["rank_pattern", "alpha_pattern"]))] = draw(
            st.dictionaries(REGEXISH, st.one_of(st.integers(-1, 6), SCALARS), max_size=3))
    raw = _dump(cfg)
    if draw(st.integers(0, 5)) == 0:
        raw = draw(mangled_text(raw.decode(), '{}[]",:0123456789 \xff')).encode("utf-8", "surrogateescape")
    return raw


@given(raw=adapter_configs())
def test_any_adapter_config_gives_an_adapter_or_one_error(work, raw):
    (work / "adapter" / "adapter_config.json").write_bytes(raw)
    adapter = gives_result_or_one_error(LoraAdapter, work / "adapter")
    if adapter is not None:
        for path, mod in adapter.modules.items():
            assert mod.rank >= 1 and torch.isfinite(torch.tensor(mod.scale))
            assert adapter.delta(path).shape == mod.shape
        adapter.close()


# ------------------------------------------------------------------------------------- recipes

RECIPE_KEYS = ["base", "experts", "method", "output", "seed", "eval", "finetune", "tune", "path", "model",
               "revision", "weight", "density", "lambda", "name", "dtype", "shard_size", "format", "rank",
               "data", "filter", "value", "params", "batch_size", "shots", "licence", "steps", "trials", "low",
               "high", "tokenizer", "source"]


def _recipe(work: Path) -> dict:
    return {"base": {"path": "base"},
            "experts": [{"path": "e1", "weight": [0.2, 0.8], "density": 0.5},
                        {"path": "e2", "weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}],
            "method": {"name": "dare_ties", "lambda": 1.0, "density": 0.4},
            "output": {"dtype": "bfloat16", "shard_size": "5GB"},
            "eval": {"data": ["a.csv"], "batch_size": 2},
            "finetune": {"when": "after_merge", "data": [{"path": "a.csv", "licence": "mit"}], "steps": 2},
            "tune": {"params": {"density": {"low": 0.1, "high": 0.9}}, "data": ["a.csv"], "trials": 2},
            "tokenizer": {"source": "union"}, "seed": 3}


def _use(doc) -> None:
    """What the engine does next with a valid recipe: resolve its parameters for one tensor."""
    resolve_params(doc.recipe, "model.layers.1.mlp.up_proj.weight", 4)


@given(data=st.data())
def test_any_recipe_mapping_gives_a_recipe_or_one_error(work, data):
    recipe = data.draw(mutated(_recipe(work), keys=RECIPE_KEYS))
    doc = gives_result_or_one_error(read_recipe, recipe, base_dir=work)
    if doc is not None:
        _use(doc)


YAML_RECIPE = """base: {path: base}
experts:
  - {path: e1, weight: [0.2, 0.8], density: 0.5}
  - path: e2
    weight: [{filter: mlp, value: 0.3}, {value: 0.7}]
method: {name: ties, lambda: 1.0, density: 0.4}
output: {dtype: bf16, shard_size: 5GB}
eval: {data: a.csv, batch_size: 2}
seed: 3
"""
YAML_CHARS = ":{}[],-&*!|>#'\"\n\t %@?.~09eEx\\\xff\u2028"
YAML_TOKENS = (" 2024-13-45", " !!int x", " !!float x", " !!binary x", " !!set {a: 1}", " !!python/object:os.system",
               " &a", " *a", " &a [*a]", " 1:20:30", " .nan", " .inf", " " + "9" * 400, " ~", " !!str [1]",
               " !!timestamp 2001-12-14t21:59:43.10-99:00", " !!timestamp x", "\n? [1]\n: 2\n", "\n- x\n")


@given(data=st.data())
def test_any_recipe_text_gives_a_recipe_or_one_error(work, data):
    kind = data.draw(st.integers(0, 9))
    if kind == 0:
        raw = data.draw(st.binary(max_size=60))
    else:
        text = data.draw(mangled_text(YAML_RECIPE, YAML_CHARS, YAML_TOKENS)) if kind > 2 else \
            data.draw(st.text(alphabet=YAML_CHARS + "abse", max_size=60))
        raw = text.encode("utf-8", "surrogateescape")
    f = work / "prop_recipe.yaml"
    f.write_bytes(raw)
    doc = gives_result_or_one_error(read_recipe, f)
    if doc is not None:
        _use(doc)


MERGEKIT = {"merge_method": "ties", "base_model": "base",
            "models": [{"model": "e1", "parameters": {"weight": [0.2, 0.8], "density": 0.5}},
                       {"model": {"model": {"path": "e2"}}, "parameters": {"weight": 0.5}}],
            "parameters": {"normalize": True, "int8_mask": True}, "dtype": "bfloat16", "seed": 1,
            "tokenizer_source": "union"}
MERGEKIT_SLERP = {"merge_method": "slerp", "base_model": "base",
                  "slices": [{"sources": [{"model": "base", "layer_range": [0, 2]},
                                          {"model": "e1", "layer_range": [0, 2]}]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.5}]}}
MERGEKIT_KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
                 "tokenizer_source", "model", "layer_range", "sources", "weight", "density", "t", "lora",
                 "path", "revision"]


@given(data=st.data())
def test_any_mergekit_config_gives_a_recipe_or_one_error(work, data):
    base = data.draw(st.sampled_from([MERGEKIT, MERGEKIT_SLERP]))
    config = data.draw(mutated(base, keys=MERGEKIT_KEYS))
    doc = gives_result_or_one_error(read_recipe, config, base_dir=work)
    if doc is not None:
        _use(doc)


# ------------------------------------------------------------------------------ competition CSVs

FIELDS = st.one_of(
    st.sampled_from(["id", "input", "target", "answer_choices", "eval_type", "multiple_choice", "generation",
                     "0", "1", "-1", "9" * 30, "['a', 'b']", '["a", "b"]', "('a',)", "['a', 1]", "[[", "[]",
                     "['\\N{x}']", "__import__('os')", "", " ", "\ufeffid"]),
    st.text(alphabet="ab01,\"'\n\r[]() \\\x00é", max_size=12))


@st.composite
def csv_files(draw):
    header = draw(st.one_of(st.just(["id", "input", "target", "answer_choices", "eval_type"]),
                            st.lists(FIELDS, max_size=6)))
    rows = draw(st.lists(st.lists(FIELDS, min_size=0, max_size=6), max_size=5))
    quote = draw(st.booleans())

    def line(fields):
        if quote:
            return ",".join('"' + f.replace('"', '""') + '"' if any(c in f for c in ',"\n\r') else f for f in fields)
        return ",".join(fields)   # unquoted: commas and quotes in fields make malformed rows

    raw = "\n".join(line(r) for r in [header, *rows]).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        raw = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=4))
    return raw


@given(raw=csv_files())
def test_any_competition_csv_gives_rows_or_one_error(work, raw):
    f = work / "prop.csv"
    f.write_bytes(raw)
    rows = gives_result_or_one_error(read_competition_csv, f)
    for row in rows or []:
        assert row.id and (not row.is_mc or (row.choices and (row.target is None or 0 <= row.target < len(row.choices))))


# ------------------------------------------------------------------------------------ manifests

def _manifest(work: Path) -> dict:
    recipe = {"base": {"path": str(work / "base")},
              "experts": [{"path": str(work / "e1"), "weight": 0.5}, {"path": str(work / "e2"), "weight": 0.5}],
              "method": {"name": "linear"}, "output": {"format": "full"}, "seed": 0,
              "eval": {"data": [str(work / "a.csv")]}}
    files = {"model.safetensors": "0" * 64, "config.json": "1" * 64}
    return {"mergelab_manifest": 1, "created": "2024-05-01T00:00:00Z", "recipe": recipe,
            "models": [{"role": "base", "source": "local", "local_path": str(work / "base"), "files": files},
                       {"role": "expert 1", "source": "local", "local_path": str(work / "e1"), "files": files},
                       {"role": "expert 2", "source": "local", "local_path": str(work / "e2"), "files": files}],
            "seed": 0, "rules": "not checked (--no-rules)", "versions": {"python": "3.11"},
            "stages": {"merge": {"key": "k", "outputs": {"model.safetensors": "2" * 64}, "seconds": 1.0}},
            "timings": {"merge": 1.0}, "outputs": {"model/model.safetensors": "2" * 64}}


def _rerun_as_recorded(work: Path):
    """A stand-in for run_recipe: reads the recipe as the real one does first, then "writes" exactly
    what the sample manifest records, so that reproduce goes on to compare without merging."""
    def run_recipe(recipe, out_dir, **kwargs):
        doc = read_recipe(recipe)
        return pipeline.RunResult(Path(out_dir), _manifest(work) | {"recipe": doc.data})
    return run_recipe


@given(data=st.data())
def test_any_manifest_is_refused_before_the_rerun_or_reproduces(work, data):
    if data.draw(st.integers(0, 9)) == 0:
        manifest = data.draw(JSONISH)
    else:
        manifest = data.draw(mutated(_manifest(work), keys=["recipe", "outputs", "models", "role", "files",
                                                            "stages", "finished", "key", "complete"] + RECIPE_KEYS))
    raw = _dump(manifest)
    if data.draw(st.integers(0, 9)) == 0:
        raw = data.draw(mangled_text(raw.decode(), '{}[]",:0123 \xff')).encode("utf-8", "surrogateescape")
    f = work / "prop_manifest.json"
    f.write_bytes(raw)
    gives_result_or_one_error(read_manifest, f)
    with mock.patch.object(pipeline, "run_recipe", _rerun_as_recorded(work)):
        gives_result_or_one_error(pipeline.reproduce, f, work / "never-created")
    assert not (work / "never-created").exists()
