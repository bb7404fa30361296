"""RegMean and RegMean++: the data-aware closed-form merge of linear layers.

For a linear layer ``y = x Wᵀ`` (``W``: out × in) and expert ``i`` with weights ``Wᵢ`` and the
Gram matrix ``Gᵢ = Σₜ xₜ xₜᵀ`` (in × in) of the layer's inputs on that expert's own task, the merge
minimising ``Σᵢ wᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²`` (the merged layer's outputs against each expert's outputs
on that expert's inputs) is

    ``W = (Σᵢ wᵢ Wᵢ Gᵢ) (Σᵢ wᵢ Gᵢ)⁻¹``.

mergelab computes it in ΔW space — ``W = W₀ + (Σᵢ wᵢ δᵢ Gᵢ)(Σᵢ wᵢ Gᵢ)⁻¹``, which is the same
matrix because ``W₀ M M⁻¹ = W₀`` — so LoRA experts need only their factors (see
:func:`regmean_factors`). The Gram matrices come from :mod:`mergelab.merge.statistics` (the callers put one
per expert in :attr:`MethodParams.stats`).

Parameters: ``alpha`` (default 0.9) scales the off-diagonal entries of every ``Gᵢ``
(``α Gᵢ + (1 − α) diag(Gᵢ)``; ``alpha: 0`` gives a per-input-feature weighted average, and a value
below 1 keeps the system well conditioned when few tokens were seen); ``ridge`` (default 1e-6)
adds ``ridge · mean(diag M)`` to the diagonal of ``M = Σᵢ wᵢ Gᵢ`` before solving; ``lambda``
(default 1) scales the merged task vector, ``W₀ + λ ΔW``, as in task arithmetic; per-expert
``weight`` (default 1, ≥ 0) weighs expert ``i``'s regression loss.

Tensors without a Gram matrix (embeddings, norms, biases, layers the statistics pass did not
see) get the weighted mean of the task vectors, ``θ₀ + λ Σᵢ wᵢ δᵢ / Σᵢ wᵢ``, as in the paper.

``regmean_pp`` (RegMean++, Nguyen et al., 2025) is the same formula with other ``Gᵢ``: those of
layer ``l`` are measured where the merged model's layer ``l`` will be, on the inputs the merged
layers ``< l`` give expert ``i``'s rows (:mod:`mergelab.merge.merged_stats`); here it differs from
``regmean`` only by the flag ``merged_stats`` that tells the callers so.

Papers: Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models",
ICLR 2023 (arXiv:2212.09849); Nguyen et al., "RegMean++: Enhancing Effectiveness and
Generalization of Regression Mean for Model Merging", 2025 (arXiv:2508.03121).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods.lowrank import LowRank, concat
from mergelab.methods import Block, Blockwise, MethodParams, Passes, register, row_chunks, run_whole


def _settings(p: MethodParams, n: int) -> tuple[list[float], float, float, float]:
    weights = [float(w) for w in p.per_expert("weight", 1.0)] if p.experts else [1.0] * n
    if len(weights) != n:
        raise RecipeError(f"{n} experts but {len(weights)} per-expert parameter sets")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise RecipeError(f"regmean: the expert weights {weights} must be ≥ 0 and not all 0 "
                          "(they weigh each expert's regression loss)",
                          hint="use non-negative weights; scale the result with lambda instead")
    alpha = float(p.get("alpha", 0.9))
    if not 0.0 <= alpha <= 1.0:
        raise RecipeError(f"regmean: alpha must lie between 0 and 1, got {alpha:g}")
    ridge = float(p.get("ridge", 1e-6))
    if ridge < 0:
        raise RecipeError(f"regmean: ridge must be ≥ 0, got {ridge:g}")
    return weights, alpha, ridge, float(p.get("lambda", 1.0))


def _grams(p: MethodParams, n: int, in_features: int) -> list[torch.Tensor] | None:
    """The experts' Gram matrices for this tensor, or None when it has none (fallback)."""
    stats = p.stats
    if stats is None or all(g is None for g in stats):
        return None
    if len(stats) != n or any(g is None for g in stats):
        raise RecipeError(f"regmean: {sum(g is not None for g in stats)} of {n} experts have input "
                          "statistics for this tensor; every expert needs them")
    for g in stats:
        if tuple(g.shape) != (in_features, in_features):
            raise RecipeError(f"regmean: a Gram matrix of shape {tuple(g.shape)} does not fit a weight "
                              f"with {in_features} inputs",
                              hint="the statistics were computed on another model; delete them to recompute")
    return list(stats)


