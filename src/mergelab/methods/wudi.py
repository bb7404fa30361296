"""WUDI merging: the merged task vector of each linear layer optimised against the task vectors
themselves, without data.

Notation as in :mod:`mergelab.methods.basic`: ``θ_0`` base, ``θ_i`` experts, ``τ_i = θ_i − θ_0``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import Block, Blockwise, MethodParams, Passes, register, row_chunks, run_whole

_BETA1, _BETA2, _ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, as the paper's code


def wudi_objective(merged: torch.Tensor, taus: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F`` (zero task vectors left out): the loss WUDI
    minimises, for tests and diagnostics."""
    loss = merged.new_zeros(())
    for t in taus:
        sq = t.square().sum()
        if float(sq) > 0:
            loss = loss + ((merged - t) @ t.T).square().sum() / sq
    return loss


def _gradient_terms(taus: Sequence[torch.Tensor]):
    """The objective's gradient ``2 (τ_m G − R)`` needs ``G = Σ_i c_i τ_iᵀ τ_i`` and
    ``R = Σ_i c_i τ_i τ_iᵀ τ_i`` (``c_i = 1/‖τ_i‖²``). Returns ``(apply, R)`` where ``apply(X)``
    is ``X G``: through the (in × in) matrix G when that is cheaper, else through the stacked task
    vectors (``X G = Σ_i c_i (X τ_iᵀ) τ_i``)."""
    live = [(t, 1.0 / float(t.square().sum())) for t in taus if float(t.square().sum()) > 0]
    out_dim, in_dim = taus[0].shape
    r = torch.zeros_like(taus[0])
    for t, c in live:
        if out_dim <= in_dim:
            r.add_((t @ t.T) @ t, alpha=c)
        else:
            r.add_(t @ (t.T @ t), alpha=c)
    if in_dim <= len(live) * out_dim:
        g = torch.zeros(in_dim, in_dim, dtype=taus[0].dtype, device=taus[0].device)
        for t, c in live:
            g.add_(t.T @ t, alpha=c)
        return (lambda x: x @ g), r
    stacked = torch.cat([t for t, _ in live], dim=0)                  # (T·out) × in
    scale = torch.cat([torch.full((out_dim,), c, dtype=stacked.dtype, device=stacked.device) for _, c in live])
    return (lambda x: ((x @ stacked.T) * scale) @ stacked), r


