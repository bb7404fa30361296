"""Low-rank algebra for ΔW = B @ A: exact SVD from the factors, truncation with its exact error,
concatenation of experts' factors, and a (randomised) low-rank approximation of a dense matrix.

Pure maths on tensors (layer L1): the adapter reader (:mod:`mergelab.io.adapter`) produces
:class:`LowRank` factors, the methods and the adapter merge path (:mod:`mergelab.merge.adapter`)
compute on them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class LowRank:
    """A matrix kept as ``B @ A`` (``B``: out × k, ``A``: k × in); float32 on any device."""

    B: torch.Tensor
    A: torch.Tensor

    def __post_init__(self) -> None:
        if self.B.dim() != 2 or self.A.dim() != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"LowRank needs B (out×k) and A (k×in); got {tuple(self.B.shape)} "
                             f"and {tuple(self.A.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    @property
    def rank(self) -> int:
        """The inner dimension k (an upper bound of the true rank)."""
        return self.B.shape[1]

    @staticmethod
    def zeros(shape: Sequence[int], device: torch.device | str | None = None) -> "LowRank":
        return LowRank(torch.zeros(shape[0], 0, device=device), torch.zeros(0, shape[1], device=device))

    def dense(self) -> torch.Tensor:
        return self.B @ self.A

    def to(self, device: torch.device | str) -> "LowRank":
        return LowRank(self.B.to(device), self.A.to(device))

    def scaled(self, c: float) -> "LowRank":
        return LowRank(self.B * c, self.A)

    def norm(self) -> float:
        """Frobenius norm of ``B @ A`` from the k × k Gram matrices: ‖BA‖² = Σ (BᵀB) ∘ (AAᵀ)."""
        if self.rank == 0:
            return 0.0
        g = (self.B.double().T @ self.B.double()) * (self.A.double() @ self.A.double().T)
        return float(g.sum().clamp_min(0).sqrt())

    def svd(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Exact thin SVD ``U, S, Vh`` of ``B @ A`` without forming it.

        ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (reduced QR), so ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``; the SVD
        ``R_B R_Aᵀ = U' S V'ᵀ`` of the small core gives ``U = Q_B U'`` and ``Vh = V'ᵀ Q_Aᵀ``.
        Cost O((out + in) k²) instead of O(out · in · min(out, in)). Singular values that are
        zero to working precision (≤ max(out, in) · ε · σ₁) are dropped with their vectors, so
        ``len(S)`` is the numerical rank.
        """
        if self.rank == 0:
            return (self.B.new_zeros(self.shape[0], 0), self.B.new_zeros(0),
                    self.A.new_zeros(0, self.shape[1]))
        qb, rb = torch.linalg.qr(self.B)
        qa, ra = torch.linalg.qr(self.A.T)
        core = (rb.double() @ ra.double().T)
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        keep = int((s > rank_tol(s, self.shape)).sum())
        u, s, vh = u[:, :keep].to(self.B.dtype), s[:keep].to(self.B.dtype), vh[:keep].to(self.A.dtype)
        return qb @ u, s, vh @ qa.T

    def balanced(self) -> "LowRank":
        """The same product with every column of B and row of A of equal norm (safer in fp16)."""
        if self.rank == 0:
            return self
        nb, na = self.B.square().sum(0), self.A.square().sum(1)
        ok = (nb > 0) & (na > 0)
        f = torch.where(ok, (na / torch.where(ok, nb, torch.ones_like(nb))).sqrt().sqrt(), torch.ones_like(nb))
        return LowRank(self.B * f, self.A / f[:, None])


def rank_tol(s: torch.Tensor, shape: Sequence[int]) -> float:
    if s.numel() == 0:
        return 0.0
    return float(s.max()) * max(shape) * torch.finfo(torch.float32).eps


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``U, S, Vh`` of a dense matrix with the numerically-zero part (σ ≤
    max(out, in)·ε·σ₁) dropped: those directions are arbitrary, so no result should depend on them."""
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    keep = int((s > rank_tol(s, m.shape)).sum())
    return u[:, :keep], s[:keep], vh[:keep]


def gram_svd(gram: torch.Tensor, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``S, V`` of a matrix ``X`` (of ``shape``) from its column Gram matrix ``XᵀX = V S² Vᵀ``
    (float64): singular values in descending order, the numerically zero ones (σ ≤
    max(out, in)·ε·σ₁, as :func:`thin_svd`) dropped with their vectors. ``U = X V S⁻¹``."""
    eig, v = torch.linalg.eigh(gram)
    s = eig.flip(0).clamp(min=0).sqrt()
    keep = int((s > rank_tol(s, shape)).sum())
    return s[:keep], v[:, v.shape[1] - keep:].flip(1)   # a copy: the dropped vectors are freed


