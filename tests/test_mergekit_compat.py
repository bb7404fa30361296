"""Same inputs and parameters → the same tensors as mergekit 0.1.5, for every method both have.

Deterministic methods run the real ``mergekit`` merge (its Python API) on fixture models and
mergelab on *the same mergekit config* (translated by :func:`mergelab.recipe.load_recipe`).
Random methods (DARE, DELLA) draw from different generators in the two tools, so they are
compared on one tensor with mergekit's Bernoulli draws replaced by mergelab's own uniform draws.
"""
from __future__ import annotations

import pytest
import torch

mergekit = pytest.importorskip("mergekit", reason="mergekit==0.1.5 is in the test extra")

from mergelab.io.checkpoint import CheckpointReader
from mergelab.merge import merge
from mergelab.methods import MethodParams, get_method  # noqa: E402
from mergelab.recipe import load_recipe  # noqa: E402


def _mergekit(cfg: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(quiet=True, write_model_card=False, copy_tokenizer=False))


def _assert_same_tensors(a, b):
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    assert sorted(ra.keys()) == sorted(rb.keys())
    for name in ra.keys():
        x, y = ra.get(name), rb.get(name)
        assert x.dtype == y.dtype, name
        assert torch.allclose(x.float(), y.float(), rtol=1e-5, atol=1e-6), \
            f"{name}: max |Δ| = {(x.float() - y.float()).abs().max():.3g}"


def _cfg(fz, method, models, **top):
    return {"merge_method": method, "models": models, **top}


