"""The fixture models load in transformers and generate; the adapters load in PEFT."""
from __future__ import annotations

import json

import pytest
import torch

from mergelab.testing import FAMILIES, load_model


@pytest.mark.parametrize("family", FAMILIES)
def test_base_is_sharded_and_generates(zoo, family):
    from transformers import AutoTokenizer

    fz = zoo[family]
    index = json.loads((fz.base / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "fixture must be sharded"
    tok = AutoTokenizer.from_pretrained(str(fz.base))
    model = load_model(fz.base)
    ids = tok("Question: What is two plus three?", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    new = out.shape[1] - (0 if model.config.is_encoder_decoder else ids["input_ids"].shape[1])
    assert new >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_differ_from_base_and_each_other(zoo, family):
    fz = zoo[family]
    base = dict(load_model(fz.base).named_parameters())
    e0 = dict(load_model(fz.experts[0]).named_parameters())
    e1 = dict(load_model(fz.experts[1]).named_parameters())
    name = next(n for n, p in base.items() if p.dim() == 2)
    d0, d1 = e0[name] - base[name], e1[name] - base[name]
    assert d0.abs().max() > 0 and d1.abs().max() > 0
    assert not torch.allclose(d0, d1)


@pytest.mark.parametrize("family", FAMILIES)
def test_loras_load_in_peft_and_change_the_model(zoo, family):
    from peft import PeftModel

    fz = zoo[family]
    ranks, targets = set(), set()
    for lora in fz.loras:
        cfg = json.loads((lora / "adapter_config.json").read_text())
        ranks.add(cfg["r"])
        targets.add(frozenset(cfg["target_modules"]))
    assert len(ranks) == 3 and len(targets) == 3, "adapters must differ in rank and targets"

    base = load_model(fz.base)
    ids = torch.tensor([[5, 6, 7, 8]])
    kwargs = {"decoder_input_ids": torch.tensor([[0, 5]])} if base.config.is_encoder_decoder else {}
    with torch.no_grad():
        ref = base(input_ids=ids, **kwargs).logits
        model = PeftModel.from_pretrained(load_model(fz.base), str(fz.loras[0]))
        out = model(input_ids=ids, **kwargs).logits
    assert (out - ref).abs().max() > 1e-4
