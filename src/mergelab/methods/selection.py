"""Entry-wise selection merges: SCE (select, calculate, erase) and NearSwap (as mergekit 0.1.5 has them).

Notation as in :mod:`mergelab.methods.basic`: ``θ_0`` base, ``θ_i`` experts, ``δ_i = θ_i − θ_0``.
Both work entry by entry in chunks of the flattened tensor (see :mod:`mergelab.methods.sparsify`),
so the temporaries stay small.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import Block, Blockwise, MethodParams, Passes, chunks, register, run_whole
from mergelab.methods.kth import KthLargest, sample_bracket
from mergelab.methods.sparsify import Cut


def _variance(b: torch.Tensor, es: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per entry, the population variance of the task vectors ``e − b`` across experts (flat)."""
    out = torch.empty_like(b)
    for sl in chunks(b.numel(), b.device):
        torch.var(torch.stack([e[sl] - b[sl] for e in es]), dim=0, unbiased=False, out=out[sl])
    return out


@dataclass
class _SceStats:
    cut: Cut | None          # the variance cut (None: no selection)
    coefs: list[float]
    lam: float
    n: int
    carry: list[int] = field(default_factory=list)


def _sce_stats(passes: Passes, p: MethodParams, shape: tuple) -> _SceStats:
    """The variance cut (a count pass, then the exact cut's two passes) and the experts' energies."""
    topk = float(p.get("select_topk", 1.0))
    n = math.prod(shape)
    cut = None
    if topk < 1:
        k = 0
        if topk > 0:
            nonzero = sum(int(torch.count_nonzero(_variance(blk.base.reshape(-1), _flat(blk)))) for blk in passes())
            k = int(torch.tensor(nonzero) * topk)  # in float32, as mergekit
        cut = Cut(k)
        if 0 < k < n:
            bracket = None
            if passes.sample is not None:
                blk = passes.sample()
                bracket = sample_bracket(_variance(blk.base.reshape(-1), _flat(blk)), n, k)
            sel = KthLargest(n, [k], passes.device, brackets=[bracket])
            more = True
            while more:
                for blk in passes():
                    sel.observe(_variance(blk.base.reshape(-1), _flat(blk)))
                more = sel.next_pass()
            cut.v, cut.n_gt, cut.n_eq = sel.result(0)
    energies = [0.0] * passes.n_experts
    carry = cut.start() if cut is not None else []
    for blk in passes():
        for i, d in enumerate(_sce_deltas(blk, cut, carry, n)):
            for sl in chunks(d.numel(), d.device):
                energies[i] += float(torch.linalg.vector_norm(d[sl], dtype=torch.float64)) ** 2
    energies = [x / max(n, 1) for x in energies]
    total = sum(energies)
    k = len(energies)
    coefs = [1.0 / k] * k if abs(total) < 1e-6 else [x / total for x in energies]
    return _SceStats(cut, coefs, float(p.get("lambda", 1.0)), n, cut.start() if cut is not None else [])


def _flat(blk: Block) -> list[torch.Tensor]:
    return [e.reshape(-1) for e in blk.experts]


def _sce_deltas(blk: Block, cut: Cut | None, carry: list[int], n: int) -> list[torch.Tensor]:
    """The block's task vectors, zero outside the selected entries."""
    b = blk.base.reshape(-1)
    ds = [torch.sub(e, b) for e in _flat(blk)]
    if cut is not None:
        keep = cut.mask(_variance(b, _flat(blk)), carry, n)
        for d in ds:
            d.mul_(keep)
    return ds


def _sce_apply(blk: Block, st: _SceStats, p: MethodParams) -> torch.Tensor:
    b = blk.base.reshape(-1)
    dss = _sce_deltas(blk, st.cut, st.carry, st.n)
    out = torch.empty_like(b)
    for sl in chunks(b.numel(), b.device):
        ds = [d[sl] for d in dss]
        mixed = torch.stack(ds).sum(dim=0)
        sign = torch.where(mixed >= 0, 1.0, -1.0)
        mixed.zero_()
        divisor = torch.zeros_like(mixed)
        for d, c in zip(ds, st.coefs):
            weight = (torch.sign(d) == sign).to(d.dtype).mul_(c)
            mixed.addcmul_(d, weight)
            divisor.add_(weight)
        mixed.div_(divisor.clamp_(min=1e-6))
        torch.add(b[sl], mixed, alpha=st.lam, out=out[sl])
    return out.view(blk.base.shape)


_SCE = Blockwise(_sce_stats, _sce_apply)


@register("sce", global_params=("select_topk", "lambda"), blockwise=_SCE)
def sce(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """SCE: select the entries where the experts differ most, weigh each expert by its energy,
    erase the entries that disagree with the elected sign.

    1. **select**: with ``select_topk < 1``, keep in every ``δ_i`` only the ``k`` entries of
       largest variance across the experts, ``v = Var_i(δ_i)`` (population variance),
       ``k = ⌊select_topk · #(v ≠ 0)⌋`` (the product taken in float32, as mergekit does);
    2. **calculate**: ``c_i = mean(δ̃_i²) / Σ_j mean(δ̃_j²)`` (equal ``1/T`` when that sum is below
       1e-6 — mergekit's threshold, met by small task vectors);
    3. **erase**: ``s = sign(Σ_i δ̃_i)`` (``+`` for 0), ``a_i = [sign δ̃_i = s]``, and

        θ = θ_0 + λ · Σ_i a_i c_i δ̃_i / max(Σ_i a_i c_i, 1e-6).

    Defaults: ``select_topk`` 1 (no selection), ``lambda`` 1 (not in mergekit). Among entries of
    equal variance at the cut, the lower index is kept (mergekit's ``topk`` picks arbitrarily).
    The experts' ``weight`` plays no part (as in mergekit).

    Paper: Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024 (arXiv:2408.07990).
    """
    return run_whole(_SCE, base, experts, p)


@register("nearswap", n_experts=(1, 1), elementwise=True, global_params=("t",))
def nearswap(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """NearSwap: take the expert's value where it is near the base's, keep the base's elsewhere.

    Per entry, ``a = |θ_1 − θ_0|`` and ``w = clamp(t / max(a, 1e-6), 0, 1)``:

        θ = w θ_1 + (1 − w) θ_0,

    so entries closer than ``t`` are swapped to the expert entirely and farther ones move towards
    it by ``t/a``. ``t`` is required (> 0; a list varies it across layers). Exactly one expert.

    Reference: alchemonaut, "QuartetAnemoi-70B" (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001),
    mergekit's ``nearswap``.
    """
    t = p.get("t")
    if t is None:
        raise RecipeError("nearswap needs the parameter t (entries closer than t take the expert's value)",
                          hint="add e.g. `t: 0.0001` to the method")
    t = float(t)
    a, b = base.reshape(-1), experts[0].reshape(-1)
    out = torch.empty_like(a)
    for sl in chunks(a.numel(), a.device):
        w = (t / torch.sub(a[sl], b[sl]).abs_().clamp_(min=1e-6)).clamp_(0, 1)
        out[sl] = w * b[sl] + (1 - w) * a[sl]
    return out.view(base.shape)
