"""Faults and dangerous inputs: an output that would destroy an input, OS errors while writing,
Ctrl-C and SIGKILL, non-finite values, experts of another model. Each ends in one message (exit 2,
130 for Ctrl-C) and leaves the inputs and any earlier output as they were."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from mergelab.cli import main


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (or of the file itself)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(f.relative_to(path.parent)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".mergelab-tmp-" in p.name or ".mergelab-old-" in p.name)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _recipe(tmp_path: Path, base: Path, experts: list[Path], name="r.yaml", **extra) -> Path:
    return _write(tmp_path / name, {"base": {"path": str(base)},
                                    "experts": [{"path": str(e)} for e in experts],
                                    "method": {"name": "task_arithmetic", "lambda": 0.5}, **extra})


def _csv(path: Path) -> Path:
    from mergelab.testing import write_mixed_csv

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_mixed_csv(path, 4, choice_input="Pick {i}", choices=["yes", "no"],
                           gen_input="Say {i}", gen_target="{i}")


def _error(capsys) -> str:
    err = capsys.readouterr().err
    return " ".join(err.split())   # whatever the console width


# ------------------------------------------------------------------ 1. one output-path guard


def test_eval_out_is_the_model_refused_even_with_force(zoo, tmp_path, capsys):
    model = _copy(zoo["llama"].base, tmp_path / "M")
    data = _csv(tmp_path / "x.csv")
    before = _digest(model)
    assert main(["eval", str(model), "--data", str(data), "--out", str(model), "--force",
                 "--device", "cpu"]) == 2
    err = _error(capsys)
    assert f"the output {model} is the input {model}" in err and "--force never overrides" in err
    assert _digest(model) == before


def test_eval_out_is_the_folder_of_the_data_refused(zoo, tmp_path, capsys):
    data = _csv(tmp_path / "D" / "x.csv")
    before = _digest(data.parent)
    assert main(["eval", str(zoo["llama"].base), "--data", str(data), "--out", str(data.parent), "--force",
                 "--device", "cpu"]) == 2
    assert f"holds the input {data}" in _error(capsys)
    assert _digest(data.parent) == before


def test_evaluate_api_refuses_an_out_inside_the_adapter(zoo, tmp_path):
    from mergelab.errors import OutputPathError
    from mergelab.evaluate import evaluate

    adapter = _copy(zoo["llama"].loras[0], tmp_path / "A")
    with pytest.raises(OutputPathError, match="lies inside the input folder"):
        evaluate(zoo["llama"].base, [_csv(tmp_path / "x.csv")], adapter / "eval", adapter=adapter, force=True)
    assert not (adapter / "eval").exists()


def test_merge_out_is_a_shard_of_the_base_refused(zoo, tmp_path, capsys):
    base = _copy(zoo["llama"].base, tmp_path / "BASE")
    recipe = _recipe(tmp_path, base, zoo["llama"].experts[:1])
    shard = base / "model-00001-of-00009.safetensors"
    before = _digest(base)
    assert main(["merge", str(recipe), "--out", str(shard), "--force", "-q"]) == 2
    assert f"the output {shard} lies inside the input folder {base}" in _error(capsys)
    assert shard.is_file() and _digest(base) == before


def test_merge_out_is_the_recipe_refused(zoo, tmp_path, capsys):
    recipe = _recipe(tmp_path, zoo["llama"].base, zoo["llama"].experts[:1])
    text = recipe.read_text()
    assert main(["merge", str(recipe), "--out", str(recipe), "--force", "-q"]) == 2
    assert f"the output {recipe} is the input {recipe}" in _error(capsys)
    assert recipe.read_text() == text


@pytest.mark.parametrize("where", ["inside_base", "expert", "holds_data"])
def test_merge_out_overlapping_an_input_refused_on_both_paths(zoo, tmp_path, where):
    from mergelab.errors import OutputPathError
    from mergelab.merge import merge

    fz = zoo["llama"]
    base = _copy(fz.base, tmp_path / "BASE")
    lora = _copy(fz.loras[0], tmp_path / "L0")
    before = {**_digest(base), **_digest(lora)}
    if where == "holds_data":   # a data-aware method reads CSV files: their folder is an input too
        data = _csv(tmp_path / "D" / "x.csv")
        recipe = {"base": {"path": str(base)}, "experts": [{"path": str(lora), "data": [str(data)]}],
                  "method": {"name": "regmean"}, "output": {"format": "lora"}}
        out = data.parent
    else:
        recipe = {"base": {"path": str(base)}, "experts": [{"path": str(lora)}],
                  "method": {"name": "task_arithmetic"}}
        out = base / "merged" if where == "inside_base" else lora
    for fmt in ("full", "lora"):
        recipe["output"] = {"format": fmt}
        with pytest.raises(OutputPathError):
            merge(recipe, out, force=True, progress=False)
    assert {**_digest(base), **_digest(lora)} == before
    assert not (base / "merged").exists()


def test_run_out_holding_the_recipe_or_the_eval_data_refused(zoo, tmp_path, capsys):
    data = _csv(tmp_path / "data" / "x.csv")
    recipe = _recipe(tmp_path, zoo["llama"].base, zoo["llama"].experts[:1], eval={"data": [str(data)]})
    before = {**_digest(recipe), **_digest(data)}
    assert main(["run", str(recipe), "--out", str(tmp_path), "--no-rules", "-q"]) == 2
    assert f"holds the input {recipe}" in _error(capsys)
    assert main(["run", str(recipe), "--out", str(data.parent), "--no-rules", "-q"]) == 2
    assert "holds the input" in _error(capsys)
    assert {**_digest(recipe), **_digest(data)} == before and not (tmp_path / "manifest.json").exists()


def test_tune_out_is_the_recipe_refused(zoo, tmp_path, capsys):
    data = _csv(tmp_path / "val.csv")
    recipe = _recipe(tmp_path, zoo["llama"].base, zoo["llama"].loras[:2],
                     tune={"params": {"lambda": {"low": 0.0, "high": 1.0}}, "data": [str(data)], "trials": 2})
    text = recipe.read_text()
    assert main(["tune", str(recipe), "--out", str(recipe), "-q"]) == 2
    assert f"the output {recipe} is the input" in _error(capsys)
    assert main(["tune", str(recipe), "--out", str(tmp_path), "-q"]) == 2
    assert "holds the input" in _error(capsys)
    assert recipe.read_text() == text and not (tmp_path / "split").exists()


# ------------------------------------------------------------------------ 2. OS errors


def _full_and_lora(zoo, tmp_path):
    fz = zoo["llama"]
    full = _recipe(tmp_path, fz.base, fz.experts[:2], name="full.yaml")
    lora = _recipe(tmp_path, fz.base, fz.loras[:2], name="lora.yaml", output={"format": "lora"})
    return full, lora


@pytest.mark.parametrize("fmt", ["full", "lora"])
def test_disk_full_while_merging_is_one_message_and_leaves_nothing(zoo, tmp_path, capsys, monkeypatch, fmt):
    recipes = dict(zip(("full", "lora"), _full_and_lora(zoo, tmp_path)))
    out = tmp_path / "out"
    assert main(["merge", str(recipes[fmt]), "--out", str(out), "-q"]) == 0
    before = _digest(out)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", full_disk)           # the shard writer of a full merge
    monkeypatch.setattr("safetensors.torch.save_file", full_disk)  # the adapter writer
    assert main(["merge", str(recipes[fmt]), "--out", str(out), "--force", "-q"]) == 2
    err = _error(capsys)
    assert f"could not write {out}: no space left on the device" in err
    assert "free space on that disk" in err and "Traceback" not in err
    assert _digest(out) == before and _temps(tmp_path) == []   # the old output as it was, no temp folder


def test_file_size_limit_is_a_real_kernel_error_mapped_to_one_message(zoo, tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse the write (EFBIG): a real OS error, not a mock."""
    recipe, _ = _full_and_lora(zoo, tmp_path)
    out = tmp_path / "out"
    script = tmp_path / "limited.py"
    script.write_text(textwrap.dedent(f"""
        import resource, signal, sys
        from mergelab.cli import main
        import mergelab.merge, mergelab.methods, torch   # imported before the limit
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # an error, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        sys.exit(main(["merge", {str(recipe)!r}, "--out", {str(out)!r}, "-q", "--device", "cpu"]))
    """))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "file size limit" in r.stderr and "ulimit -f" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and _temps(tmp_path) == []


