"""Row-block merging: a tensor larger than the block budget is merged in row blocks (statistics in
passes over the blocks first), and the merged bytes equal the whole-tensor merge for every method
that has a block form; the others are listed, so that a new method must choose."""
from __future__ import annotations

import csv
import hashlib

import pytest
import torch

from mergelab.io.adapter import load_adapter
from mergelab.io.checkpoint import CheckpointReader, ShardedWriter
from mergelab.merge import merge
from mergelab.methods import REGISTRY, get_method
from mergelab.recipe import load_recipe
from mergelab.testing import make_base, make_expert, make_lora

#: methods merged whole whatever the tensor's size, and why (the engine's memory bound for them is
#: the whole tensor; DESIGN/plan say so)
WHOLE_ONLY = {
    # the aligned coefficients Vhᵢ = S⁻¹Uᵀτᵢ (T of rank × in, rank up to min(out, T·in)) are as large
    # as the task matrices and the inner merge (TIES: a magnitude cut) reads them whole; the Gram of
    # [τ₁ … τ_T] would be (T·in)², growing with the experts
    "knots": "an SVD of the stacked task matrices, then the inner merge of the aligned coefficients",
}

#: wudi, iso_c, tsv and iso_cts split a matrix only where in ≤ out (their in × in matrices would
#: outgrow a narrowing layer, which they merge whole); regmean's rows are solved in blocks whatever
#: its shape.
#: passthrough (elementwise) runs only in layer stacks (merge/slices.py), which copy large tensors in
#: row blocks too: tests/test_slices.py::test_large_tensors_are_copied_in_row_blocks_with_the_same_bytes

#: parameters that make each method run on the fixture (the rest take their defaults)
PARAMS = {"ties": {"density": 0.3}, "dare_ties": {"density": 0.4}, "dare_linear": {"density": 0.4},
          "breadcrumbs": {"density": 0.5, "gamma": 0.05}, "breadcrumbs_ties": {"density": 0.5, "gamma": 0.05},
          "della": {"density": 0.5, "epsilon": 0.1}, "della_linear": {"density": 0.5, "epsilon": 0.1},
          "slerp": {"t": 0.3}, "nearswap": {"t": 0.001}, "nuslerp": {}, "sce": {"select_topk": 0.5},
          "wudi": {"steps": 20, "lr": 1e-3}}

#: methods that read data rows per expert (their input statistics), with the parameters they take
DATA = {"regmean": {"rows": 4, "alpha": 0.8}, "regmean_pp": {"rows": 4}}

