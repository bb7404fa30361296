"""Subspace merges made for low-rank experts: ``cat``, ``tsv``, ``iso_c``, ``knots``.

Each method exists twice, with the same mathematics:

* a registry function ``fn(base, experts, p)`` on dense tensors (task vectors ``τᵢ = eᵢ − base``),
  so the methods also work on full fine-tunes and in the full-model engine;
* a factor function in the method's registered ``factors`` form, ``fn(parts, p, shape) -> LowRank``, used by the
  LoRA pipeline: ``parts[i]`` is expert i's ``ΔWᵢ = Bᵢ Aᵢ`` as :class:`~mergelab.methods.lowrank.LowRank`
  (``None`` when the adapter lacks the module: it contributes zero) and the result is the merged
  ΔW, again as factors. These never form an (out × in) matrix per expert: SVDs of sums and
  concatenations of ``Bᵢ Aᵢ`` come from QR factorisations of the stacked factors and one SVD of a
  small core (see :meth:`LowRank.svd`).

A dense task vector is handed to the factor code as its exact thin SVD ``τ = (U S) Vh``, so the
two forms agree to rounding. Singular directions with σ ≤ max(out, in)·ε·σ₁ (numerically zero)
are dropped everywhere: their vectors are arbitrary, and keeping them would make a result depend
on the SVD routine rather than on the inputs.

Parameters: ``weight`` (per expert, default 1) scales ``τᵢ``; ``lambda`` (default 1) scales the
merged task vector. Tensors that are not matrices (norms, biases) are merged as the methods'
reference implementations do: the mean of the weighted task vectors for ``tsv`` and ``iso_c``,
the plain sum for ``cat``, and the inner method itself for ``knots``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods.lowrank import LowRank, concat, gram_svd, inv_sqrt, polar, rank_tol, thin_svd
from mergelab.methods import Block, Blockwise, MethodParams, Passes, get_method, register, row_chunks, run_whole

# ------------------------------------------------------------------------------------ helpers


def _weights(p: MethodParams, n: int) -> list[float]:
    w = p.per_expert("weight", 1.0) if p.experts else [p.get("weight", 1.0)] * n
    if len(w) != n:
        raise RecipeError(f"{n} experts but {len(w)} per-expert parameter sets")
    try:
        return [float(x) for x in w]
    except (TypeError, ValueError):
        raise RecipeError(f"weight must be a number, got {w!r}") from None


def _number(p: MethodParams, key: str, default: float) -> float:
    v = p.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RecipeError(f"parameter {key!r} must be a number, got {v!r}")
    return float(v)


def _task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [e.float() - base.float() for e in experts]


def _mean_weighted(base, taus, w, lam):
    return base + lam * sum(wi * t for wi, t in zip(w, taus)) / len(taus)


# ------------------------------------------------------------------------------------ cat


def cat_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int]) -> LowRank:
    """Σ wᵢ ΔWᵢ as the concatenation ``[w₁B₁ … w_TB_T] @ [A₁; …; A_T]``; exact, rank Σ rᵢ."""
    return concat(parts, _weights(p, len(parts)), shape)


@register("cat", factors=cat_factors, linear_in_delta=True, elementwise=True, expert_params=("weight",))
def cat(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Exact concatenation of LoRA factors: ``θ = θ₀ + Σᵢ wᵢ τᵢ`` (``weight`` default 1).

    On adapters this is ``[w₁B₁ … w_TB_T] @ [A₁; …; A_T]`` — the merged adapter has rank Σ rᵢ
    and reproduces ``Σ wᵢ ΔWᵢ`` exactly, unlike averaging A and B separately (which adds cross
    terms ``BᵢAⱼ``). On dense task vectors it is task arithmetic with λ = 1. PEFT calls the same
    combination ``cat`` in ``add_weighted_adapter``.
    """
    w = _weights(p, len(experts))
    return base + sum(wi * t for wi, t in zip(w, _task_vectors(base, experts)))


# ------------------------------------------------------------------------------------ TSV-M


