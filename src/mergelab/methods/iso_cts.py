"""Iso-CTS: isotropic merging in a common subspace plus task-specific subspaces.

Companion of ``iso_c`` (:mod:`mergelab.methods.lora_subspace`), with the same two forms: a dense
registry function, and an exact factor form for LoRA experts (``parts[i]`` is expert i's
``ΔWᵢ = Bᵢ Aᵢ`` as :class:`~mergelab.methods.lowrank.LowRank`, None when it lacks the module); the
factor form never forms an (out × in) matrix per expert. Where ``in ≤ out`` the dense form runs
over row blocks through column Gram matrices (:data:`_ISO_CTS`), like ``iso_c``'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import Block, Blockwise, MethodParams, Passes, register, row_chunks, run_whole
from mergelab.methods.lowrank import LowRank, concat, gram_svd, inv_sqrt, polar, thin_svd

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


@dataclass
class _IsoCts:
    """What every row block shares (float64; None: not a matrix). The chosen left vectors on some
    rows are ``U_c = M · common`` and ``Ûᵢ = τᵢ Aᵢ − U_c Bᵢ`` for ``(i, Aᵢ, Bᵢ)`` in ``tasks``;
    ``proj = (UᵀU)^(-1/2) · λσ̄ · V⊥ᵀ`` for their concatenation ``U``."""

    weights: list[float]
    lam: float
    common: torch.Tensor | None = None
    tasks: list[tuple[int, torch.Tensor, torch.Tensor]] | None = None
    proj: torch.Tensor | None = None


def _iso_cts_blocks(p: MethodParams, shape: tuple) -> bool:
    """The column Gram matrices are ``in × in``: row blocks only where ``in ≤ out``; a wider
    matrix takes the SVDs whole."""
    return len(shape) != 2 or shape[1] <= shape[0]


def _taus64(base: torch.Tensor, experts: Sequence[torch.Tensor], w: Sequence[float]) -> list[torch.Tensor]:
    return [(wi * (e - base)).double() for wi, e in zip(w, experts)]


def _iso_cts_u(base: torch.Tensor, experts: Sequence[torch.Tensor], st: _IsoCts) -> torch.Tensor:
    """``U = [U_c Û₁ … Û_T]`` on some rows (float64)."""
    taus = _taus64(base, experts, st.weights)
    uc = sum(taus) @ st.common
    return torch.cat([uc] + [taus[i] @ a - uc @ b for i, a, b in st.tasks], dim=1)


def _iso_cts_stats(passes: Passes, p: MethodParams, shape: tuple) -> _IsoCts:
    """Two passes. 1: ``Gᵢ = τᵢᵀτᵢ`` and ``Hᵢ = Mᵀτᵢ`` (float64), so ``MᵀM = Σ Hᵢ = V Σ² Vᵀ`` gives the
    common subspace (``U_c = M V_c Σ_c⁻¹``) and ``Gᵢ − CᵢᵀCᵢ`` (``Cᵢ = U_cᵀτᵢ = Σ_c⁻¹ V_cᵀ Hᵢ``) is
    the Gram matrix of ``τ̂ᵢ = (I − U_c U_cᵀ) τᵢ``, whose top eigenpairs give ``V̂ᵢ``, ``Σ̂ᵢ`` and
    ``Ûᵢ = τ̂ᵢ V̂ᵢ Σ̂ᵢ⁻¹``; V⊥ᵀ is whole. 2: ``UᵀU``, for ``U⊥ = U (UᵀU)^(-1/2)``."""
    w, lam = _weights(p, passes.n_experts), float(p.get("lambda", 1.0))
    fraction = _fraction(p)
    if len(shape) != 2:
        return _IsoCts(w, lam)
    n, dev, f64 = shape[1], passes.device, torch.float64
    used = [i for i, wi in enumerate(w) if wi != 0]
    grams = torch.zeros(len(used), n, n, dtype=f64, device=dev)
    cross = torch.zeros(len(used), n, n, dtype=f64, device=dev)
    for blk in passes():
        for rows in row_chunks(blk.base.shape[0], n, blk.base.device):
            taus = _taus64(blk.base[rows], [e[rows] for e in blk.experts], w)
            m = sum(taus)
            for g, h, i in zip(grams, cross, used):
                g.addmm_(taus[i].T, taus[i])
                h.addmm_(m.T, taus[i])
    mtm = cross.sum(0) if used else torch.zeros(n, n, dtype=f64, device=dev)
    s, v = gram_svd((mtm + mtm.T) / 2, shape)
    k, per = iso_cts_dims(s.numel(), len(w), fraction)
    common = v[:, :k] / s[:k]
    vs, ss, tasks = [v[:, :k]], [s[:k]], []
    top = float(s[0]) if s.numel() else 0.0
    for g, h, i in zip(grams, cross, used):
        norm = float(g.trace().clamp_min(0).sqrt())
        if per == 0 or norm == 0:
            continue
        c = common.T @ h
        r = g - c.T @ c
        sr, vr = gram_svd((r + r.T) / 2, shape)
        keep = min(per, int((sr > max(shape) * _EPS32 * max(top, norm)).sum()))
        if keep:
            a = vr[:, :keep] / sr[:keep]
            tasks.append((i, a, c @ a))
            vs.append(vr[:, :keep])
            ss.append(sr[:keep])
    grams = cross = mtm = g = h = r = c = None   # freed before the second pass
    st = _IsoCts(w, lam, common, tasks)
    width = sum(x.shape[1] for x in vs)
    if width == 0:
        st.proj = torch.zeros(0, n, dtype=f64, device=dev)
        return st
    gram_u = torch.zeros(width, width, dtype=f64, device=dev)
    for blk in passes():
        for rows in row_chunks(blk.base.shape[0], n, blk.base.device):
            u = _iso_cts_u(blk.base[rows], [e[rows] for e in blk.experts], st)
            gram_u.addmm_(u.T, u)
    vh = torch.cat(vs, dim=1).T
    vh_perp = inv_sqrt(vh @ vh.T, vh.shape) @ vh
    st.proj = (inv_sqrt(gram_u, (shape[0], width)) * (lam * float(torch.cat(ss).mean()))) @ vh_perp
    return st


def _iso_cts_apply(blk: Block, st: _IsoCts, p: MethodParams) -> torch.Tensor:
    base = blk.base
    if st.proj is None:
        taus = [wi * (e - base) for wi, e in zip(st.weights, blk.experts)]
        return base + st.lam * sum(taus) / len(taus)
    if st.proj.shape[0] == 0:
        return base.clone()
    out = torch.empty_like(base)
    for rows in row_chunks(base.shape[0], base.shape[1], base.device):   # λσ̄ U⊥ V⊥ᵀ = U · proj
        out[rows] = base[rows] + (_iso_cts_u(base[rows], [e[rows] for e in blk.experts], st) @ st.proj).to(base.dtype)
    return out


#: Iso-CTS's block form, through the tasks' column Gram matrices
_ISO_CTS = Blockwise(_iso_cts_stats, _iso_cts_apply, only_if=_iso_cts_blocks)


@register("iso_cts", factors=iso_cts_factors, expert_params=("weight",),
          global_params=("lambda", "common_space_fraction"), blockwise=_ISO_CTS)
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

    Where ``in ≤ out`` the same matrix comes from column Gram matrices summed in float64 over row
    blocks: ``Gᵢ = τᵢᵀτᵢ`` and ``Hᵢ = Mᵀτᵢ`` give ``MᵀM = Σ Hᵢ = V Σ² Vᵀ`` and each residual's
    ``τ̂ᵢᵀτ̂ᵢ = Gᵢ − CᵢᵀCᵢ`` (``Cᵢ = U_cᵀτᵢ = Σ_c⁻¹ V_cᵀ Hᵢ``), so ``U_c = M V_c Σ_c⁻¹`` and
    ``Uᵢ = τ̂ᵢ Vᵢ Σᵢ⁻¹`` block by block; a second pass sums ``UᵀU`` for ``U = [U_c U₁ … U_T]``,
    ``U⊥ = U (UᵀU)^(-1/2)``, and each block is ``θ₀ + U · (UᵀU)^(-1/2) · λσ̄ · V⊥ᵀ``. A wider matrix
    takes the SVDs whole.

    Paper: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025 (arXiv:2502.04959).
    """
    if _iso_cts_blocks(p, tuple(base.shape)):
        return run_whole(_ISO_CTS, base, experts, p)
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