def reduce_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """``α G + (1 − α) diag(G)`` (a new tensor)."""
    out = g * alpha
    out.diagonal().add_(g.diagonal(), alpha=1.0 - alpha)
    return out


def _system(grams: Sequence[torch.Tensor], weights: Sequence[float], alpha: float, ridge: float
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The reduced ``G̃ᵢ`` (float64) and the regularised ``M = Σᵢ wᵢ G̃ᵢ + ridge·mean(diag)·I``."""
    reduced = [reduce_off_diagonal(g.double(), alpha) for g in grams]
    m = sum(w * g for w, g in zip(weights, reduced))
    scale = float(m.diagonal().mean())
    if not scale > 0:
        raise RecipeError("regmean: the input statistics of this layer are all zero (no tokens seen)",
                          hint="give each expert more data rows")
    m.diagonal().add_(ridge * scale)
    return reduced, m


def _right_solve(r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``R M⁻¹`` for a symmetric ``M``, in float64."""
    try:
        return torch.linalg.solve(m, r.T).T
    except RuntimeError:  # singular with ridge 0: the minimum-norm least-squares solution
        return torch.linalg.lstsq(m, r.T).solution.T


@dataclass
class _Solver:
    """What every row block of one tensor shares: the reduced Gram matrices and the factorised
    ``M`` (None: the tensor has no statistics and takes the weighted mean)."""

    weights: list[float]
    lam: float
    reduced: list[torch.Tensor] | None = None
    m: torch.Tensor | None = None
    lu: tuple[torch.Tensor, torch.Tensor] | None = None   # LU of M with its pivots (None: M is singular)

    def right_solve(self, r: torch.Tensor) -> torch.Tensor:
        """``R M⁻¹`` (float64), as :func:`_right_solve` but with ``M`` factorised once."""
        if self.lu is None:  # singular with ridge 0: the minimum-norm least-squares solution
            return torch.linalg.lstsq(self.m, r.T).solution.T
        return torch.linalg.lu_solve(*self.lu, r.T).T


def _regmean_stats(passes: Passes, p: MethodParams, shape: tuple) -> _Solver:
    """The solve's left side, once per tensor: no pass over the rows (they are independent given
    the Gram matrices). Memory: the ``Gᵢ`` and ``M``, ``in²`` each."""
    weights, alpha, ridge, lam = _settings(p, passes.n_experts)
    grams = _grams(p, passes.n_experts, shape[-1]) if len(shape) == 2 else None
    if grams is None:
        return _Solver(weights, lam)
    reduced, m = _system(grams, weights, alpha, ridge)
    lu, pivots, info = torch.linalg.lu_factor_ex(m)
    return _Solver(weights, lam, reduced, m, (lu, pivots) if int(info) == 0 else None)


def _regmean_apply(blk: Block, st: _Solver, p: MethodParams) -> torch.Tensor:
    base = blk.base
    taus = [e - base for e in blk.experts]
    if st.reduced is None:
        return _fallback(base, taus, st.weights, st.lam)
    out = torch.empty_like(base)
    for rows in row_chunks(base.shape[0], base.shape[1], base.device):
        r = sum(w * (t[rows].double() @ g) for w, t, g in zip(st.weights, taus, st.reduced))
        out[rows] = base[rows] + (st.lam * st.right_solve(r)).to(base.dtype)
    return out


#: RegMean's block form: the rows of ``W`` are independent given the Gram matrices
_REGMEAN = Blockwise(_regmean_stats, _regmean_apply)


def _fallback(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: Sequence[float], lam: float):
    total = sum(weights)
    return base + lam * sum(w * t for w, t in zip(weights, taus)) / total



def regmean_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int]) -> LowRank:
    """RegMean on LoRA factors, exactly: ``ΔW = Σᵢ (λ wᵢ Bᵢ)(Aᵢ G̃ᵢ M⁻¹)``, rank Σ rᵢ.

    An expert without the module contributes nothing to the sum but its Gram matrix still enters
    ``M`` (its ΔW there is 0), as in the dense form.
    """
    weights, alpha, ridge, lam = _settings(p, len(parts))
    grams = _grams(p, len(parts), shape[1])
    if grams is None:
        total = sum(weights)
        return concat(parts, [lam * w / total for w in weights], shape)
    reduced, m = _system(grams, weights, alpha, ridge)
    used = [i for i, q in enumerate(parts) if q is not None and q.rank]
    if not used:
        return LowRank.zeros(shape, device=grams[0].device)
    # one solve for every expert's rows: [A₁G̃₁; …; A_TG̃_T] M⁻¹
    solved = _right_solve(torch.cat([parts[i].A.double() @ reduced[i] for i in used]), m)
    new_parts: list[LowRank | None] = [None] * len(parts)
    for i, a in zip(used, solved.split([parts[i].rank for i in used])):
        new_parts[i] = LowRank(parts[i].B, a.to(parts[i].A.dtype))
    return concat(new_parts, [lam * w for w in weights], shape)