def _tsv_k(p: MethodParams, shape: tuple[int, int], n_tasks: int) -> int:
    k = p.get("k")
    if k is None:
        return max(1, min(shape) // max(n_tasks, 1))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecipeError(f"tsv: k (singular vectors kept per task) must be a positive integer, got {k!r}")
    return k


def _tsv(svds, w: Sequence[float], lam: float, k: int, shape: tuple[int, int], device) -> LowRank:
    us, ss, vhs = [], [], []
    for svd, wi in zip(svds, w):
        if svd is None or wi == 0 or svd[1].numel() == 0:
            continue
        u, s, vh = svd
        us.append(u[:, :k])
        ss.append(wi * s[:k])
        vhs.append(vh[:k])
    if not us:
        return LowRank.zeros(shape, device=device)
    u_perp = polar(torch.cat(us, dim=1))
    vh_perp = polar(torch.cat(vhs, dim=0))
    return LowRank(u_perp * (lam * torch.cat(ss)), vh_perp)


def tsv_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int]) -> LowRank:
    """TSV-M on factors (per-task SVDs from :meth:`LowRank.svd`); see :func:`tsv`."""
    svds = [q.svd() if q is not None and q.rank else None for q in parts]
    device = next((q.B.device for q in parts if q is not None), None)
    return _tsv(svds, _weights(p, len(parts)), _number(p, "lambda", 1.0),
                _tsv_k(p, shape, len(parts)), shape, device)


@dataclass
class _Tsv:
    """What every row block shares (float64; None: not a matrix): ``maps[i] = Vᵢ Σᵢ⁻¹`` (in × kᵢ,
    so that ``Uᵢ = τᵢ Vᵢ Σᵢ⁻¹``, None for a task left out) and ``proj = (UᵀU)^(-1/2) · λ diag(wᵢΣᵢ)
    · V⊥ᵀ`` (Σkᵢ × in), so that ``U⊥ diag(wᵢΣᵢ) V⊥ᵀ = U · proj``."""

    weights: list[float]
    lam: float
    maps: list[torch.Tensor | None] | None = None
    proj: torch.Tensor | None = None


def _tsv_blocks(p: MethodParams, shape: tuple) -> bool:
    """Each task's column Gram matrix is ``in × in``: row blocks only where ``in ≤ out``; a wider
    matrix takes the SVDs whole."""
    return len(shape) != 2 or shape[1] <= shape[0]


def _tsv_u(base: torch.Tensor, experts: Sequence[torch.Tensor], maps) -> torch.Tensor:
    """``U = [τ₁V₁Σ₁⁻¹ … τ_TV_TΣ_T⁻¹]`` on some rows (float64)."""
    taus = _task_vectors(base, experts)
    return torch.cat([t.double() @ a for t, a in zip(taus, maps) if a is not None], dim=1)


def _tsv_stats(passes: Passes, p: MethodParams, shape: tuple) -> _Tsv:
    """Two passes. 1: each ``τᵢᵀτᵢ = Vᵢ Σᵢ² Vᵢᵀ`` (float64), whose top ``k`` eigenpairs (the
    numerically zero ones dropped, as :func:`thin_svd`) are τᵢ's top singular triplets; V⊥ᵀ, the
    polar factor of ``[V₁ … V_T]ᵀ``, is whole. 2: ``UᵀU`` (Σkᵢ × Σkᵢ), for ``U⊥ = U (UᵀU)^(-1/2)``."""
    w, lam = _weights(p, passes.n_experts), _number(p, "lambda", 1.0)
    if len(shape) != 2:
        return _Tsv(w, lam)
    k, n = _tsv_k(p, shape, len(w)), shape[1]
    used = [i for i, wi in enumerate(w) if wi != 0]
    grams = torch.zeros(len(used), n, n, dtype=torch.float64, device=passes.device)
    for blk in passes():
        for rows in row_chunks(blk.base.shape[0], n, blk.base.device):
            for g, i in zip(grams, used):
                t = (blk.experts[i][rows].float() - blk.base[rows].float()).double()
                g.addmm_(t.T, t)
    maps: list[torch.Tensor | None] = [None] * len(w)
    vs, ss = [], []
    for g, i in zip(grams, used):
        s, v = gram_svd(g, shape)
        if s.numel():
            s, v = s[:k], v[:, :k]
            maps[i] = v / s
            vs.append(v)
            ss.append(w[i] * s)
    grams = g = None   # freed before the second pass
    if not vs:
        return _Tsv(w, lam, maps, torch.zeros(0, n, dtype=torch.float64, device=passes.device))
    gram_u = torch.zeros(sum(v.shape[1] for v in vs), sum(v.shape[1] for v in vs), dtype=torch.float64,
                         device=passes.device)
    for blk in passes():
        for rows in row_chunks(blk.base.shape[0], n, blk.base.device):
            u = _tsv_u(blk.base[rows], [e[rows] for e in blk.experts], maps)
            gram_u.addmm_(u.T, u)
    vh = torch.cat(vs, dim=1).T                                   # [V₁ … V_T]ᵀ, Σkᵢ × in
    vh_perp = inv_sqrt(vh @ vh.T, vh.shape) @ vh                   # its polar factor
    proj = (inv_sqrt(gram_u, (shape[0], vh.shape[0])) * (lam * torch.cat(ss))) @ vh_perp
    return _Tsv(w, lam, maps, proj)