BLOCK = 1 << 20    # float32 bytes of a block's inputs: the 512-wide tensors split into blocks of 256 rows


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A one-layer bf16 Llama of width 512 (tensors of 128K–512K entries), 3 experts, 2 LoRA adapters."""
    root = tmp_path_factory.mktemp("wide")
    base = make_base("llama", root / "base", hidden=512, layers=1, dtype=torch.bfloat16, shard_size="2MB")
    experts = [make_expert(base, root / f"e{i}", seed=i + 1) for i in range(3)]
    loras = [make_lora(base, root / f"l{i}", seed=i, target_modules=["q_proj", "up_proj"]) for i in range(2)]
    return base, experts, loras


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """A few data rows per expert, for the methods that measure input statistics."""
    root = tmp_path_factory.mktemp("rows")
    paths = []
    for i in range(3):
        path = root / f"d{i}.csv"
        with path.open("w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["id", "input", "target", "answer_choices", "eval_type"])
            for j in range(4):
                w.writerow([f"r{j}", " ".join(["the quick brown fox", "jumps over", "a lazy dog"][: 1 + (i + j) % 3]),
                            "", "", "generation"])
        paths.append(path)
    return paths


def _experts(paths, method: str, rows) -> list[dict]:
    return [{"path": str(e), **({"data": str(d)} if method in DATA else {})} for e, d in zip(paths, rows)]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.suffix == ".safetensors"}


def _merge_both(tmp_path, monkeypatch, recipe: dict, name: str):
    """Merge twice: in blocks and whole; return both digests and how many row blocks were read."""
    reads = []
    original = CheckpointReader.read_rows_into

    def spy(self, tensor, r0, r1, out):
        reads.append((tensor, r0, r1))
        return original(self, tensor, r0, r1, out)

    monkeypatch.setattr(CheckpointReader, "read_rows_into", spy)
    r = load_recipe({**recipe, "seed": 3})
    merge(r, tmp_path / f"{name}-blocks", progress=False, workers=2, block_bytes=BLOCK)
    n_reads = len(reads)
    merge(r, tmp_path / f"{name}-whole", progress=False, workers=2, block_bytes=1 << 40)
    assert len(reads) == n_reads, "the whole-tensor merge read row blocks"
    return _digest(tmp_path / f"{name}-blocks"), _digest(tmp_path / f"{name}-whole"), n_reads


def test_every_method_has_a_block_form_or_says_why_not():
    get_method("linear")   # loads the built-in methods
    blocked = {n for n, s in REGISTRY.items() if s.blocks}
    assert set(REGISTRY) - blocked == set(WHOLE_ONLY)


@pytest.mark.parametrize("method", sorted(n for n in PARAMS if n not in WHOLE_ONLY)
                         + ["linear", "task_arithmetic", "cat", "model_stock", "geometric_median",
                            "karcher", "multislerp", "iso_c", "tsv", "iso_cts"] + sorted(DATA))
def test_blocks_give_the_bytes_of_the_whole_tensor(wide, rows, tmp_path, monkeypatch, method):
    base, experts, _ = wide
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    spec = get_method(method)
    n = spec.n_experts[1] or 3
    recipe = {"base": {"path": str(base)}, "experts": _experts(experts[:n], method, rows),
              "method": {"name": method, **PARAMS.get(method, {}), **DATA.get(method, {})}}
    blocks, whole, reads = _merge_both(tmp_path, monkeypatch, recipe, method)
    assert reads >= 2 * 3, "nothing was merged in blocks"
    assert blocks == whole


def test_filter_wise_and_row_wise_forms_block_too(wide, tmp_path, monkeypatch):
    base, experts, _ = wide
    for i, method in enumerate(({"name": "model_stock", "filter_wise": True},
                                {"name": "nuslerp", "nuslerp_flatten": False})):
        n = 2
        recipe = {"base": {"path": str(base)}, "experts": [{"path": str(e)} for e in experts[:n]], "method": method}
        blocks, whole, reads = _merge_both(tmp_path, monkeypatch, recipe, f"m{i}")
        assert reads > 0 and blocks == whole


def test_column_wise_nuslerp_is_merged_whole(wide, tmp_path, monkeypatch):
    base, experts, _ = wide
    recipe = {"base": {"path": str(base)}, "experts": [{"path": str(e)} for e in experts[:2]],
              "method": {"name": "nuslerp", "nuslerp_flatten": False, "nuslerp_row_wise": True}}
    blocks, whole, reads = _merge_both(tmp_path, monkeypatch, recipe, "cols")
    assert reads == 0 and blocks == whole


@pytest.mark.parametrize("method", [{"name": "ties", "density": 0.3}, {"name": "dare_ties", "density": 0.5},
                                    {"name": "task_arithmetic"}, {"name": "multislerp"}, {"name": "iso_c"},
                                    {"name": "tsv"}, {"name": "iso_cts"},
                                    {"name": "regmean", **DATA["regmean"]}, {"name": "regmean_pp", **DATA["regmean_pp"]}])
def test_lora_experts_merge_in_blocks_of_delta_rows(wide, rows, tmp_path, monkeypatch, method):
    base, _, loras = wide
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))
    recipe = {"base": {"path": str(base)}, "experts": _experts(loras, method["name"], rows), "method": method}
    blocks, whole, reads = _merge_both(tmp_path, monkeypatch, recipe, method["name"])
    assert reads > 0 and blocks == whole


# ------------------------------------------------------------------------------ the pieces


def test_row_reads_and_lora_delta_rows_are_the_rows_of_the_whole(wide):
    base, _, loras = wide
    r = CheckpointReader(base)
    name = "model.layers.0.mlp.up_proj.weight"
    whole = r.get(name)
    assert torch.equal(r.get_rows(name, 100, 357), whole[100:357])
    buf = torch.empty(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match="too small"):
        r.read_rows_into(name, 0, 2, buf)
    with pytest.raises(ValueError, match="outside"):
        r.get_rows(name, 1000, 1025)
    ad = load_adapter(loras[0])
    for path in ad.modules:
        d = ad.delta(path)
        assert torch.equal(ad.delta_rows(path, 3, 200), d[3:200])


def test_writer_takes_row_blocks_in_any_order_and_refuses_a_second_write(tmp_path):
    t = torch.arange(60, dtype=torch.float32).view(12, 5)
    w = ShardedWriter(tmp_path / "o", layout=[("a", (12, 5), torch.float32), ("b", (3,), torch.float32)])
    w.add_rows("a", 8, t[8:])
    w.add_rows("a", 0, t[:8])
    with pytest.raises(ValueError, match="written twice"):
        w.add_rows("a", 0, t[:1])
    with pytest.raises(ValueError, match="do not fit"):
        w.add_rows("b", 2, torch.zeros(2))
    w.add("b", torch.ones(3))
    w.close()
    r = CheckpointReader(tmp_path / "o")
    assert torch.equal(r.get("a"), t) and torch.equal(r.get("b"), torch.ones(3))


def test_a_writer_closed_with_rows_missing_says_which_tensor(tmp_path):
    w = ShardedWriter(tmp_path / "o", layout=[("a", (4, 2), torch.float32)])
    w.add_rows("a", 0, torch.zeros(2, 2))
    with pytest.raises(RuntimeError, match="'a'"):
        w.close()


def test_cli_block_option_gives_the_same_bytes(wide, tmp_path, monkeypatch):
    import yaml

    from mergelab.cli import main

    base, experts, _ = wide
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"base": {"path": str(base)}, "experts": [{"path": str(e)} for e in experts],
                                      "method": {"name": "ties", "density": 0.3}}))
    reads = []
    original = CheckpointReader.read_rows_into
    monkeypatch.setattr(CheckpointReader, "read_rows_into",
                        lambda self, *a: reads.append(a[0]) or original(self, *a))
    assert main(["merge", str(recipe), "--out", str(tmp_path / "a"), "-q", "--block-mb", "1"]) == 0
    assert reads, "--block-mb 1 merged nothing in blocks"
    assert main(["merge", str(recipe), "--out", str(tmp_path / "b"), "-q"]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