CASES = {
    "linear": lambda fz: _cfg(fz, "linear", [
        {"model": str(fz.experts[0]), "parameters": {"weight": 1.0}},
        {"model": str(fz.experts[1]), "parameters": {"weight": 0.5}},
        {"model": str(fz.experts[2]), "parameters": {"weight": [0.2, 1.0]}}]),
    "task_arithmetic": lambda fz: _cfg(fz, "task_arithmetic", [
        {"model": str(fz.experts[0]), "parameters": {"weight": 0.7}},
        {"model": str(fz.experts[1]), "parameters": {"weight": 0.4}}],
        base_model=str(fz.base), parameters={"lambda": 1.3}),
    "ties": lambda fz: _cfg(fz, "ties", [
        {"model": str(fz.base)},
        {"model": str(fz.experts[0]), "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": str(fz.experts[1]), "parameters": {"weight": 0.6, "density": [0.2, 0.8]}},
        {"model": str(fz.experts[2]), "parameters": {"weight": 0.3}}],
        base_model=str(fz.base), parameters={"density": 0.3, "int8_mask": True}),
    "breadcrumbs": lambda fz: _cfg(fz, "breadcrumbs", [
        {"model": str(fz.experts[0]), "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
        {"model": str(fz.experts[1]), "parameters": {"weight": 0.5, "density": 0.4}}],
        base_model=str(fz.base), parameters={"gamma": 0.1}),
    "breadcrumbs_ties": lambda fz: _cfg(fz, "breadcrumbs_ties", [
        {"model": str(fz.experts[0]), "parameters": {"weight": 1.0}},
        {"model": str(fz.experts[1]), "parameters": {"weight": 1.0}}],
        base_model=str(fz.base), parameters={"density": 0.5, "gamma": 0.02, "normalize": True}),
    "model_stock": lambda fz: _cfg(fz, "model_stock", [{"model": str(e)} for e in fz.experts],
                                   base_model=str(fz.base)),
    "model_stock_filter_wise": lambda fz: _cfg(fz, "model_stock", [{"model": str(e)} for e in fz.experts],
                                               base_model=str(fz.base), parameters={"filter_wise": True}),
    # the spherical and selection methods of mergekit 0.1.5 (issue 18)
    "karcher": lambda fz: _cfg(fz, "karcher", [  # base_model not among models: one more input
        {"model": str(e), "parameters": {"weight": w}} for e, w in zip(fz.experts, [1.0, 0.2, 0.5])],
        base_model=str(fz.base), parameters={"max_iter": 20, "tol": 1e-6}),
    "karcher_without_base": lambda fz: _cfg(fz, "karcher", [{"model": str(e)} for e in fz.experts]),
    "nuslerp": lambda fz: _cfg(fz, "nuslerp", [
        {"model": str(fz.experts[0]), "parameters": {"weight": 0.3}},
        {"model": str(fz.experts[1]), "parameters": {"weight": [0.9, 0.1]}}], base_model=str(fz.base)),
    "nuslerp_rows_without_base": lambda fz: _cfg(fz, "nuslerp", [
        {"model": str(fz.experts[0]), "parameters": {"weight": 1.0}},
        {"model": str(fz.experts[2]), "parameters": {"weight": 0.6}}],
        parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "multislerp": lambda fz: _cfg(fz, "multislerp", [
        {"model": str(e), "parameters": {"weight": w}} for e, w in zip(fz.experts, [1.0, 0.5, [0.1, 0.8]])],
        base_model=str(fz.base)),
    "multislerp_without_base": lambda fz: _cfg(fz, "multislerp", [
        {"model": str(e), "parameters": {"weight": w}} for e, w in zip(fz.experts, [0.2, 0.5, 0.3])],
        parameters={"normalize_weights": False}),
    "sce": lambda fz: _cfg(fz, "sce", [{"model": str(fz.base)}] + [{"model": str(e)} for e in fz.experts],
                           base_model=str(fz.base), parameters={"select_topk": [0.1, 0.6]}),
    "sce_all": lambda fz: _cfg(fz, "sce", [{"model": str(e)} for e in fz.experts[:2]], base_model=str(fz.base)),
    "nearswap": lambda fz: _cfg(fz, "nearswap", [{"model": str(fz.base)}, {"model": str(fz.experts[1])}],
                                base_model=str(fz.base), parameters={"t": [0.001, 0.03]}),
    "slerp": lambda fz: {
        "merge_method": "slerp", "base_model": str(fz.base),
        "slices": [{"sources": [{"model": str(fz.base), "layer_range": [0, 2]},
                                {"model": str(fz.experts[0]), "layer_range": [0, 2]}]}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.3}]}},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_tensors_as_mergekit_on_llama(zoo, tmp_path, case):
    cfg = CASES[case](zoo["llama"])
    _mergekit(cfg, tmp_path / "mergekit")
    merge(load_recipe(cfg), tmp_path / "mergelab", progress=False)
    _assert_same_tensors(tmp_path / "mergekit", tmp_path / "mergelab")


def test_same_tensors_as_mergekit_with_tied_embeddings(zoo, tmp_path):
    cfg = CASES["ties"](zoo["gemma"])  # gemma stores no lm_head: it is the embedding
    _mergekit(cfg, tmp_path / "mergekit")
    merge(load_recipe(cfg), tmp_path / "mergelab", progress=False)
    assert "lm_head.weight" not in CheckpointReader(tmp_path / "mergelab").keys()
    _assert_same_tensors(tmp_path / "mergekit", tmp_path / "mergelab")


def test_same_tensors_as_mergekit_on_t5_encoder_decoder(zoo, tmp_path):
    fz = zoo["t5"]  # layer lists run over the encoder and the decoder stack separately
    cfg = _cfg(fz, "task_arithmetic", [{"model": str(fz.experts[0]), "parameters": {"weight": 0.5}},
                                       {"model": str(fz.experts[1]), "parameters": {"weight": [0.2, 1.0]}}],
               base_model=str(fz.base))
    _mergekit(cfg, tmp_path / "mergekit")
    merge(load_recipe(cfg), tmp_path / "mergelab", progress=False)
    _assert_same_tensors(tmp_path / "mergekit", tmp_path / "mergelab")


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_match_mergekit_given_the_same_draws(zoo, monkeypatch, method):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    fz = zoo["llama"]
    name = "model.layers.1.mlp.down_proj.weight"
    base = CheckpointReader(fz.base).get(name)
    experts = [CheckpointReader(e).get(name) for e in fz.experts]
    weights, densities = [1.0, 0.6, 0.3], [0.5, 0.3, 0.7]
    extra = {"epsilon": 0.1} if method.startswith("della") else {}

    ours = get_method(method).fn(base, experts, MethodParams(
        globals=extra, experts=[{"weight": w, "density": d} for w, d in zip(weights, densities)],
        generator=torch.Generator().manual_seed(1234)))

    replay = torch.Generator().manual_seed(1234)  # mergelab's draws: uniform, flat order, expert by expert
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **k: (torch.rand(p.shape, generator=replay) < p).to(p.dtype))
    group = TensorGroup.from_tensors([base, *experts], base_index=0, name=name)
    params = {"weight": weights, "density": densities, **{k: [v] * 3 for k, v in extra.items()}}
    (theirs,) = registry.get(method)((group,), parameters=params)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours, base)