def _tsv_apply(blk: Block, st: _Tsv, p: MethodParams) -> torch.Tensor:
    base = blk.base
    if st.proj is None:
        return _mean_weighted(base, _task_vectors(base, blk.experts), st.weights, st.lam)
    if st.proj.shape[0] == 0:
        return base.float().clone()
    out = torch.empty_like(base)
    for rows in row_chunks(base.shape[0], base.shape[1], base.device):   # U⊥ diag(wΣ) V⊥ᵀ = U · proj
        out[rows] = base[rows] + (_tsv_u(base[rows], [e[rows] for e in blk.experts], st.maps) @ st.proj).to(base.dtype)
    return out


#: TSV-M's block form, through each task's column Gram matrix
_TSV = Blockwise(_tsv_stats, _tsv_apply, only_if=_tsv_blocks)


@register("tsv", factors=tsv_factors, expert_params=("weight",), global_params=("k", "lambda"), blockwise=_TSV)
def tsv(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Task Singular Vectors merge, TSV-M (Gargiulo et al., CVPR 2025, arXiv:2412.00081).

    Per matrix, each task vector is compressed to its top-``k`` singular triplets
    ``τᵢ ≈ Uᵢ Σᵢ Vᵢᵀ`` (default ``k = min(out, in) // T``, the paper's 1/T share), the
    concatenations ``U = [U₁ … U_T]`` and ``Vᵀ = [V₁ᵀ; …; V_Tᵀ]`` are replaced by their nearest
    orthogonal matrices (polar factors ``U⊥ = P Qᵀ`` for ``U = P S Qᵀ``, likewise ``V⊥``) to remove
    interference between tasks' subspaces, and

        θ = θ₀ + λ · U⊥ · diag(w₁Σ₁, …, w_TΣ_T) · V⊥ᵀ.

    ``weight`` scales a task's singular values (1 in the paper), ``lambda`` the result (the
    paper's α, 1.0 for TSV-M). Non-matrix tensors: ``θ₀ + λ · mean(wᵢ τᵢ)``. On LoRA experts the
    per-task SVDs come from the factors, and the merged ΔW has rank ≤ Σ min(k, rᵢ).
    Where ``in ≤ out`` the same matrix comes from each ``τᵢᵀτᵢ = Vᵢ Σᵢ² Vᵢᵀ`` (float64, summed
    over row blocks) and, in a second pass, ``UᵀU`` for ``U = [τ₁V₁Σ₁⁻¹ … τ_TV_TΣ_T⁻¹]``: then
    ``U⊥ = U (UᵀU)^(-1/2)``, ``V⊥ᵀ = (VᵀV)^(-1/2) Vᵀ`` and each block is
    ``θ₀ + U · (UᵀU)^(-1/2) · λ diag(wᵢΣᵢ) · V⊥ᵀ``; a wider matrix takes the SVDs whole.
    """
    if _tsv_blocks(p, tuple(base.shape)):
        return run_whole(_TSV, base, experts, p)
    taus = _task_vectors(base, experts)
    w, lam = _weights(p, len(taus)), _number(p, "lambda", 1.0)
    if base.dim() != 2:
        return _mean_weighted(base, taus, w, lam)
    shape = tuple(base.shape)
    svds = [thin_svd(t) for t in taus]
    return base + _tsv(svds, w, lam, _tsv_k(p, shape, len(taus)), shape, base.device).dense()


# ------------------------------------------------------------------------------------ Iso-C


def _iso(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, lam: float) -> LowRank:
    if s.numel() == 0:
        return LowRank(u[:, :0], vh[:0])
    return LowRank(u * (lam * s.mean()), vh)


def iso_c_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int]) -> LowRank:
    """Iso-C on factors; see :func:`iso_c`."""
    summed = concat(parts, _weights(p, len(parts)), shape)
    return _iso(*summed.svd(), _number(p, "lambda", 1.0))


@dataclass
class _IsoC:
    """What every row block shares: ``P = λ σ̄ V Σ⁻¹ Vᵀ`` (in × in, float64; None: not a matrix)."""

    weights: list[float]
    lam: float
    proj: torch.Tensor | None = None


def _iso_c_blocks(p: MethodParams, shape: tuple) -> bool:
    """The column Gram matrix is ``in × in``: row blocks only where that is no larger than the
    matrix (``in ≤ out``); a wider matrix takes the SVD whole."""
    return len(shape) != 2 or shape[1] <= shape[0]


def _iso_c_stats(passes: Passes, p: MethodParams, shape: tuple) -> _IsoC:
    """One pass: ``MᵀM = V Σ² Vᵀ`` summed in float64 over the row chunks, then its eigenvectors;
    ``σ`` ≤ max(out, in)·ε·σ₁ are dropped as :func:`thin_svd` drops them."""
    w, lam = _weights(p, passes.n_experts), _number(p, "lambda", 1.0)
    if len(shape) != 2:
        return _IsoC(w, lam)
    gram = torch.zeros(shape[1], shape[1], dtype=torch.float64, device=passes.device)
    for blk in passes():
        for rows in row_chunks(blk.base.shape[0], shape[1], blk.base.device):
            m = sum(wi * t for wi, t in zip(w, _task_vectors(blk.base[rows], [e[rows] for e in blk.experts])))
            m = m.double()
            gram.addmm_(m.T, m)
    eig, v = torch.linalg.eigh(gram)
    s, v = eig.flip(0).clamp(min=0).sqrt(), v.flip(1)
    keep = int((s > rank_tol(s, shape)).sum())
    s, v = s[:keep], v[:, :keep]
    return _IsoC(w, lam, (v * (lam * s.mean() / s)) @ v.T if keep else torch.zeros_like(gram))


def _iso_c_apply(blk: Block, st: _IsoC, p: MethodParams) -> torch.Tensor:
    base = blk.base
    taus = _task_vectors(base, blk.experts)
    if st.proj is None:
        return _mean_weighted(base, taus, st.weights, st.lam)
    m = sum(wi * t for wi, t in zip(st.weights, taus))
    out = torch.empty_like(base)
    for rows in row_chunks(base.shape[0], base.shape[1], base.device):   # σ̄ U Vᵀ = σ̄ M V Σ⁻¹ Vᵀ
        out[rows] = base[rows] + (m[rows].double() @ st.proj).to(base.dtype)
    return out


#: Iso-C's block form, through the column Gram matrix of ``M``
_ISO_C = Blockwise(_iso_c_stats, _iso_c_apply, only_if=_iso_c_blocks)


@register("iso_c", factors=iso_c_factors, expert_params=("weight",), global_params=("lambda",), blockwise=_ISO_C)
def iso_c(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Isotropic merging in the common subspace, Iso-C (Marczak et al., ICML 2025, arXiv:2502.04959).

    Per matrix: ``M = Σᵢ wᵢ τᵢ = U Σ Vᵀ`` (task arithmetic), then every singular value is replaced
    by their mean ``σ̄`` so that no direction dominates:

        θ = θ₀ + λ · σ̄ · U Vᵀ.

    The mean is over the numerically non-zero singular values (for full-rank dense task vectors
    that is all of them, as in the paper; for LoRA sums of rank ρ ≤ Σ rᵢ it is the ρ values of
    the common subspace — the zero ones have no defined directions). ``lambda`` is the paper's α
    (tuned on validation data there). Non-matrix tensors: ``θ₀ + λ · mean(wᵢ τᵢ)``.
    Where ``in ≤ out`` the same matrix comes from ``MᵀM = V Σ² Vᵀ`` (summed in float64 over row
    blocks, one pass) as ``θ₀ + M · (λ σ̄ V Σ⁻¹ Vᵀ)`` block by block, since ``U = M V Σ⁻¹``; a wider
    matrix takes the SVD of ``M`` whole.
    """
    if _iso_c_blocks(p, tuple(base.shape)):
        return run_whole(_ISO_C, base, experts, p)
    taus = _task_vectors(base, experts)
    w, lam = _weights(p, len(taus)), _number(p, "lambda", 1.0)
    if base.dim() != 2:
        return _mean_weighted(base, taus, w, lam)
    m = sum(wi * t for wi, t in zip(w, taus))
    return base + _iso(*thin_svd(m), lam).dense()


# ------------------------------------------------------------------------------------ KnOTS


def _inner_method(p: MethodParams):
    name = p.get("merge", "ties")
    if not isinstance(name, str):
        raise RecipeError(f"knots: merge must be the name of a merge method, got {name!r}")
    if name == "knots":
        raise RecipeError("knots: merge cannot be knots itself", hint="use e.g. ties, dare_ties or task_arithmetic")
    return get_method(name)


def _knots_merge(u: torch.Tensor, s: torch.Tensor, vhs: Sequence[torch.Tensor], p: MethodParams) -> LowRank:
    """Merge the aligned per-task coefficients ``Vhᵢ`` (ρ × in) with the inner method; ``U S V̄``."""
    if s.numel() == 0:
        return LowRank(u[:, :0], vhs[0][:0])
    spec = _inner_method(p)
    v_bar = spec.fn(torch.zeros_like(vhs[0]), list(vhs), p)
    return LowRank(u * s, v_bar.to(u.dtype))


def knots_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int]) -> LowRank:
    """KnOTS on factors; see :func:`knots`.

    ``[ΔW₁ … ΔW_T] = [B₁ … B_T] · blockdiag(A₁, …, A_T)``. With ``[B₁ … B_T] = Q R`` and
    ``Aᵢᵀ = Qᵢ Rᵢ`` this is ``Q · [R₍₁₎R₁ᵀ … R₍T₎R_Tᵀ] · blockdiag(Q₁ᵀ, …)``, where ``R₍ᵢ₎`` are
    the columns of R for expert i; the SVD ``U' S V'ᵀ`` of the small middle matrix gives
    ``U = Q U'`` and ``Vhᵢ = V'ᵀ₍ᵢ₎ Qᵢᵀ`` exactly.
    """
    out, inn = shape
    present = [(i, q) for i, q in enumerate(parts) if q is not None and q.rank > 0]
    device = next((q.B.device for q in parts if q is not None), None)
    if not present:
        return LowRank.zeros(shape, device=device)
    qb, rb = torch.linalg.qr(torch.cat([q.B for _, q in present], dim=1))
    blocks, qs, col = [], [], 0
    for _, q in present:
        qa, ra = torch.linalg.qr(q.A.T)
        blocks.append(rb[:, col:col + q.rank].double() @ ra.double().T)
        qs.append(qa)
        col += q.rank
    core = torch.cat(blocks, dim=1)
    u_, s, vh_ = torch.linalg.svd(core, full_matrices=False)
    keep = int((s > rank_tol(s, (out, len(parts) * inn))).sum())
    u = qb @ u_[:, :keep].to(qb.dtype)
    s = s[:keep].to(qb.dtype)
    vh_ = vh_[:keep].to(qb.dtype)
    vhs = [torch.zeros(keep, inn, device=qb.device) for _ in parts]
    col = 0
    for (i, _), qa in zip(present, qs):
        vhs[i] = vh_[:, col:col + qa.shape[1]] @ qa.T
        col += qa.shape[1]
    return _knots_merge(u, s, vhs, p)