def _settings(p: MethodParams) -> tuple[int, float, float]:
    steps, lr, lam = p.get("steps", 300), float(p.get("lr", 1e-5)), float(p.get("lambda", 1.0))
    if isinstance(steps, bool) or not float(steps).is_integer() or int(steps) < 0:
        raise RecipeError(f"wudi: steps must be an integer ≥ 0, got {steps!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise RecipeError(f"wudi: lr must be a positive number, got {lr!r}")
    return int(steps), lr, lam


def _adam(merged: torch.Tensor, apply_g, r: torch.Tensor, steps: int, lr: float) -> None:
    """``steps`` Adam steps on ``merged`` (in place) with the gradient ``2 (apply_g(τ_m) − R)``."""
    m = torch.zeros_like(merged)
    v = torch.zeros_like(merged)
    for step in range(1, steps + 1):
        grad = apply_g(merged).sub_(r).mul_(2.0)
        m.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
        v.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
        denom = (v.sqrt() / math.sqrt(1 - _BETA2 ** step)).add_(_ADAM_EPS)
        merged.addcdiv_(m, denom, value=-lr / (1 - _BETA1 ** step))


@dataclass
class _Grams:
    """What every row block shares: ``Hᵢ = τ_iᵀτ_i/‖τ_i‖²`` (None for a zero task vector) and
    ``G = Σ_i Hᵢ``, float32 (in × in); ``g`` None: task arithmetic."""

    steps: int
    lr: float
    lam: float
    h: list[torch.Tensor | None] | None = None
    g: torch.Tensor | None = None


def _blocks_pay(p: MethodParams, shape: tuple) -> bool:
    """Row blocks hold one ``in × in`` matrix per expert: only where that is no larger than the
    tensor (``in ≤ out``: embeddings, output head, square and widening layers)."""
    return len(shape) != 2 or shape[1] <= shape[0]


def _wudi_stats(passes: Passes, p: MethodParams, shape: tuple) -> _Grams:
    """One pass: each expert's ``τ_iᵀτ_i`` summed in float64 over the row chunks (its trace is
    ``‖τ_i‖²``)."""
    steps, lr, lam = _settings(p)
    if len(shape) != 2 or steps == 0:
        return _Grams(steps, lr, lam)
    grams = [torch.zeros(shape[1], shape[1], dtype=torch.float64, device=passes.device)
             for _ in range(passes.n_experts)]
    for blk in passes():
        for rows in row_chunks(blk.base.shape[0], shape[1], blk.base.device):
            for gram, e in zip(grams, blk.experts):
                t = (e[rows] - blk.base[rows]).double()
                gram.addmm_(t.T, t)
    h: list[torch.Tensor | None] = []
    for i, gram in enumerate(grams):
        sq = float(gram.diagonal().sum())
        h.append(gram.mul_(1.0 / sq).float() if sq > 0 else None)
        grams[i] = None
    live = [x for x in h if x is not None]
    if not live:
        return _Grams(steps, lr, lam)
    return _Grams(steps, lr, lam, h, sum(x.double() for x in live).float())


def _wudi_apply(blk: Block, st: _Grams, p: MethodParams) -> torch.Tensor:
    base = blk.base
    taus = [e - base for e in blk.experts]
    merged = torch.stack(taus).sum(dim=0) if len(taus) > 1 else taus[0].clone()
    if st.g is not None:
        chunks = list(row_chunks(base.shape[0], base.shape[1], base.device))
        r = torch.zeros_like(merged)    # R = Σ_i τ_i Hᵢ, row chunk by row chunk
        for rows in chunks:
            for t, h in zip(taus, st.h):
                if h is not None:
                    r[rows].addmm_(t[rows], h)
        del taus
        grad = torch.empty_like(merged)

        def apply_g(x: torch.Tensor) -> torch.Tensor:
            for rows in chunks:
                torch.matmul(x[rows], st.g, out=grad[rows])
            return grad

        _adam(merged, apply_g, r, st.steps, st.lr)
    return merged.mul_(st.lam).add_(base)


#: WUDI's block form: the rows of ``τ_m`` are independent problems given the ``Hᵢ``
_WUDI = Blockwise(_wudi_stats, _wudi_apply, only_if=_blocks_pay)


@register("wudi", global_params=("steps", "lr", "lambda"), blockwise=_WUDI)
def wudi(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """WUDI merging: per linear layer, the merged task vector ``τ_m`` that interferes least with
    each task's inputs, using the task vector's own rows as that input subspace.

    For a weight matrix (out × in), starting from ``τ_m = Σ_i τ_i``, ``steps`` Adam steps
    (learning rate ``lr``; β = (0.9, 0.999), ε = 1e-8, as ``torch.optim.Adam``) minimise

        L(τ_m) = Σ_i ‖(τ_m − τ_i) τ_iᵀ‖²_F / ‖τ_i‖²_F,

    with the exact gradient ``∇L = 2 (τ_m G − R)``, ``G = Σ_i τ_iᵀτ_i/‖τ_i‖²``,
    ``R = Σ_i τ_i τ_iᵀ τ_i/‖τ_i‖²`` (formed once; each step costs one ``out × in × min(in, T·out)``
    product), and ``θ = θ_0 + λ τ_m``. The rows are independent problems, so this is RegMean's
    least-squares merge with each task's Gram matrix replaced by its own ``τ_iᵀτ_i``; Adam from
    the sum stops well short of that optimum, which is the paper's recipe. Other tensors (norms,
    biases): task arithmetic, ``θ_0 + λ Σ_i τ_i``; so does ``steps: 0`` (give it per module with a
    filter, e.g. for the embeddings, whose cost is ``vocab × hidden²`` per step).
    Row blocks (where ``in ≤ out``): a first pass sums each ``τ_iᵀτ_i`` (in float64), then each
    block's rows take their Adam steps alone, with ``R``'s rows ``Σ_i τ_i τ_iᵀτ_i/‖τ_i‖²`` formed
    from the block (memory: ``in²`` per expert; a narrowing layer, ``in > out``, is merged whole).
    Defaults (the paper's code): ``steps`` 300, ``lr`` 1e-5, ``lambda`` 1. Nothing is random: the
    result is deterministic on the CPU. Zero task vectors take no part in the objective.

    Paper: Cheng et al., "Whoever Started the Interference Should End It: Guiding Data-Free Model
    Merging via Task Vectors", ICML 2025 (arXiv:2503.08099).
    """
    if _blocks_pay(p, tuple(base.shape)):
        return run_whole(_WUDI, base, experts, p)
    steps, lr, lam = _settings(p)   # a narrowing layer (in > out), never split: no in × in per expert
    taus = [e - base for e in experts]
    merged = torch.stack(taus).sum(dim=0) if len(taus) > 1 else taus[0].clone()
    if steps > 0 and any(float(t.abs().max()) > 0 for t in taus):
        apply_g, r = _gradient_terms(taus)
        _adam(merged, apply_g, r, steps, lr)
    return merged.mul_(lam).add_(base)
