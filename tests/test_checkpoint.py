"""Checkpoint reading (safetensors only), the streaming sharded writer, atomic output folders."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergelab.io.checkpoint import CheckpointReader, ShardedWriter, TensorSource, copy_model_files, parse_size
from mergelab.util import atomic_output_dir
from mergelab.errors import CheckpointError, OutputExistsError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(10, 3, generator=g),
        "b.bias": torch.randn(5, generator=g).bfloat16(),  # 10 bytes: forces the alignment rule
        "c.ids": torch.arange(7),
        "d.weight": torch.randn(100, 10, generator=g),
        "e.scale": torch.tensor(3.0),
        "f.flag": torch.tensor([True, False, True]),
        "g.empty": torch.zeros(0, 4),
    }


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


# --------------------------------------------------------------------------------------- reader


def test_reader_reads_the_sharded_fixture_lazily_and_exactly(zoo):
    base = zoo["llama"].base
    reader = CheckpointReader(base)
    assert isinstance(reader, TensorSource)
    assert (base / "model.safetensors.index.json").is_file()
    ref = {}
    for f in base.glob("*.safetensors"):
        ref.update(load_file(f))
    assert sorted(reader.keys()) == sorted(ref)
    for name, t in ref.items():
        assert reader.shape(name) == tuple(t.shape) and reader.dtype(name) == t.dtype
        assert torch.equal(reader.get(name), t)
    assert reader.config["model_type"] == "llama" and reader.path == base
    buf = torch.empty(10**6, dtype=torch.uint8)  # refill one buffer for every tensor
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(reader.read_into(name, buf), ref[name])
    with pytest.raises(ValueError, match="too small"):
        reader.read_into(name, torch.empty(8, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        reader.get("nope")


def test_reader_single_file_and_folder_forms(tmp_path):
    ts = _tensors()
    save_file(ts, str(tmp_path / "one.safetensors"))
    (tmp_path / "folder").mkdir()
    shutil.copy(tmp_path / "one.safetensors", tmp_path / "folder" / "model.safetensors")
    (tmp_path / "folder" / "config.json").write_text('{"model_type": "x"}')
    for src in (tmp_path / "one.safetensors", tmp_path / "folder"):
        r = CheckpointReader(src)
        assert sorted(r.keys()) == sorted(ts)
        assert all(torch.equal(r.get(k), v) for k, v in ts.items())
    assert CheckpointReader(tmp_path / "folder").config == {"model_type": "x"}
    assert CheckpointReader(tmp_path / "one.safetensors").config is None


def test_pickle_only_model_is_refused_and_never_unpickled(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    # Not even a valid pickle: any attempt to load it would fail differently.
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not-a-pickle")
    with pytest.raises(CheckpointError) as err:
        CheckpointReader(folder)
    text = str(err.value)
    assert "pickle" in text and "pytorch_model.bin" in text and "never" in text
    assert "save_pretrained" in text and "safe_serialization=True" in text  # says how to convert
    with pytest.raises(CheckpointError, match="pickle"):
        CheckpointReader(folder / "pytorch_model.bin")


def test_broken_checkpoints_give_clear_errors(tmp_path, zoo):
    with pytest.raises(CheckpointError, match="no such file"):
        CheckpointReader(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        CheckpointReader(tmp_path / "empty")
    # a shard listed in the index is missing
    broken = tmp_path / "broken"
    shutil.copytree(zoo["llama"].base, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        CheckpointReader(broken)
    # a truncated file
    bad = tmp_path / "bad.safetensors"
    save_file(_tensors(), str(bad))
    bad.write_bytes(bad.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        CheckpointReader(bad)
    # an adapter folder is not a base model
    with pytest.raises(CheckpointError, match="adapter"):
        CheckpointReader(zoo["llama"].loras[0])


# --------------------------------------------------------------------------------------- writer


def test_writer_shards_index_and_reads_back(tmp_path):
    ts = _tensors()
    w = ShardedWriter(tmp_path / "out", 1000)
    for k, v in ts.items():
        w.add(k, v)
    index = w.close()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                     "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    on_disk = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert on_disk == index
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())
    assert set(index["weight_map"]) == set(ts)
    loaded = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata() == {"format": "pt"}
            loaded.update({k: fh.get_tensor(k) for k in fh.keys()})
    assert all(torch.equal(loaded[k], v) for k, v in ts.items())
    reader = CheckpointReader(tmp_path / "out")
    assert all(torch.equal(reader.get(k), v) for k, v in ts.items())


def test_planned_writer_gives_the_same_bytes_in_any_order(tmp_path):
    ts = _tensors()
    layout = [(k, v.shape, v.dtype) for k, v in ts.items()]
    w = ShardedWriter(tmp_path / "unplanned", 1000)
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    w = ShardedWriter(tmp_path / "planned", 1000, layout=layout)
    for k in reversed(list(ts)):  # arrival order does not matter with a layout
        w.add(k, ts[k])
    w.close()
    assert _digest(tmp_path / "unplanned") == _digest(tmp_path / "planned")
    w = ShardedWriter(tmp_path / "again", 1000, layout=layout)
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    assert _digest(tmp_path / "again") == _digest(tmp_path / "planned")  # deterministic


def test_writer_one_shard_is_model_safetensors(tmp_path):
    w = ShardedWriter(tmp_path, "5GB")
    w.add("x", torch.ones(3))
    index = w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert index["weight_map"] == {"x": "model.safetensors"}
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], torch.ones(3))


def test_planned_writer_checks_its_layout(tmp_path):
    w = ShardedWriter(tmp_path, 1000, layout=[("x", (2,), torch.float32), ("y", (3,), torch.float32)])
    with pytest.raises(ValueError, match="planned"):
        w.add("x", torch.ones(3))
    with pytest.raises(ValueError, match="not in the planned layout"):
        w.add("z", torch.ones(2))
    w.add("x", torch.ones(2))
    with pytest.raises(RuntimeError, match="1 planned tensors were not written|before 1 planned"):
        w.close()


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3
    assert parse_size("60KB") == 60_000 and parse_size("1.5MB") == 1_500_000 and parse_size(123) == 123
    for bad in ("5XB", "-1GB", "0", 0, True):
        with pytest.raises(ValueError):
            parse_size(bad)


# ------------------------------------------------------------------------------- output folders


def test_atomic_output_dir_renames_on_success(tmp_path):
    out = tmp_path / "merged"
    with atomic_output_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()
        (tmp / "f.txt").write_text("ok")
    assert (out / "f.txt").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(KeyError):
        with atomic_output_dir(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise KeyError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_dir_refuses_existing_unless_force(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="--force"):
        with atomic_output_dir(out):
            pass
    assert (out / "old.txt").read_text() == "keep me"
    with pytest.raises(RuntimeError):  # a failed forced run keeps the old output
        with atomic_output_dir(out, force=True):
            raise RuntimeError
    assert (out / "old.txt").read_text() == "keep me"
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:  # an empty folder holds nothing to lose
        (tmp / "a").write_text("a")
    assert (empty / "a").is_file()


def test_copy_model_files_copies_everything_but_weights(zoo):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        copied = copy_model_files(zoo["llama"].base, d)
        names = sorted(p.name for p in Path(d).iterdir())
    assert names == sorted(copied)
    for want in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert want in names
    assert not any(n.endswith(".safetensors") or n.endswith(".index.json") for n in names)


def test_symlinked_shards_as_in_the_hub_cache_are_read_but_escaping_names_are_refused(zoo, tmp_path):
    """The Hub cache keeps shards as links into a blob store; an index may not name ../ paths."""
    src = zoo["llama"].base
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = blobs / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(blob)
    reader = CheckpointReader(snap)
    plain = CheckpointReader(src)
    name = sorted(plain.keys())[0]
    assert reader.keys() == plain.keys() and reader.get(name).equal(plain.get(name))

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the model folder"):
        CheckpointReader(bad)