@register("knots", factors=knots_factors, random=True, expert_params=("weight", "density", "gamma", "epsilon"),
          global_params=("merge", "lambda", "density", "normalize", "gamma", "epsilon"))
def knots(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """KnOTS: align task updates by a joint SVD, then merge them (Stoica et al., ICLR 2025, arXiv:2410.19735).

    Per matrix, the task vectors are concatenated side by side and decomposed once,

        [τ₁ τ₂ … τ_T] = U S [Vh₁ Vh₂ … Vh_T],

    so every task is ``τᵢ = U S Vhᵢ`` in one shared basis ``U S``. The aligned coefficient
    matrices ``Vhᵢ`` (ρ × in) are merged by the method named in ``merge`` (default ``ties``;
    ``task_arithmetic``, ``dare_ties``, ... — with that method's parameters, e.g. ``density``,
    ``weight``, ``lambda``) as task vectors from a zero base, and

        θ = θ₀ + U S V̄,   V̄ = merge(0, [Vh₁ … Vh_T]).

    With a linear ``merge`` this equals that method on the τᵢ; the point of KnOTS is that TIES or
    DARE decide signs and sparsity in the aligned space, where LoRA updates are comparable
    entry by entry. Non-matrix tensors are merged by the inner method directly.
    """
    if base.dim() != 2:
        return _inner_method(p).fn(base, experts, p)
    taus = _task_vectors(base, experts)
    u, s, _ = thin_svd(torch.cat(taus, dim=1))
    # Vhᵢ = S⁻¹ Uᵀ τᵢ (the i-th block of Vh): exactly zero for an expert that changes nothing,
    # where the SVD's block would hold rounding noise that TIES would count as votes
    vhs = [(u.T @ t) / s[:, None] for t in taus]
    return base + _knots_merge(u, s, vhs, p).dense()

