"""Bad input files, each named in issue 16 (and docs/errors.md): every parser a user's file reaches
gives a result or ONE MergelabError saying what, where and what to do — never a RecursionError,
OverflowError, re.error, UnicodeDecodeError, AttributeError or TypeError."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.errors import (AdapterError, CheckpointError, DataError, MergelabError, RecipeError,
                             ReproducibilityError)
from mergelab.io.adapter import LoraAdapter
from mergelab.io.checkpoint import CheckpointReader, read_safetensors_header


def _safetensors(path: Path, header: bytes | str | dict, data: bytes = b"") -> Path:
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _one(tmp_path, entry: dict, data: bytes = b"\0" * 16) -> Path:
    return _safetensors(tmp_path / "x.safetensors", {"w": entry}, data)


# --------------------------------------------------------------------------- safetensors headers


def test_a_header_nested_200000_deep_is_one_checkpoint_error(tmp_path):
    f = _safetensors(tmp_path / "deep.safetensors", "[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_safetensors_header(f)
    with pytest.raises(CheckpointError, match="deep.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("shape, why", [
    ("[1e400]", "got \\[inf\\]"),              # OverflowError before
    ("[-1, -4]", "≥ 0"),                      # negative dims were accepted (numel 4)
    ("[1.5]", "whole numbers"),
    ('["4"]', "whole numbers"),
    ("[true]", "whole numbers"),
    ("[" + ",".join(["1"] * 33) + "]", "at most 32"),
    ("5", "shape must be a list"),
    ("[" + "9" * 5000 + "]", "more than 4300 digits"),
    ("[NaN]", "NaN is not a JSON number"),
])
def test_bad_shapes_are_refused_before_use(tmp_path, shape, why):
    f = _safetensors(tmp_path / "x.safetensors",
                     '{"w": {"dtype": "F32", "shape": ' + shape + ', "data_offsets": [0, 16]}}', b"\0" * 16)
    with pytest.raises(CheckpointError, match=why) as err:
        read_safetensors_header(f)
    assert "x.safetensors" in str(err.value) and "re-download or re-save" in str(err.value)


@pytest.mark.parametrize("entry, why", [
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 32]}, "outside the 16 bytes"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}, "outside"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [-4, 12]}, "outside"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}, "needs 8"),
    ({"dtype": "F16", "shape": [4], "data_offsets": [0, 16]}, "needs 8"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "two whole numbers"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}, "two whole numbers"),
    ({"dtype": "F32", "shape": [4]}, "data_offsets must be"),
    ({"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype"),
    ({"dtype": "F4", "shape": [4], "data_offsets": [0, 16]}, "unsupported dtype 'F4'"),
    ([1, 2], "expected {dtype, shape, data_offsets}"),
])
def test_bad_byte_ranges_and_dtypes_are_refused(tmp_path, entry, why):
    with pytest.raises(CheckpointError, match=why.replace("[", "\\[").replace("{", "\\{")):
        read_safetensors_header(_one(tmp_path, entry))


def test_overlapping_tensors_are_refused(tmp_path):
    f = _safetensors(tmp_path / "x.safetensors", {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 16)
    with pytest.raises(CheckpointError, match="'a' and 'b' overlap"):
        read_safetensors_header(f)


@pytest.mark.parametrize("header, why", [
    ('{"__metadata__": 5}', "__metadata__ must map names to text"),
    ('{"__metadata__": {"format": ["pt"]}}', "__metadata__ must map names to text"),
    ("[1, 2]", "a JSON list, not an object"),
    ('{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}, "w": 1}', "appears twice"),
    (b'{"\xff": 1}', "not UTF-8"),
    ("{", "not valid JSON"),
])
def test_bad_header_json_is_refused(tmp_path, header, why):
    with pytest.raises(CheckpointError, match=why):
        read_safetensors_header(_safetensors(tmp_path / "x.safetensors", header))


@pytest.mark.parametrize("length, why", [(2**64 - 1, "more than the 100,000,000"),
                                         (100, "does not fit the file")])
def test_an_absurd_header_length_is_refused_without_reading(tmp_path, length, why):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", length) + b"{}")
    with pytest.raises(CheckpointError, match=why):
        read_safetensors_header(f)


def test_a_metadata_that_is_not_text_no_longer_breaks_the_reader(tmp_path):
    _safetensors(tmp_path / "model.safetensors", '{"__metadata__": 5}')
    with pytest.raises(CheckpointError, match="__metadata__"):   # was: TypeError in dict.update
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("index, why", [
    ("[" * 100_000, "nested too deeply"),
    ('{"weight_map": {"w": 5}}', "names the shard 5"),
    ('{"weight_map": [1]}', "no weight_map object"),
    ("42", "no weight_map object"),
])
def test_a_broken_index_is_one_checkpoint_error(tmp_path, index, why):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=why):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("config, why", [("[" * 100_000, "nested too deeply"), ("[1]", "a JSON object"),
                                         (b"\xff\xfe", "not UTF-8")])
def test_a_broken_model_config_is_one_checkpoint_error(tmp_path, config, why):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes(config.encode() if isinstance(config, str) else config)
    with pytest.raises(CheckpointError, match=why):
        CheckpointReader(tmp_path)


def test_a_valid_file_still_reads(tmp_path):
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(0, 5), "c": torch.tensor(2.0)}
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    r = CheckpointReader(tmp_path)
    assert {k: r.get(k).tolist() for k in r.keys()} == {k: v.tolist() for k, v in t.items()}


# ------------------------------------------------------------------------------- adapter configs

_GOOD_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": "org/base", "bias": "none", "use_rslora": False}


def _adapter(folder: Path, config, *, raw: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (module, r) in enumerate([("q_proj", 2), ("v_proj", 2), ("k_proj", 4)]):
        p = f"base_model.model.model.layers.0.self_attn.{module}"
        tensors[p + ".lora_A.weight"] = torch.randn(r, 8, generator=g)
        tensors[p + ".lora_B.weight"] = torch.randn(8, r, generator=g)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_bytes(raw if raw is not None else json.dumps(config).encode())
    return folder


def test_a_good_adapter_with_patterns_still_loads(tmp_path):
    cfg = {**_GOOD_CONFIG, "rank_pattern": {"k_proj": 4}, "alpha_pattern": {"layers.0.self_attn.k_proj": 2.0}}
    a = LoraAdapter(_adapter(tmp_path / "a", cfg))
    assert {m.rsplit(".", 1)[-1]: (a.modules[m].rank, a.modules[m].scale) for m in a.modules} == {
        "q_proj": (2, 2.0), "v_proj": (2, 2.0), "k_proj": (4, 0.5)}


@pytest.mark.parametrize("change, why", [
    ({"rank_pattern": {"q_proj(": 2, "k_proj": 4}}, "rank_pattern key 'q_proj\\(' is not a regular expression"),  # re.error
    ({"rank_pattern": {"k_proj": "four"}}, "must be a whole number ≥ 1, got 'four'"),    # ValueError in int()
    ({"rank_pattern": {"k_proj": 4.5}}, "whole number"),
    ({"rank_pattern": {"k_proj": True}}, "whole number"),
    ({"rank_pattern": [["k_proj", 4]]}, "rank_pattern must be an object"),
    ({"rank_pattern": {"(k+)+_proj": 4}}, "repeats a group"),
    ({"rank_pattern": {".*.*.*.*k_proj": 4}}, "more than 3 repetitions"),
    ({"rank_pattern": {"k" * 300: 4}}, "longer than 200"),
    ({"alpha_pattern": {"k_proj": "x"}}, "alpha_pattern\\['k_proj'\\] must be a finite number"),
    ({"alpha_pattern": {"k_proj": None}}, "finite number"),
    ({"alpha_pattern": {"[": 1}}, "alpha_pattern key '\\[' is not a regular expression"),
    ({"alpha_pattern": "q_proj"}, "alpha_pattern must be an object"),
    ({"r": 0}, "r must be a whole number ≥ 1"),
    ({"r": -2}, "r must be a whole number ≥ 1"),
    ({"r": "8"}, "r must be a whole number"),
    ({"r": 10**400}, "r must be a whole number"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number"),
    ({"lora_alpha": 10**400}, "lora_alpha must be a finite number"),
    ({"lora_alpha": [16]}, "lora_alpha must be a finite number"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),   # was read as True
    ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
    ({"base_model_name_or_path": ["x"]}, "base_model_name_or_path must be text"),
    ({"peft_type": ["LORA"]}, "is a \\['LORA'\\] adapter"),
    ({"init_lora_weights": [[["pissa"]]]}, None),   # not text: not a base-changing init, loads
])
def test_bad_adapter_configs_are_one_adapter_error(tmp_path, change, why):
    folder = _adapter(tmp_path / "a", {**_GOOD_CONFIG, "rank_pattern": {"k_proj": 4}, **change})
    if why is None:
        LoraAdapter(folder)
        return
    with pytest.raises(AdapterError, match=why) as err:
        LoraAdapter(folder)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("raw, why", [
    (b"[1, 2]", "an adapter config is a JSON object, got a JSON list"),
    (b"42", "got a JSON int"),
    (b'{"r": 2, "peft_type": "LORA\xff"}', "not UTF-8"),
    (b"[" * 100_000, "nested too deeply"),
    (b"{", "not valid JSON"),
])
def test_non_dict_non_utf8_and_deep_adapter_configs_are_one_adapter_error(tmp_path, raw, why):
    with pytest.raises(AdapterError, match=why):
        LoraAdapter(_adapter(tmp_path / "a", None, raw=raw))


# ------------------------------------------------------------------------------------- recipes

from mergelab.recipe import read_recipe  # noqa: E402


def _recipe_file(tmp_path, text: str | bytes, name: str = "r.yaml") -> Path:
    for d in ("base", "e1", "e2"):
        (tmp_path / d).mkdir(exist_ok=True)
    f = tmp_path / name
    f.write_bytes(text.encode() if isinstance(text, str) else text)
    return f


GOOD = "base: {path: base}\nexperts: [{path: e1, weight: 0.5}, {path: e2, weight: 0.5}]\nmethod: linear\n"


def test_a_non_utf8_recipe_is_one_recipe_error(tmp_path):
    f = _recipe_file(tmp_path, GOOD.encode() + b"seed: \xff\n")
    with pytest.raises(RecipeError, match=r"r.yaml: not UTF-8 text \(invalid start byte at byte \d+, line 4\)"):
        read_recipe(f)


@pytest.mark.parametrize("weight, why", [
    ("9" * 400, "a number of about 400 digits is too large to compute with"),   # OverflowError before
    ("-" + "9" * 400, "too large to compute with"),
    (".nan", "nan is not a finite number"),
    (".inf", "inf is not a finite number"),
    ("-.inf", "-inf is not a finite number"),
    ("'1e400'", "expected a number"),
    ("[0.5, .nan]", r"weight\[1\]: nan is not a finite number"),
    ("[{filter: mlp, value: .inf}]", r"weight\[0\].value: inf is not a finite number"),
])
def test_huge_and_non_finite_weights_are_clear_recipe_errors(tmp_path, weight, why):
    f = _recipe_file(tmp_path, f"base: {{path: base}}\nexperts: [{{path: e1, weight: {weight}}}]\nmethod: linear\n")
    with pytest.raises(RecipeError, match=why) as err:
        read_recipe(f)
    assert "experts[0].weight" in str(err.value) and "9" * 80 not in str(err.value)


def test_non_finite_parameters_of_any_method_are_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"method.lambda: inf is not a finite number"):
        read_recipe(_recipe_file(tmp_path, GOOD.replace("method: linear", "method: {name: ties, lambda: .inf}")))
    with pytest.raises(RecipeError, match="output.shard_size: not a size"):   # OverflowError before
        read_recipe(_recipe_file(tmp_path, GOOD + "output: {shard_size: 1e400GB}\n"))


@pytest.mark.parametrize("text, why", [
    ("merge_method: ties\nbase_model: base\nmodels: [{model: e1}]\nparameters: [1, 2]\n",
     r"mergekit config: parameters: expected a mapping .* got \[1, 2\]"),           # AttributeError before
    ("merge_method: slerp\nbase_model: base\nslices: [{sources: [5]}]\n",
     r"slices\[0\].sources\[0\]: expected \{model: ..., layer_range"),               # AttributeError before
    ("merge_method: ties\nbase_model: base\nmodels: [{model: e1, parameters: 5}]\n",
     r"models\[0\].parameters: expected a mapping"),                                  # TypeError before
    ("merge_method: ties\nbase_model: base\nmodels: [{model: e1, parameters: [[weight, 1]]}]\n",
     r"models\[0\].parameters: expected a mapping"),
    ("merge_method: slerp\nbase_model: base\nslices: [{sources: [{model: e1, layer_range: 5}]}]\n",
     r"layer_range: expected \[0, number of layers\], got 5"),                         # TypeError before
    ("merge_method: slerp\nbase_model: base\nslices: [{sources: [{model: e1, layer_range: [[0], 2]}]}]\n",
     r"layer_range: expected \[0, number of layers\]"),                              # unhashable before
    ("merge_method: ties\nbase_model: {model: {path: base, revision: [1]}}\nmodels: [{model: e1}]\n",
     r"base_model.revision: expected a branch, tag or commit"),
    ("merge_method: [ties]\nmodels: [e1]\n", r"merge_method: \['ties'\] is not supported"),
    ("merge_method: ties\nbase_model: base\nmodels: [{model: e1}]\nparameters: {1: 2}\n",
     "parameter names are text, got 1"),
    ("merge_method: ties\n? [1]\n: 2\n", "not valid YAML"),
])
def test_mergekit_structural_junk_is_one_recipe_error(tmp_path, text, why):
    with pytest.raises(RecipeError, match=why) as err:
        read_recipe(_recipe_file(tmp_path, text))
    assert "r.yaml" in str(err.value)


@pytest.mark.parametrize("text, why", [
    ("a: " + "[" * 100_000 + "]" * 100_000, "nested too deeply"),                    # RecursionError before
    ("x: &a [*a]\n" + GOOD, "nesting deeper than 40"),                                # a list holding itself
    ("a: &a [1,1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\n" + GOOD,
     "more than 100,000 values"),                                                    # an alias bomb
    ("1: 2\n" + GOOD, "top-level keys are names"),
    ("created: 2024-13-45\n" + GOOD, "an impossible date such as 2024-13-45"),          # ValueError before
    ("seed: !!int x\n" + GOOD.replace("seed", "x"), "cannot be read as the type it is written as"),
    ("created: !!timestamp 2001-12-14t21:59:43.10-99:000\n" + GOOD, "cannot be read as the type"),  # AttributeError
    ("- 1\n- 2\n", "a recipe is a mapping .* got list"),
    ("", "got nothing"),
    (GOOD.replace("method: linear", "method: {name: linear, weight: {a: {b: 1}}}"), "method.weight"),
    (GOOD + "eval: {data: [5]}\n", "eval.data"),
    (GOOD + "eval: {data: {a: 1}}\n", "eval.data"),
    (GOOD + "eval: {data: [a.csv], shots: [1]}\n", "eval"),
    (GOOD + "finetune: {data: [{path: [1], licence: mit}]}\n", "finetune.data"),
    (GOOD + "tune: {params: {weight: {low: 0, high: .inf}}, data: [x.csv], trials: 2}\n", "tune.params"),
])
def test_other_structural_junk_in_recipes_is_one_recipe_error(tmp_path, text, why):
    with pytest.raises(RecipeError, match=why):
        read_recipe(_recipe_file(tmp_path, text))


def test_a_recipe_over_1_mb_is_refused_unread(tmp_path):
    f = _recipe_file(tmp_path, GOOD + "#" * (1024 * 1024))
    with pytest.raises(RecipeError, match="a recipe is at most 1,048,576"):
        read_recipe(f)


SECRET = "root:x:0:0:supersecret-first-line:/root:/bin/bash"


@pytest.mark.parametrize("text", [
    SECRET + "\ndaemon:x:1:1::/:/bin/sh\n",                 # a plain scalar: "got str"
    "key: *supersecret_alias\n",                            # undefined alias: the parser quotes its name
    "!supersecret_tag x\n",                                 # unknown tag: the parser quotes it
    "a: b: supersecret_value\n",                            # mapping values not allowed here
    "supersecret: [unclosed\n",
    "\tsupersecret\n",
    b"supersecret\xff\n",
])
def test_errors_about_a_file_that_is_no_recipe_quote_none_of_it(tmp_path, text):
    with pytest.raises(RecipeError) as err:
        read_recipe(_recipe_file(tmp_path, text, name="passwd"))
    msg = str(err.value)
    assert "supersecret" not in msg and "root:x" not in msg, msg
    assert "passwd" in msg


def test_a_good_recipe_and_a_good_mergekit_config_still_read(tmp_path):
    assert read_recipe(_recipe_file(tmp_path, GOOD)).recipe.method.name == "linear"
    mk = "merge_method: ties\nbase_model: base\nmodels: [{model: e1, parameters: {weight: 1, density: 0.5}}]\n" \
         "parameters: {normalize: true, int8_mask: true}\ndtype: bfloat16\n"
    r = read_recipe(_recipe_file(tmp_path, mk)).recipe
    assert r.experts[0].params == {"weight": 1, "density": 0.5} and r.output.dtype == "bfloat16"


# ------------------------------------------------------------------------------ competition CSVs

import time  # noqa: E402

from mergelab.evaluate import data as eval_data  # noqa: E402
from mergelab.evaluate.data import parse_choices, read_competition_csv  # noqa: E402

CSV_HEADER = "id,input,target,answer_choices,eval_type\n"


def _csv(tmp_path, body: str | bytes, header: str = CSV_HEADER, name: str = "d.csv") -> Path:
    f = tmp_path / name
    f.write_bytes(header.encode() + (body.encode() if isinstance(body, str) else body))
    return f


def test_a_csv_path_that_names_another_file_does_not_echo_its_first_line(tmp_path):
    f = _csv(tmp_path, "daemon:x:1:1::/:/bin/sh\n", header=SECRET + "\n", name="passwd")
    with pytest.raises(DataError, match="missing column") as err:
        read_competition_csv(f)
    assert "supersecret" not in str(err.value) and "root:x" not in str(err.value)
    assert "is not a header of column names" in str(err.value)
    # a real CSV header with a wrong column is still shown, to help
    with pytest.raises(DataError, match="the header is id,question,eval_type"):
        read_competition_csv(_csv(tmp_path, "1,q,generation\n", header="id,question,eval_type\n"))


@pytest.mark.parametrize("body, why", [
    ('1,q,0,"[\'a\', \'b\'",multiple_choice\n', "not a list literal"),
    ("1,q,0,\"" + "[" * 5000 + "\",multiple_choice\n", "not a list literal"),
    ("1,q,0,\"['a', " + "9" * 5000 + "]\",multiple_choice\n", "not a list literal"),
    ('1,q,0,"{\'a\': 1}",multiple_choice\n', "must be a list"),
    ('1,q,0,"[\'\\N{no such name}\']",multiple_choice\n', "not a list literal"),
    ("1,q,0,\"__import__('os').system('true')\",multiple_choice\n", "not a list literal"),
    ('1,q,0,"[\'a\']",multiple_choice,extra\n', "has 6 fields"),
    ('1,q,"0,"[a]",multiple_choice\n', "fields"),
    ("1,q," + "9" * 5000 + ",\"['a']\",multiple_choice\n", "must be the index"),
    ('"1\x00",q,,,generation\n', None),          # a NUL byte inside a field: read as text
])
def test_malformed_rows_and_bad_choice_literals_are_one_data_error(tmp_path, body, why):
    f = _csv(tmp_path, body)
    if why is None:
        assert len(read_competition_csv(f)) == 1
        return
    with pytest.raises(DataError, match=why) as err:
        read_competition_csv(f)
    assert "d.csv" in str(err.value) and len(str(err.value)) < 600


def test_non_utf8_csv_is_one_data_error(tmp_path):
    with pytest.raises(DataError, match=r"not UTF-8 text \(invalid continuation byte at byte 46\)"):
        read_competition_csv(_csv(tmp_path, b"1,caf\xe9,,,generation\n"))


def test_huge_fields_are_refused_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(eval_data, "MAX_FIELD_CHARS", 1000)
    f = _csv(tmp_path, '1,"' + "x" * 5000 + '",,,generation\n')   # e.g. an unclosed quote
    with pytest.raises(DataError, match="line 2: malformed CSV .*field larger than field limit"):
        read_competition_csv(f)
    import csv
    assert csv.field_size_limit() != 1000   # the process-wide limit is restored


@pytest.mark.parametrize("text, why", [
    ("['a', " * 160_000, "not a list literal of strings"),
    ("[" + "'a'," * 240_000 + "]", "240,000 items; at most 10,000"),
    ("[" + '"a",' * 20_000 + '"b"]', "20,001 items"),
    ("x" * 1_000_001, "1,000,001 characters long"),
    ("(" + "'a'," * 5_000 + ")", "not a list literal of strings"),   # a long tuple: not given to ast
])
def test_answer_choices_are_parsed_in_bounded_time(text, why):
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=why):
        parse_choices(text)
    assert time.perf_counter() - t0 < 5   # was: ast.literal_eval on megabytes of text


def test_python_and_json_choice_literals_still_parse():
    assert parse_choices("['it\\'s', \"x\", u'y', r'\\d', '']") == ["it's", "x", "y", "\\d", ""]
    assert parse_choices('  ["a", "b"]  ') == ["a", "b"]
    assert parse_choices("('a', 'b')") == ["a", "b"]


# ------------------------------------------------------------------------------------ manifests

from mergelab.run import pipeline  # noqa: E402
from mergelab.run.manifest import read_manifest  # noqa: E402


def _good_manifest(tmp_path) -> dict:
    for d in ("base", "e1"):
        (tmp_path / d).mkdir(exist_ok=True)
    files = {"model.safetensors": "0" * 64}
    return {"mergelab_manifest": 1,
            "recipe": {"base": {"path": str(tmp_path / "base")}, "experts": [{"path": str(tmp_path / "e1")}],
                       "method": {"name": "task_arithmetic"}, "seed": 0},
            "models": [{"role": "base", "files": files}, {"role": "expert 1", "files": files}],
            "rules": "not checked (--no-rules)", "stages": {}, "outputs": {"model/model.safetensors": "1" * 64}}


def _write_manifest(tmp_path, obj=None, raw: bytes | None = None) -> Path:
    f = tmp_path / "run" / "manifest.json"
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(raw if raw is not None else json.dumps(obj).encode())
    return f


@pytest.fixture
def no_rerun(monkeypatch):
    """reproduce must refuse before it reruns anything: a rerun fails the test."""
    def run_recipe(*args, **kwargs):
        raise AssertionError("reproduce started the rerun before checking the manifest")
    monkeypatch.setattr(pipeline, "run_recipe", run_recipe)


@pytest.mark.parametrize("change, why", [
    (lambda m: 42, "it is a JSON int, not an object"),                                  # TypeError before
    (lambda m: {"recipe": 5}, "no 'recipe'/'outputs'"),
    (lambda m: {**m, "recipe": 5}, "'recipe' must be the recipe as a mapping, got 5"),  # TypeError in Path(5)
    (lambda m: {**m, "recipe": "/etc/passwd"}, "'recipe' must be the recipe as a mapping"),
    (lambda m: {**m, "models": [{"files": {}}, {"role": "expert 1", "files": {}}]},
     r"models\[0\] has no 'role'"),                                                     # KeyError after the rerun
    (lambda m: {**m, "models": [{"role": "base", "files": {}}, {"role": "base", "files": {}}]}, "appears twice"),
    (lambda m: {**m, "models": [{"role": "base", "files": []}]}, "'files' must map each input file"),
    (lambda m: {**m, "models": [{"role": "base", "files": {}}]},
     "models records the roles base, but its recipe has base, expert 1"),
    (lambda m: {**m, "outputs": [1]}, "'outputs' must map each output file to its sha256"),
    (lambda m: {**m, "stages": {"merge": 5}}, "stages.'merge' must be a mapping"),
    (lambda m: {**m, "finished": "no"}, "'finished' must be true or false"),
    (lambda m: {**m, "recipe": {**m["recipe"], "experts": 5}}, "the recorded recipe cannot run again: .*experts"),
])
def test_bad_manifests_are_refused_before_the_rerun(tmp_path, no_rerun, change, why):
    f = _write_manifest(tmp_path, change(_good_manifest(tmp_path)))
    with pytest.raises(MergelabError, match=why) as err:
        pipeline.reproduce(f, tmp_path / "again")
    assert str(f) in str(err.value)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("raw, why", [(b"[" * 100_000, "nested too deeply"), (b'{"recipe": "\xff"}', "not UTF-8"),
                                      (b"{", "not valid JSON")])
def test_unreadable_manifests_are_one_reproducibility_error(tmp_path, raw, why):
    with pytest.raises(ReproducibilityError, match=why):
        read_manifest(_write_manifest(tmp_path, raw=raw))


def test_a_manifest_whose_recipe_points_at_another_file_does_not_echo_it(tmp_path, no_rerun):
    passwd = tmp_path / "passwd"
    passwd.write_text(SECRET + "\ndaemon:x:1:1::/:/bin/sh\n")
    m = _good_manifest(tmp_path)
    m["recipe"]["eval"] = {"data": [str(passwd)]}       # evaluated after an hour of merging, before
    f = _write_manifest(tmp_path, m)
    with pytest.raises(DataError) as err:
        pipeline.reproduce(f, tmp_path / "again")
    msg = str(err.value)
    assert "supersecret" not in msg and "root:x" not in msg and "missing column" in msg and str(f) in msg
    m["recipe"] = str(passwd)                           # the recipe itself: never read as a file
    with pytest.raises(ReproducibilityError) as err:
        pipeline.reproduce(_write_manifest(tmp_path, m), tmp_path / "again")
    assert "supersecret" not in str(err.value)
    if Path("/etc/passwd").is_file():
        m["recipe"] = {**_good_manifest(tmp_path)["recipe"], "eval": {"data": ["/etc/passwd"]}}
        with pytest.raises(DataError) as err:
            pipeline.reproduce(_write_manifest(tmp_path, m), tmp_path / "again")
        assert Path("/etc/passwd").read_text().splitlines()[0] not in str(err.value)