def inv_sqrt(gram: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``(XᵀX)^(-1/2)`` on the numerical range of ``X`` (of ``shape``; the pseudo-inverse square
    root, float64), so that ``X (XᵀX)^(-1/2) = P Qᵀ`` for ``X = P Σ Qᵀ``: the polar factor
    :func:`polar` gives wherever ``X`` has full rank, from a matrix summed over row blocks."""
    s, v = gram_svd(gram, shape)
    return (v / s) @ v.T


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``P Qᵀ`` of ``x = P Σ Qᵀ``: the nearest matrix with orthonormal
    columns (or rows) to ``x`` (Procrustes)."""
    if x.numel() == 0:
        return x
    p_, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p_ @ qh


def concat(parts: Sequence[LowRank | None], coeffs: Sequence[float] | None = None,
           shape: Sequence[int] | None = None) -> LowRank:
    """``Σ cᵢ Bᵢ Aᵢ`` as one factorisation ``[c₁B₁ … c_TB_T] @ [A₁; …; A_T]`` (exact; rank Σ kᵢ;
    ``√|cᵢ|`` goes to each side).

    ``None`` parts (an adapter without this module) and zero coefficients contribute nothing.
    """
    coeffs = [1.0] * len(parts) if coeffs is None else list(coeffs)
    if len(coeffs) != len(parts):
        raise ValueError(f"{len(parts)} parts but {len(coeffs)} coefficients")
    bs, as_ = [], []
    for part, c in zip(parts, coeffs):
        if part is None or c == 0 or part.rank == 0:
            continue
        root = math.sqrt(abs(c))  # split |c| between the factors, keep the sign on B
        bs.append(part.B * math.copysign(root, c))
        as_.append(part.A * root)
    if not bs:
        if shape is None:
            shape = next(p.shape for p in parts if p is not None)
        ref = next((p for p in parts if p is not None), None)
        return LowRank.zeros(shape, device=ref.B.device if ref is not None else None)
    return LowRank(torch.cat(bs, dim=1), torch.cat(as_, dim=0))


def _pick_rank(s: torch.Tensor, total_sq: float, rank: int | None, energy: float | None) -> int:
    """How many leading singular values to keep for a rank cap and/or an energy threshold."""
    n = s.numel()
    k = n if rank is None else min(rank, n)
    if energy is not None and total_sq > 0:
        captured = torch.cumsum(s.double() ** 2, 0) / total_sq
        need = int((captured < energy - 1e-12).sum()) + 1  # first index reaching the threshold
        k = min(k, need, n)
    return max(k, 0)


def _split_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> LowRank:
    root = s.clamp_min(0).sqrt()
    return LowRank(u * root, root[:, None] * vh)


def truncate(lr: LowRank, rank: int | None = None, energy: float | None = None) -> tuple[LowRank, float]:
    """Best approximation of ``B @ A`` of rank ≤ ``rank`` (and/or keeping ``energy`` of ‖·‖²_F).

    Returns the factors (``U√S``, ``√S Vh``) and the relative Frobenius error
    ``‖BA − B'A'‖_F / ‖BA‖_F = sqrt(Σ_{i>k} σᵢ² / Σ σᵢ²)``, exact since every σ is known. With
    neither limit the result is the exact, minimal-rank re-factoring (error 0 up to rounding).
    """
    u, s, vh = lr.svd()
    total = float((s.double() ** 2).sum())
    k = _pick_rank(s, total, rank, energy)
    tail = float((s[k:].double() ** 2).sum())
    err = math.sqrt(tail / total) if total > 0 else 0.0
    return _split_factors(u[:, :k], s[:k], vh[:k]), err


def lowrank_approx(m: torch.Tensor, rank: int | None = None, energy: float | None = None, *,
                   generator: torch.Generator | None = None, oversample: int = 10,
                   power_iters: int = 2, exact_below: int = 512) -> tuple[LowRank, float]:
    """Rank-``rank`` (and/or ``energy``) approximation of a dense matrix and its relative error.

    Small matrices (min side ≤ ``exact_below``), and requests without a rank or near full rank,
    use the exact ``torch.linalg.svd``. Otherwise a randomised range finder (Halko, Martinsson &
    Tropp 2011, Alg. 4.4: Gaussian sketch of ``rank + oversample`` columns drawn from
    ``generator``, ``power_iters`` QR-stabilised power iterations) gives an orthonormal basis Q,
    and the SVD of the small ``Qᵀ M`` gives the factors; ``A = Uₖᵀ M`` is the exact projection.
    The error returned is always measured directly, ``‖M − BA‖_F / ‖M‖_F``, for the factors
    returned (so it is honest even where the randomised basis is not optimal).
    """
    m = m.float()
    rows, cols = m.shape
    full = min(rows, cols)
    total = _sq_norm(m)
    if total == 0:
        return LowRank.zeros(m.shape, device=m.device), 0.0
    want = full if rank is None else min(rank, full)
    if full <= exact_below or rank is None or want + oversample >= full // 2:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        k = _pick_rank(s, total, want, energy)
        lr = _split_factors(u[:, :k], s[:k], vh[:k])
    else:
        q = want + oversample
        omega = torch.randn(cols, q, generator=generator, dtype=torch.float32).to(m.device)
        basis, _ = torch.linalg.qr(m @ omega)
        for _ in range(power_iters):
            z, _ = torch.linalg.qr(m.T @ basis)
            basis, _ = torch.linalg.qr(m @ z)
        small = basis.T @ m                                   # q × cols
        u_s, s, vh = torch.linalg.svd(small, full_matrices=False)
        k = _pick_rank(s, total, want, energy)
        lr = _split_factors(basis @ u_s[:, :k], s[:k], vh[:k])
    return lr, relative_error(m, lr, total)


def _sq_norm(t: torch.Tensor) -> float:
    """‖t‖²_F accumulated in float64, without a float64 copy of ``t``."""
    return float(torch.linalg.vector_norm(t.reshape(-1), dtype=torch.float64)) ** 2


def relative_error(m: torch.Tensor, lr: LowRank, total_sq: float | None = None,
                   block_rows: int = 1024) -> float:
    """``‖M − B A‖_F / ‖M‖_F``, computed in row blocks (no second full-size temporary)."""
    if total_sq is None:
        total_sq = _sq_norm(m)
    if total_sq == 0:
        return 0.0 if lr.rank == 0 or lr.norm() == 0 else math.inf
    acc = 0.0
    for i in range(0, m.shape[0], block_rows):
        blk = m[i:i + block_rows].float()
        if lr.rank:
            blk = blk - lr.B[i:i + block_rows] @ lr.A
        acc += _sq_norm(blk)
    return math.sqrt(acc / total_sq)