@register("regmean", factors=regmean_factors, expert_params=("weight",), global_params=("alpha", "ridge", "lambda", "rows"),
          needs_gram=True, blockwise=_REGMEAN)
def regmean(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """RegMean (Jin et al., ICLR 2023, arXiv:2212.09849): the least-squares merge of linear layers.

    ``θ = θ₀ + λ (Σᵢ wᵢ δᵢ G̃ᵢ)(Σᵢ wᵢ G̃ᵢ + ρ I)⁻¹`` with ``G̃ᵢ = α Gᵢ + (1 − α) diag(Gᵢ)`` the
    expert's input Gram matrix (from ``p.stats``) with reduced off-diagonal, ``ρ = ridge ·
    mean(diag Σ wᵢ G̃ᵢ)``. Tensors without statistics: ``θ₀ + λ Σᵢ wᵢ δᵢ / Σᵢ wᵢ``. Defaults:
    ``alpha`` 0.9, ``ridge`` 1e-6, ``lambda`` 1, ``weight`` 1; ``rows`` (256) is how many data
    rows per expert the statistics pass reads. Row blocks: the rows of ``θ`` are independent
    given the Gram matrices, so ``M`` is factorised once (LU) and each block's rows are solved
    alone (memory: ``in²`` per expert, not the rows). See the module doc.
    """
    return run_whole(_REGMEAN, base, experts, p)


@register("regmean_pp", factors=regmean_factors, expert_params=("weight",),
          global_params=("alpha", "ridge", "lambda", "rows"), needs_gram=True, merged_stats=True,
          blockwise=_REGMEAN)
def regmean_pp(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """RegMean++ (Nguyen et al., 2025, arXiv:2508.03121): RegMean with each layer's statistics
    measured in the merged model.

    The same closed form as :func:`regmean`, ``θ = θ₀ + λ (Σᵢ wᵢ δᵢ G̃ᵢ)(Σᵢ wᵢ G̃ᵢ + ρ I)⁻¹``, with
    another ``Gᵢ``: RegMean takes the inputs expert ``i``'s own model gives layer ``l``;
    RegMean++ takes ``Gᵢ⁽ˡ⁾ = mean Xᵢ⁽ˡ⁾ᵀXᵢ⁽ˡ⁾`` over the inputs of layer ``l``'s linear modules
    when expert ``i``'s own layer ``l`` runs on what the *merged* layers ``< l`` (and the merged
    embeddings) make of expert ``i``'s rows — so the layers are merged one after another, each
    on the inputs it will see in the merged model (cross-layer dependencies), and the modules
    inside a layer on what that expert's layer feeds them (intra-layer). Layer 0 sees the merged
    embeddings: with LoRA experts (embeddings untouched) its statistics are RegMean's. The pass
    is :mod:`mergelab.merge.merged_stats`; tensors without statistics take ``θ₀ + λ Σᵢ wᵢ δᵢ / Σᵢ wᵢ``.
    Parameters and defaults as ``regmean`` (``alpha`` 0.9, ``ridge`` 1e-6, ``lambda`` 1,
    ``weight`` 1, ``rows`` 256); LoRA experts merge exactly in factor form (rank Σ rᵢ).
    """
    return regmean(base, experts, p)
