"""The GPU path (skipped without CUDA; ``bench/gpu_check.sh`` runs these on a GPU machine): merges on
CUDA agree with the CPU's, row blocks on CUDA give the bytes of the whole tensor, and a LoRA merge in
ΔW space runs there too."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from mergelab.io.adapter import load_adapter
from mergelab.io.checkpoint import CheckpointReader
from mergelab.merge import merge
from mergelab.recipe import load_recipe

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _state(folder):
    r = CheckpointReader(folder)
    return {k: r.get(k).float() for k in r.keys()}


@pytest.mark.parametrize("method", [{"name": "ties", "density": 0.4}, {"name": "slerp", "t": 0.3},
                                    {"name": "model_stock"}, {"name": "task_arithmetic"}])
def test_cuda_merge_agrees_with_the_cpu(zoo, tmp_path, method):
    fz = zoo["llama"]
    n = 1 if method["name"] == "slerp" else 3
    r = load_recipe({"base": {"path": str(fz.base)}, "experts": [{"path": str(e)} for e in fz.experts[:n]],
                     "method": method})
    merge(r, tmp_path / "cpu", device="cpu", progress=False)
    merge(r, tmp_path / "gpu", device="cuda", progress=False)
    a, b = _state(tmp_path / "cpu"), _state(tmp_path / "gpu")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_cuda_blocks_give_the_bytes_of_the_whole_tensor(tmp_path):
    """Two blocks of 16M entries (the GPU's reduction chunk) against the whole 8192 × 4096 tensor."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8192, 4096, generator=g) * 0.02
    for i, name in enumerate(["base", "e0", "e1", "e2"]):
        (tmp_path / name).mkdir()
        t = base if i == 0 else base + torch.randn(8192, 4096, generator=g) * 0.002
        save_file({"w.weight": t.bfloat16()}, str(tmp_path / name / "model.safetensors"))
    digests = []
    for label, block in (("blocks", 4 * 64 << 20), ("whole", 1 << 40)):
        r = load_recipe({"base": {"path": str(tmp_path / "base")},
                         "experts": [{"path": str(tmp_path / e)} for e in ("e0", "e1", "e2")],
                         "method": {"name": "ties", "density": 0.3}})
        merge(r, tmp_path / label, device="cuda", progress=False, block_bytes=block)
        digests.append(hashlib.sha256((tmp_path / label / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_cuda_lora_ties_in_delta_space_agrees_with_the_cpu(zoo, tmp_path):
    fz = zoo["llama"]
    r = load_recipe({"base": {"path": str(fz.base)}, "experts": [{"path": str(a)} for a in fz.loras],
                     "method": {"name": "ties", "density": 0.5}, "output": {"format": "lora", "rank": 16}})
    merge(r, tmp_path / "cpu", device="cpu", progress=False)
    merge(r, tmp_path / "gpu", device="cuda", progress=False)
    a, b = load_adapter(tmp_path / "cpu"), load_adapter(tmp_path / "gpu")
    assert sorted(a.modules) == sorted(b.modules)
    for path in a.modules:   # factors may differ by a rotation; the ΔW they make must agree
        assert torch.allclose(a.delta(path), b.delta(path), rtol=1e-3, atol=1e-6), path