def test_read_only_output_folder_is_one_message(zoo, tmp_path, capsys, monkeypatch):
    recipe, _ = _full_and_lora(zoo, tmp_path)
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:   # root writes through chmod: make the folder refuse like a read-only one
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):
            if self.parent == parent:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", refuse)
    else:
        parent.chmod(0o555)
    try:
        assert main(["merge", str(recipe), "--out", str(parent / "out"), "-q"]) == 2
    finally:
        parent.chmod(0o755)
    err = _error(capsys)
    assert f"could not write {parent / 'out'}: permission denied" in err and "you may write to" in err
    assert list(parent.iterdir()) == []


def test_eval_disk_full_is_one_message(zoo, tmp_path, capsys, monkeypatch):
    from mergelab.errors import OutputWriteError
    from mergelab.evaluate import evaluate
    from mergelab.evaluate.options import EvalOptions

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("mergelab.evaluate.runner.write_submission", full_disk)
    with pytest.raises(OutputWriteError, match="no space left"):
        evaluate(zoo["llama"].base, [_csv(tmp_path / "x.csv")], tmp_path / "out", EvalOptions(device="cpu"))
    assert not (tmp_path / "out").exists() and _temps(tmp_path) == []


# ------------------------------------------------------------------- 3. Ctrl-C and SIGKILL

