"""``mergelab merge``: the happy path with overrides, a mergekit config, and user errors (exit 2)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import yaml

from mergelab.cli import main
from mergelab.testing import load_model


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_command_with_relative_paths_and_overrides(zoo, tmp_path, capsys):
    fz = zoo["mistral"]
    # paths relative to the recipe file's folder (not to the current folder)
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731
    recipe = _write(tmp_path / "recipe.yaml", {
        "base": {"path": rel(fz.base)},
        "experts": [{"path": rel(fz.experts[0]), "weight": 1.0, "density": 0.5},
                    {"path": rel(fz.experts[1]), "weight": 0.7}],
        "method": {"name": "ties", "density": 0.2, "lambda": 1.0},
        "output": {"dtype": "float32"},
        "seed": 0,
    })
    out = tmp_path / "merged"
    code = main(["merge", str(recipe), "--out", str(out), "--dtype", "bfloat16", "--shard-size", "50KB",
                 "--device", "cpu"])  # with the progress bar
    assert code == 0
    assert "merged" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # small shards
    load_model(out)


def test_merge_command_accepts_a_mergekit_config(zoo, tmp_path):
    fz = zoo["llama"]
    cfg = _write(tmp_path / "mergekit.yml", {
        "merge_method": "slerp",
        "base_model": str(fz.base),
        "slices": [{"sources": [{"model": str(fz.base), "layer_range": [0, 2]},
                                {"model": str(fz.experts[0]), "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "bfloat16",
    })
    assert main(["merge", str(cfg), "--out", str(tmp_path / "m"), "-q"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == "bfloat16"


def test_user_errors_exit_with_status_2_and_one_message(zoo, tmp_path):
    fz = zoo["llama"]
    recipe = _write(tmp_path / "r.yaml", {"base": {"path": str(fz.base)},
                                          "experts": [{"path": str(fz.experts[0]), "density": 2}],
                                          "method": {"name": "ties"}})
    r = subprocess.run([sys.executable, "-m", "mergelab", "merge", str(recipe), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "experts[0].density" in r.stderr and "between 0 and 1" in r.stderr and "got 2" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()

    out = tmp_path / "exists"
    out.mkdir()
    (out / "x").write_text("x")
    good = _write(tmp_path / "good.yaml", {"base": {"path": str(fz.base)}, "experts": [{"path": str(fz.experts[0])}],
                                            "method": "linear"})
    assert main(["merge", str(good), "--out", str(out), "-q"]) == 2
    assert (out / "x").read_text() == "x"
    assert main(["merge", str(good), "--out", str(out), "-q", "--dtype", "int4"]) == 2
    assert main(["merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o2")]) == 2
    assert main(["merge", str(good), "--out", str(out), "-q", "--force"]) == 0
