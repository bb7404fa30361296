"""Iso-CTS: isotropic merging in a common subspace plus task-specific subspaces.

Companion of ``iso_c`` (:mod:`mergelab.methods.lora_subspace`), with the same two forms: a dense
registry function, and an exact factor form for LoRA experts (``parts[i]`` is expert i's
``ΔWᵢ = Bᵢ Aᵢ`` as :class:`~mergelab.methods.lowrank.LowRank`, None when it lacks the module); the
factor form never forms an (out × in) matrix per expert.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import MethodParams, register
from mergelab.methods.lowrank import LowRank, concat, polar, thin_svd

_EPS32 = torch.finfo(torch.float32).eps


def _weights(p: MethodParams, n: int) -> list[float]:
    w = p.per_expert("weight", 1.0) if p.experts else [p.get("weight", 1.0)] * n
    if len(w) != n:
        raise RecipeError(f"{n} experts but {len(w)} per-expert parameter sets")
    return [float(x) for x in w]


def _fraction(p: MethodParams) -> float:
    f = p.get("common_space_fraction", 0.8)
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f <= 1:
        raise RecipeError(f"iso_cts: common_space_fraction must be a number in [0, 1], got {f!r}")
    return float(f)


def iso_cts_dims(rank: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """``(k, s)``: the common subspace's size and each task's, for a merged rank ``rank``.

    As the paper's code: ``k₀ = ⌊rank · fraction⌋``, ``s = round((rank − k₀)/T)`` (Python's
    rounding, half to even), capped at ``⌊rank/T⌋`` so that ``k = rank − T·s ≥ 0``.
    """
    if rank <= 0 or n_tasks <= 0:
        return max(rank, 0), 0
    s = min(rank // n_tasks, round((rank - int(rank * fraction)) / n_tasks))
    return rank - n_tasks * s, s


def _top(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], s: int, tol: float):
    u, sv, vh = svd
    keep = min(s, int((sv > tol).sum()))
    return u[:, :keep], sv[:keep], vh[:keep]


def _isotropic(blocks, lam: float, shape, device) -> LowRank:
    """``λ · σ̄ · U⊥ V⊥ᵀ`` from the chosen (U, S, Vh) blocks: U⊥, V⊥ the polar factors of the
    concatenated bases, σ̄ the mean of all the chosen singular values."""
    blocks = [b for b in blocks if b[1].numel()]
    if not blocks:
        return LowRank.zeros(shape, device=device)
    u = polar(torch.cat([b[0] for b in blocks], dim=1))
    vh = polar(torch.cat([b[2] for b in blocks], dim=0))
    sigma = torch.cat([b[1] for b in blocks]).mean()
    return LowRank(u * (lam * sigma), vh)


def iso_cts_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int]) -> LowRank:
    """Iso-CTS on factors; see :func:`iso_cts`. The SVD of ``Σ wᵢΔWᵢ`` and of each residual
    ``(I − U_c U_cᵀ) wᵢBᵢ Aᵢ`` come from :meth:`LowRank.svd` (QR of the factors); exact."""
    w, lam = _weights(p, len(parts)), float(p.get("lambda", 1.0))
    device = next((q.B.device for q in parts if q is not None), None)
    u, s, vh = concat(parts, w, shape).svd()
    k, per = iso_cts_dims(s.numel(), len(parts), _fraction(p))
    uc = u[:, :k]
    blocks = [(uc, s[:k], vh[:k])]
    top = float(s[0]) if s.numel() else 0.0
    for q, wi in zip(parts, w):
        if q is None or q.rank == 0 or wi == 0 or per == 0:
            continue
        b = q.B * wi
        residual = LowRank(b - uc @ (uc.T @ b), q.A)
        tol = max(shape) * _EPS32 * max(top, abs(wi) * q.norm())
        blocks.append(_top(residual.svd(), per, tol))
    return _isotropic(blocks, lam, shape, device)


@register("iso_cts", factors=iso_cts_factors, expert_params=("weight",),
          global_params=("lambda", "common_space_fraction"))
def iso_cts(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Isotropic merging in common and task-specific subspaces, Iso-CTS (Marczak et al., ICML 2025).

    Per matrix, with ``τᵢ`` the weighted task vectors (``wᵢ(θᵢ − θ₀)``) and ``M = Σᵢ τᵢ = U Σ Vᵀ``
    of rank ``r`` (numerically non-zero σ: ``min(out, in)`` for full fine-tunes, ≤ Σ rᵢ for LoRA
    experts, as the paper's LoRA code budgets it):

    1. the **common subspace** is M's top ``k`` triplets ``(U_c, Σ_c, V_c)``, and every task gets
       ``s`` more dimensions (``k₀ = ⌊r · common_space_fraction⌋``, ``s = round((r − k₀)/T)``
       capped at ``⌊r/T⌋``, ``k = r − T·s``);
    2. **task-specific subspaces**: each task's part outside the common one,
       ``τ̂ᵢ = (I − U_c U_cᵀ) τᵢ``, gives its top ``s`` triplets ``(Uᵢ, Σᵢ, Vᵢ)`` (numerically zero
       ones dropped);
    3. the bases ``[U_c U₁ … U_T]`` and ``[V_c V₁ … V_T]`` are replaced by their polar factors
       ``U⊥``, ``V⊥`` (nearest orthonormal), and all the chosen singular values by their mean ``σ̄``:

        θ = θ₀ + λ · σ̄ · U⊥ V⊥ᵀ.

    With one expert, or ``common_space_fraction: 1``, this is ``iso_c``. ``lambda`` is the paper's
    α (tuned on validation data there). Defaults: ``weight`` 1, ``lambda`` 1,
    ``common_space_fraction`` 0.8. Non-matrix tensors: ``θ₀ + λ · mean(wᵢ τᵢ)``, as ``iso_c``.
    On LoRA experts the merged ΔW comes out as exact factors of rank ≤ r.

    Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025 (arXiv:2502.04959).
    """
    w, lam = _weights(p, len(experts)), float(p.get("lambda", 1.0))
    taus = [wi * (e - base) for wi, e in zip(w, experts)]
    if base.dim() != 2:
        return base + lam * sum(taus) / len(taus)
    shape = tuple(base.shape)
    u, s, vh = thin_svd(sum(taus))
    k, per = iso_cts_dims(s.numel(), len(taus), _fraction(p))
    uc = u[:, :k]
    blocks = [(uc, s[:k], vh[:k])]
    top = float(s[0]) if s.numel() else 0.0
    if per:
        for t in taus:
            norm = float(torch.linalg.matrix_norm(t))
            if norm == 0:
                continue
            svd = torch.linalg.svd(t - uc @ (uc.T @ t), full_matrices=False)
            blocks.append(_top(svd, per, max(shape) * _EPS32 * max(top, norm)))
    return base + _isotropic(blocks, lam, shape, base.device).dense()