_SLOW_MERGE = """
import signal, sys, time
from mergelab.cli import main

# Ctrl-C as a terminal delivers it, whatever this process inherited: a shell without job control
# starts background commands with SIGINT ignored (a suite run as `make test &` did so)
signal.signal(signal.SIGINT, signal.default_int_handler)
from mergelab.methods import register

@register("slow_copy", expert_params=("weight",))
def slow_copy(base, experts, p):   # 1.5 s per tensor: ~15 s in all, so that a test stalled for
    time.sleep(1.5)                  # seconds on a loaded machine still interrupts it mid-way
    return experts[0].clone()

sys.exit(main(sys.argv[1:]))
"""


def _start_slow_merge(zoo, tmp_path, out: Path) -> subprocess.Popen:
    fz = zoo["llama"]
    recipe = _write(tmp_path / "slow.yaml", {"base": {"path": str(fz.base)},
                                             "experts": [{"path": str(fz.experts[0])}],
                                             "method": {"name": "slow_copy"}})
    script = tmp_path / "slow_merge.py"
    script.write_text(_SLOW_MERGE)
    proc = subprocess.Popen([sys.executable, str(script), "merge", str(recipe), "--out", str(out), "-q",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _temps(out.parent):   # wait until it writes
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the merge did not start"
        time.sleep(0.05)
    time.sleep(0.3)
    return proc


def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing(zoo, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_merge(zoo, tmp_path, out)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert " ".join(err.split()) == f"interrupted; nothing was written to {out} (it was left as it was)"
    assert not out.exists() and _temps(tmp_path) == []


def test_sigkilled_merge_leaves_a_temp_with_its_pid_that_the_next_merge_removes(zoo, tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_merge(zoo, tmp_path, out)
    proc.kill()
    proc.communicate(timeout=60)
    left = _temps(tmp_path)
    assert len(left) == 1 and left[0].startswith(f".out.mergelab-tmp-{proc.pid}-")
    # a temp folder of a live process (another merge into the same place) is kept
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / f".out.mergelab-tmp-{live.pid}-0badc0de"
        busy.mkdir()
        recipe = _recipe(tmp_path, zoo["llama"].base, zoo["llama"].experts[:1])
        assert main(["merge", str(recipe), "--out", str(out), "-q"]) == 0
        assert _temps(tmp_path) == [busy.name]
    finally:
        live.kill()
        live.wait()
    assert main(["merge", str(recipe), "--out", str(out), "--force", "-q"]) == 0
    assert _temps(tmp_path) == []


def test_run_refolder_with_a_killed_merges_temp_is_resumed_not_refused(zoo, tmp_path):
    """A run killed during its first merge leaves only a temp folder: the rerun goes ahead."""
    run = tmp_path / "run"
    run.mkdir()
    (run / ".model.mergelab-tmp-999999999-0badc0de").mkdir()   # no such pid
    recipe = _recipe(tmp_path, zoo["llama"].base, zoo["llama"].experts[:1])
    assert main(["run", str(recipe), "--out", str(run), "--no-rules", "-q"]) == 0
    assert (run / "manifest.json").is_file() and _temps(run) == []


# ---------------------------------------------------------------------- 4. non-finite values


def _poison(folder: Path, value: float, *, key_part: str = "q_proj", index: int = 3) -> str:
    """Put ``value`` into one entry of the first tensor whose name holds ``key_part``; its name."""
    from safetensors.torch import load_file, save_file

    for f in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(f))
        name = next((n for n in sorted(tensors) if key_part in n), None)
        if name is not None:
            tensors[name].view(-1)[index] = value
            save_file(tensors, str(f), metadata={"format": "pt"})
            return name
    raise AssertionError(f"no tensor with {key_part!r} in {folder}")


def test_nan_in_a_full_expert_is_refused_naming_tensor_and_expert(zoo, tmp_path, capsys):
    fz = zoo["llama"]
    bad = _copy(fz.experts[1], tmp_path / "bad")
    name = _poison(bad, float("nan"))
    recipe = _recipe(tmp_path, fz.base, [fz.experts[0], bad])
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = _error(capsys)
    assert f"tensor {name!r} of expert 1 ({bad}) holds 1 NaN value(s)" in err and "allow_nonfinite" in err
    assert not (tmp_path / "out").exists() and _temps(tmp_path) == []


def test_inf_in_the_base_is_refused(zoo, tmp_path):
    from mergelab.errors import NonFiniteError
    from mergelab.merge import merge

    base = _copy(zoo["llama"].base, tmp_path / "base")
    name = _poison(base, float("-inf"), key_part="down_proj")
    with pytest.raises(NonFiniteError, match=rf"tensor '{name}' of the base holds 1 infinite"):
        merge(_recipe(tmp_path, base, zoo["llama"].experts[:2]), tmp_path / "out", progress=False)


@pytest.mark.parametrize("fmt", ["full", "lora"])
def test_nan_in_a_lora_expert_is_refused_on_both_paths(zoo, tmp_path, fmt):
    from mergelab.errors import NonFiniteError
    from mergelab.merge import merge

    fz = zoo["llama"]
    bad = _copy(fz.loras[0], tmp_path / "bad")
    _poison(bad, float("nan"), key_part="lora_B")
    recipe = _recipe(tmp_path, fz.base, [fz.loras[1], bad], output={"format": fmt})
    with pytest.raises(NonFiniteError, match=rf"of expert 1 \({bad}\).* holds \d+ NaN"):
        merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_overflow_in_the_result_is_refused_as_the_merged_result(zoo, tmp_path):
    """Finite inputs, but 1e6 does not fit in float16: the cast makes it infinite."""
    from mergelab.errors import NonFiniteError
    from mergelab.merge import merge

    big = _copy(zoo["llama"].experts[0], tmp_path / "big")
    name = _poison(big, 1e6)
    recipe = _recipe(tmp_path, zoo["llama"].base, [big], output={"dtype": "float16"})
    with pytest.raises(NonFiniteError, match=rf"tensor '{name}' of the merged result holds 1 infinite"):
        merge(recipe, tmp_path / "out", progress=False)


def test_allow_nonfinite_merges_anyway_by_flag_or_recipe_key(zoo, tmp_path):
    from mergelab.io.checkpoint import CheckpointReader

    fz = zoo["llama"]
    bad = _copy(fz.experts[1], tmp_path / "bad")
    name = _poison(bad, float("nan"))
    recipe = _recipe(tmp_path, fz.base, [fz.experts[0], bad])
    assert main(["merge", str(recipe), "--out", str(tmp_path / "a"), "-q", "--allow-nonfinite"]) == 0
    keyed = _recipe(tmp_path, fz.base, [fz.experts[0], bad], name="keyed.yaml", output={"allow_nonfinite": True})
    assert main(["merge", str(keyed), "--out", str(tmp_path / "b"), "-q"]) == 0
    for out in ("a", "b"):
        with CheckpointReader(tmp_path / out) as merged:
            assert merged.get(name).isnan().sum() == 1


def test_run_allow_nonfinite_is_recorded_in_the_manifest(zoo, tmp_path):
    fz = zoo["llama"]
    bad = _copy(fz.experts[1], tmp_path / "bad")
    _poison(bad, float("nan"))
    recipe = _recipe(tmp_path, fz.base, [bad])
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-rules", "-q"]) == 2
    assert not (tmp_path / "run" / "model").exists()
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-rules", "-q", "--allow-nonfinite"]) == 0
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["recipe"]["output"]["allow_nonfinite"] is True


def test_in_place_merger_refuses_nan_experts(zoo, tmp_path):
    from mergelab.errors import NonFiniteError
    from mergelab.merge.inplace import InPlaceMerger
    from mergelab.recipe import load_recipe
    from mergelab.testing import load_model

    fz = zoo["llama"]
    bad = _copy(fz.loras[0], tmp_path / "bad")
    _poison(bad, float("nan"), key_part="lora_A")
    with pytest.raises(NonFiniteError, match="expert 0"):
        InPlaceMerger(load_recipe(_recipe(tmp_path, fz.base, [bad])), load_model(fz.base))


# ------------------------------------------------------------------------ 5. identity checks


@pytest.mark.parametrize("family", ["mistral", "gemma"])
def test_expert_of_another_family_with_equal_width_is_refused_naming_both(zoo, tmp_path, capsys, family):
    base, other = zoo["llama"].base, zoo[family].experts[0]
    recipe = _recipe(tmp_path, base, [zoo["llama"].experts[0], other])
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = _error(capsys)
    assert f"expert 1 ({other}) is another model than the base {base}: model_type '{family}' (base 'llama')" in err
    assert "experts[1].accept_mismatch: true" in err and not (tmp_path / "out").exists()


def test_expert_of_another_size_is_refused_by_its_config(zoo, tmp_path):
    from mergelab.errors import ModelMismatchError
    from mergelab.merge import merge

    other = _copy(zoo["llama"].experts[0], tmp_path / "wide")   # same tensors, config of a larger model
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 32
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelMismatchError, match=r"num_hidden_layers 32 \(base 2\)"):
        merge(_recipe(tmp_path, zoo["llama"].base, [other]), tmp_path / "out", progress=False)


def test_accept_mismatch_merges_on_purpose_with_a_warning(zoo, tmp_path, capsys):
    base, other = zoo["llama"].base, zoo["mistral"].experts[0]
    recipe = _write(tmp_path / "r.yaml", {"base": {"path": str(base)},
                                          "experts": [{"path": str(other), "accept_mismatch": True}],
                                          "method": {"name": "task_arithmetic"}})
    assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "-q"]) == 0
    err = _error(capsys)
    assert "warning: expert 0" in err and "model_type 'mistral' (base 'llama')" in err and "(accepted" in err


