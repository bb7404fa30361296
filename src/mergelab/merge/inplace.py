"""Merging into a loaded model in place, once per trial: no disk writes, no reloads.

:class:`InPlaceMerger` is built once per search from the recipe (base, experts, method). Each
trial calls :meth:`InPlaceMerger.apply` with a recipe that differs only in the method parameters;
it overwrites the touched weights of the loaded model with the merge of that recipe, computed
from what was kept at the start:

``lora`` (every expert is a PEFT LoRA adapter)
    the original weights of the adapted tensors only, and every adapter's per-module factors
    (:class:`~mergelab.methods.lowrank.LowRank`, scale folded in), read once. A trial touches only the
    adapted tensors, one module at a time. With ``output.format: full`` it runs the method on
    ``W₀`` and ``W₀ + ΔWᵢ`` exactly as the engine does with LoRA experts; with ``format: lora``
    it computes the module's merged ``ΔW`` with :func:`mergelab.merge.adapter.merge_module` — the
    function ``merge_to_adapter`` uses, so the route and the rank limit (which makes e.g. TIES
    lossy in adapter form) are the same — and writes ``W₀ + B A``. Memory: one copy of the
    adapted weights plus the adapters' factors.
``dense`` (full fine-tunes, or a mix)
    every floating tensor of every expert, in float32, plus the base's; a trial runs the method
    on them exactly as the engine does (:func:`mergelab.merge.inputs.align_tensors` aligns the names and
    :func:`~mergelab.recipe.resolve_params` gives each tensor its parameters). Memory: about
    ``(experts + 1) × model size`` in float32 — this path covers models that fit that many times
    in memory; larger ones are refused before anything is loaded.

The result is cast to the recipe's output dtype (as the written merge would be) and then to the
loaded model's dtype. A data-aware method's statistics are measured (or read from the cache)
once; those measured in the merged model (``regmean_pp``) depend on the merge's parameters, so a
trial with other parameters measures them again — a pass over every expert's rows that loads a
second copy of the base model (:mod:`mergelab.merge.merged_stats`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergelabError
from mergelab.recipe import layer_depths
from mergelab.util import available_memory, natural_key
from mergelab.recipe import layer_of, resolve_params
from mergelab.io.checkpoint import CheckpointReader
from mergelab.io.adapter import is_adapter_dir, open_lora_expert
from mergelab.methods import get_method
from mergelab.merge.inputs import RESULT, align_tensors, check_finite, check_identity, describe_expert, open_expert
from mergelab.merge.adapter import merge_module
from mergelab.merge.datastats import recipe_grams
from mergelab.merge.vocab import require_index_aligned


class InPlaceError(MergelabError):
    """The loaded model cannot take the in-place merge (missing tensors, not enough memory)."""


@dataclass
class _Target:
    name: str                 # base checkpoint tensor name
    param: torch.Tensor       # the loaded model's tensor (written in place)
    original: torch.Tensor    # its value before any trial (float32, on the model's device)
    num_layers: int
    base_dtype: torch.dtype   # the base checkpoint's dtype: the output's unless the recipe sets one


def _num_layers(name: str, depth: dict[str, int]) -> int:
    loc = layer_of(name)
    return depth.get(loc[0], 0) if loc else max(depth.values(), default=0)


class InPlaceMerger:
    """Writes the merge of a recipe's experts into ``model`` for each trial; see the module doc."""

    def __init__(self, recipe, model, *, memory_fraction: float = 0.7):
        self.recipe = recipe
        self.model = model
        self.spec = get_method(recipe.method.name)
        self.device = next(model.parameters()).device
        self._tensors = model.state_dict(keep_vars=True)
        base_path = Path(recipe.base.resolve())
        expert_paths = [Path(e.resolve()) for e in recipe.experts]
        self.mode = "lora" if all(is_adapter_dir(p) for p in expert_paths) else "dense"
        self.finite = not recipe.output.allow_nonfinite   # refuse NaN/Inf in the inputs and in each trial's merge
        self.base = CheckpointReader(base_path)
        self.targets: list[_Target] = []
        try:
            if self.mode == "lora":
                self._init_lora(expert_paths)
            else:
                self._init_dense(expert_paths, memory_fraction)
        finally:
            self.base.close()
        self.stats: dict[str, list] | None = None
        self._paths = (base_path, expert_paths)
        self._stats_of: str | None = None
        if self.spec.needs_gram:   # data-aware method: each expert's input statistics, held on the device
            self._measure(recipe)

    def _measure(self, recipe) -> None:
        """The statistics of ``recipe``'s merge; measured in the merged model (``merged_stats``) they
        depend on the trial's parameters, so a trial with other parameters measures them again."""
        key = repr((recipe.method.params, [e.params for e in recipe.experts], recipe.output.dtype, recipe.seed))
        if self.stats is not None and (not self.spec.merged_stats or key == self._stats_of):
            return
        names = [t.name for t in self.targets]
        grams = recipe_grams(recipe, *self._paths, names=names if self.mode == "lora" else None, device=self.device)
        self.stats = {n: [g.get(n, self.device) for g in grams] for n in names}
        self._stats_of = key

    # --- setup
    def _param(self, name: str) -> torch.Tensor:
        t = self._tensors.get(name)
        if t is None:
            raise InPlaceError(f"the loaded model has no tensor {name!r}, which the merge writes",
                               hint="the base folder's weights and its config.json disagree")
        return t

    def _init_lora(self, paths: list[Path]) -> None:
        experts = [open_lora_expert(p, self.base) for p in paths]
        try:
            check_identity(self.recipe, self.base, experts)
            names = sorted({n for e in experts for n in e.modules}, key=natural_key)
            depth = layer_depths(self.base.keys())
            self.parts: dict[str, list] = {}
            for name in names:
                parts = [e.factors(name) for e in experts]
                if self.finite:
                    for i, (e, q) in enumerate(zip(experts, parts)):
                        if q is not None:
                            check_finite(q.B, name, f"{describe_expert(i, e)} (LoRA B)")
                            check_finite(q.A, name, f"{describe_expert(i, e)} (LoRA A)")
                self.parts[name] = [None if q is None else q.to(self.device) for q in parts]
                param = self._param(name)
                self.targets.append(_Target(name, param, param.detach().to(torch.float32).clone(),
                                            _num_layers(name, depth), self.base.dtype(name)))
            dtypes = {e.adapter.dtype for e in experts}
            self.adapter_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        finally:
            for e in experts:
                e.close()

    def _init_dense(self, paths: list[Path], memory_fraction: float) -> None:
        experts = [open_expert(p, self.base) for p in paths]
        try:
            check_identity(self.recipe, self.base, experts)
            require_index_aligned(self.recipe, self.base, paths, experts, "tuning in place")
            tasks = [t for t in align_tensors(self.recipe, self.base, experts, self.spec) if t.floating]
            need = sum(t.numel for t in tasks) * 4 * (len(experts) + 1)
            have = available_memory(self.device)
            if need > memory_fraction * have:
                raise InPlaceError(
                    f"tuning full-model experts in place holds every expert's tensors and the base's "
                    f"in float32: {need / 2**30:.1f} GiB, but only {have / 2**30:.1f} GiB is free on "
                    f"{self.device}",
                    hint="tune LoRA experts (only their factors are held), fewer experts, or a "
                         "device with more memory")
            self.inputs: dict[str, list[torch.Tensor]] = {}
            for t in tasks:
                param = self._param(t.name)
                self.inputs[t.name] = [src.get(n).to(self.device, torch.float32) for src, n in t.inputs[1:]]
                if self.finite:
                    for i, ((src, _), x) in enumerate(zip(t.inputs[1:], self.inputs[t.name])):
                        check_finite(x, t.name, describe_expert(i, src))
                self.targets.append(_Target(t.name, param, t.inputs[0][0].get(t.inputs[0][1]).to(
                    self.device, torch.float32), t.num_layers, t.out_dtype))
        finally:
            for e in experts:
                if hasattr(e, "close"):
                    e.close()

    # --- per trial
    @torch.no_grad()
    def apply(self, recipe) -> None:
        """Overwrite the touched weights with the merge of ``recipe`` (same base, experts, method)."""

        if (recipe.method.name != self.recipe.method.name or recipe.base != self.recipe.base
                or [e.resolve() for e in recipe.experts] != [e.resolve() for e in self.recipe.experts]):
            raise ValueError("InPlaceMerger.apply: the recipe must keep the base, experts and method")
        if self.spec.needs_gram:
            self._measure(recipe)
        for t in self.targets:
            params = resolve_params(recipe, t.name, t.num_layers)
            if self.stats is not None:
                params.stats = self.stats[t.name]
            merged = self._merge_lora(recipe, t, params) if self.mode == "lora" else self._merge_dense(recipe, t, params)
            if self.finite:   # a trial whose parameters give NaN/Inf fails (the search goes on)
                check_finite(merged, t.name, RESULT)
            t.param.copy_(merged.to(t.param.dtype))

    def _merge_lora(self, recipe, t: _Target, params) -> torch.Tensor:
        if recipe.output.format != "lora":
            # what the engine does with LoRA experts: the method on W and W + ΔWᵢ (in the base dtype)
            experts = [t.original if q is None else (t.original + q.dense()).to(t.base_dtype).float()
                       for q in self.parts[t.name]]
            base = t.original if self.spec.needs_base else torch.zeros((), device=self.device).expand(t.original.shape)
            return self.spec.fn(base, experts, params).to(recipe.output.torch_dtype or t.base_dtype)

        # what merge_to_adapter writes: the same route and rank limit, factors in the adapter dtype
        res = merge_module(t.name, self.parts[t.name], self.spec, params, tuple(t.original.shape),
                           rank=recipe.output.rank, energy=recipe.output.energy,
                           base_tensor=lambda: t.original, seed=recipe.seed, device=self.device,
                           exact_ties=recipe.output.ties_cuts == "exact")
        lr = res.factors
        if not lr.rank:
            return t.original.clone()
        dtype = recipe.output.torch_dtype or self.adapter_dtype
        return t.original + lr.B.to(dtype).float() @ lr.A.to(dtype).float()

    def _merge_dense(self, recipe, t: _Target, params) -> torch.Tensor:
        base = t.original if self.spec.needs_base else torch.zeros((), device=self.device).expand(t.original.shape)
        out = self.spec.fn(base, self.inputs[t.name], params)
        return out.to(recipe.output.torch_dtype or t.base_dtype)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original (base) weights back."""
        for t in self.targets:
            t.param.copy_(t.original.to(t.param.dtype))

    def describe(self) -> dict[str, Any]:
        held = sum(t.original.numel() for t in self.targets) * 4
        if self.mode == "lora":
            held += sum(q.B.numel() + q.A.numel() for parts in self.parts.values() for q in parts if q is not None) * 4
        else:
            held += sum(x.numel() for xs in self.inputs.values() for x in xs) * 4
        if self.stats is not None:   # distinct Gram matrices (shared ones are held once)
            held += sum(g.numel() for g in {id(g): g for gs in self.stats.values() for g in gs
                                             if g is not None}.values()) * 4
        return {"mode": self.mode, "tensors": len(self.targets), "held_bytes": held}