def _with_recorded_base(lora: Path, dst: Path, recorded: str) -> Path:
    _copy(lora, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = recorded
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("fmt", ["full", "lora"])
def test_adapter_of_another_base_folder_is_refused(zoo, tmp_path, fmt):
    """The adapter records the Mistral base (a folder here whose config differs): an error."""
    from mergelab.errors import ModelMismatchError
    from mergelab.merge import merge

    lora = _with_recorded_base(zoo["llama"].loras[0], tmp_path / "L", str(zoo["mistral"].base))
    recipe = _recipe(tmp_path, zoo["llama"].base, [lora], output={"format": fmt})
    with pytest.raises(ModelMismatchError, match=rf"LoRA adapter of another base .*trained on {zoo['mistral'].base}, "
                                                 r"another model: model_type 'mistral' \(base 'llama'\)"):
        merge(recipe, tmp_path / "out", progress=False)


def test_adapter_of_another_hub_model_is_refused_and_a_name_difference_only_warned(zoo, tmp_path, monkeypatch):
    from mergelab.errors import ModelMismatchError
    from mergelab.merge.inputs import adapter_base_verdict
    from mergelab.recipe import load_recipe

    base = zoo["llama"].base
    hub = load_recipe({"base": {"model": "meta-llama/Llama-2-7b-hf"},
                       "experts": [{"path": str(zoo["llama"].loras[0])}], "method": {"name": "linear"}}).base
    local = load_recipe(_recipe(tmp_path, base, zoo["llama"].loras[:1])).base
    cfg = json.loads((base / "config.json").read_text())
    assert adapter_base_verdict("meta-llama/Llama-2-7b-hf", hub, base, cfg) is None
    assert adapter_base_verdict("Meta-Llama/llama-2-7b-hf/", hub, base, cfg) is None          # spelling
    assert adapter_base_verdict("mistralai/Mistral-7B-v0.1", hub, base, cfg)[0] == "error"
    assert adapter_base_verdict("NousResearch/Llama-2-7b-hf", hub, base, cfg)[0] == "warn"   # a re-upload
    assert adapter_base_verdict("meta-llama/Llama-2-7b-hf", local, base, cfg)[0] == "warn"   # path vs Hub id
    assert adapter_base_verdict("/no/such/folder", local, base, cfg)[0] == "warn"
    assert adapter_base_verdict(str(base), local, base, cfg) is None
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    assert adapter_base_verdict("meta-llama/Llama-2-7b-hf", local, snapshot, cfg) is None  # a resolved Hub base

    # through merge: an adapter naming another Hub repo, the base a snapshot of the recorded one
    from mergelab.merge import merge

    lora = _with_recorded_base(zoo["llama"].loras[0], tmp_path / "L", "mistralai/Mistral-7B-v0.1")
    with pytest.raises(ModelMismatchError, match="trained on mistralai/Mistral-7B-v0.1"):
        merge(_recipe(tmp_path, snapshot_of(base, tmp_path), [lora]), tmp_path / "out", progress=False)
    named = _with_recorded_base(zoo["llama"].loras[0], tmp_path / "N", "HuggingFaceTB/SmolLM2-135M")
    seen: list[str] = []
    result = merge(_recipe(tmp_path, base, [named]), tmp_path / "out", progress=False, warn=seen.append)
    assert len(seen) == 1 and "cannot be compared" in seen[0] and result.warnings == seen


def snapshot_of(base: Path, tmp_path: Path) -> Path:
    """``base`` laid out as a Hub cache snapshot of meta-llama/Llama-2-7b-hf."""
    snap = tmp_path / "cache" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / "abc123"
    if not snap.exists():
        shutil.copytree(base, snap)
    return snap
