"""Geometric merges: SLERP, Model Stock, and the geometric median of task vectors.

Notation as in :mod:`mergelab.methods.basic`: ``θ_0`` base, ``θ_i`` experts, ``δ_i = θ_i − θ_0``.
Each tensor is treated as one vector (flattened), except Model Stock with ``filter_wise: true``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import Block, Blockwise, MethodParams, Passes, chunks, register, run_whole

_DOT_THRESHOLD = 0.9995  # above this |cos|, the two vectors are treated as collinear (lerp)
_NORM_EPS = 1e-8


def _slerp_stats(passes: Passes, p: MethodParams, shape: tuple) -> tuple[float, float]:
    """The coefficients ``(c0, c1)`` of SLERP for the whole tensor (norms and angle in float64)."""
    t = p.per_expert("t", None)[0]
    if t is None:
        raise RecipeError("slerp needs the parameter t (0 = base, 1 = expert)",
                          hint="add e.g. `t: 0.5` to the method, or a list like `t: [0, 0.5, 1]`")
    t = float(t)
    n0, n1, dot = 0.0, 0.0, 0.0
    for blk in passes():
        a, b = blk.base.reshape(-1), blk.experts[0].reshape(-1)
        for sl in chunks(a.numel(), a.device):
            x, y = a[sl].double(), b[sl].double()
            n0 += float(x.dot(x))
            n1 += float(y.dot(y))
            dot += float(x.dot(y))
    n0, n1 = math.sqrt(n0), math.sqrt(n1)
    n0, n1 = (n0 if n0 > _NORM_EPS else 1.0), (n1 if n1 > _NORM_EPS else 1.0)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > _DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


def _slerp_apply(blk: Block, st: tuple[float, float], p: MethodParams) -> torch.Tensor:
    c0, c1 = st
    return torch.add(blk.base * c0, blk.experts[0], alpha=c1)


_SLERP = Blockwise(_slerp_stats, _slerp_apply)


@register("slerp", n_experts=(1, 1), expert_params=("t",), global_params=("t",), blockwise=_SLERP)
def slerp(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Spherical linear interpolation from the base (``t = 0``) to the one expert (``t = 1``).

    With ``cos Ω = ⟨θ_0, θ_1⟩ / (‖θ_0‖ ‖θ_1‖)`` (a norm below 1e-8 counts as 1):
    ``θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1``, and the plain
    ``θ = (1−t) θ_0 + t θ_1`` when ``|cos Ω| > 0.9995`` (nearly collinear). ``t`` is required;
    give it as a list to vary it across layers, or per module with filters.
    Whole-tensor statistics: the two norms and the dot product; the block rule is the weighted sum.

    Reference: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; used for
    model merging by mergekit (Goddard et al., arXiv:2403.13257) and by the top entries of the
    LLM Merging Competition.
    """
    return run_whole(_SLERP, base, experts, p)


def _stock_ratio(cos: torch.Tensor, k: int) -> torch.Tensor:
    """Model Stock's ``t = k cos θ / (1 + (k−1) cos θ)`` (0 where the denominator is below 1e-6)."""
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos),
                       k * cos / torch.where(singular, torch.ones_like(denominator), denominator))


def _stock_rows(w0: torch.Tensor, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per row (last dimension), the ratio ``t`` from the mean pairwise cosine of the offsets."""
    k = len(ws)
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return _stock_ratio(torch.stack(cosines).mean(dim=0).unsqueeze(-1), k)


def _stock_stats(passes: Passes, p: MethodParams, shape: tuple) -> float | None:
    """Whole-tensor ``t`` (None with ``filter_wise``: each row has its own, found in its block)."""
    if p.get("filter_wise", False):
        return None
    k, gram = None, None
    for blk in passes():
        b, es = blk.base.reshape(-1), [e.reshape(-1) for e in blk.experts]
        k = len(es)
        if gram is None:
            gram = torch.zeros(k, k, dtype=torch.float64)
        for sl in chunks(b.numel(), b.device):
            d = torch.stack([e[sl] - b[sl] for e in es]).double()
            gram += (d @ d.T).cpu()
    norms = gram.diagonal().sqrt()
    cos = [max(-1.0, min(1.0, float(gram[i, j]) / max(float(norms[i] * norms[j]), 1e-6)))
           for i in range(k) for j in range(i + 1, k)]
    return float(_stock_ratio(torch.tensor(sum(cos) / len(cos), dtype=torch.float64), k))


def _stock_apply(blk: Block, t: float | None, p: MethodParams) -> torch.Tensor:
    base, experts, k = blk.base, blk.experts, len(blk.experts)
    if t is None:  # filter-wise: rows are independent
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [e.unsqueeze(0) if e.dim() == 1 else e for e in experts]
        tr = _stock_rows(w0, ws)
        return (tr * (sum(ws) / k) + (1 - tr) * w0).reshape(base.shape)
    return (sum(experts) / k) * t + base * (1 - t)


_STOCK = Blockwise(_stock_stats, _stock_apply)


@register("model_stock", n_experts=(2, None), global_params=("filter_wise",), blockwise=_STOCK)
def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Model Stock: move from the base towards the experts' average by a ratio set by the angle
    between their task vectors.

    ``cos θ`` = mean over expert pairs of ``⟨δ_i, δ_j⟩ / (‖δ_i‖ ‖δ_j‖)`` (norm products clamped
    to ≥ 1e-6); with ``k`` experts, ``t = k cos θ / (1 + (k−1) cos θ)`` (0 where the denominator
    is below 1e-6), ``θ = t · mean_i θ_i + (1−t) θ_0``. With ``filter_wise: true`` the angle and
    ``t`` are computed per row (output filter) instead of for the whole tensor. Needs ≥ 2 experts.
    Whole-tensor statistics: the task vectors' Gram matrix (float64, chunk by chunk); the block
    rule is the weighted sum.

    Paper: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
    (arXiv:2403.19522).
    """
    return run_whole(_STOCK, base, experts, p)


def _median_stats(passes: Passes, p: MethodParams, shape: tuple) -> list[float]:
    """The Weiszfeld coefficients ``c`` of the median (from the task vectors' Gram matrix)."""
    weights = torch.tensor([float(w) for w in p.per_expert("weight", 1.0)], dtype=torch.float64)
    if (weights <= 0).any():
        raise RecipeError(f"geometric_median: weights must be positive, got {weights.tolist()}")
    max_iter, eps, tol = int(p.get("max_iter", 100)), float(p.get("eps", 1e-6)), float(p.get("tol", 1e-10))
    k = len(weights)
    gram = torch.zeros(k, k, dtype=torch.float64)
    for blk in passes():
        b, es = blk.base.reshape(-1), [e.reshape(-1) for e in blk.experts]
        for sl in chunks(b.numel(), b.device):
            d = torch.stack([e[sl] - b[sl] for e in es]).double()
            gram += (d @ d.T).cpu()
    nu = eps * math.sqrt(max(float(gram.diagonal().max()), 0.0))
    c = weights / weights.sum()
    for _ in range(max_iter):
        gc = gram @ c
        dist = (c @ gc - 2 * gc + gram.diagonal()).clamp_min(0).sqrt()
        beta = weights / dist.clamp_min(nu) if nu > 0 else weights / dist.clamp_min(1e-300)
        new = beta / beta.sum()
        done = float((new - c).abs().sum()) < tol
        c = new
        if done:
            break
    return c.tolist()


def _median_apply(blk: Block, c: list[float], p: MethodParams) -> torch.Tensor:
    lam = float(p.get("lambda", 1.0))
    out = blk.base.clone()
    for ci, e in zip(c, blk.experts):
        out.add_(e - blk.base, alpha=lam * ci)
    return out


_MEDIAN = Blockwise(_median_stats, _median_apply)


@register("geometric_median", expert_params=("weight",),
          global_params=("lambda", "max_iter", "eps", "tol"), blockwise=_MEDIAN)
def geometric_median(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """The (weighted) geometric median of the task vectors, by the smoothed Weiszfeld iteration.

    ``z* = argmin_z Σ_i w_i ‖z − δ_i‖``, ``θ = θ_0 + λ z*``. Weiszfeld's step is
    ``z ← Σ_i β_i δ_i / Σ_i β_i`` with ``β_i = w_i / max(‖z − δ_i‖, ν)``, starting from the
    weighted mean; ``ν = eps · max_i ‖δ_i‖`` smooths the step at the data points. Every iterate is
    a combination ``z = Σ_i c_i δ_i``, so the iteration runs on the coefficients ``c`` with the Gram
    matrix ``G_ij = ⟨δ_i, δ_j⟩`` (float64), using ``‖z − δ_j‖² = cᵀGc − 2(Gc)_j + G_jj``: one pass
    over the tensor for ``G``, one to form ``z*``. Stops when ``‖Δc‖₁ < tol``.
    Defaults: ``weight`` 1 (must be > 0), ``lambda`` 1, ``max_iter`` 100, ``eps`` 1e-6,
    ``tol`` 1e-10. The median resists an outlier expert, unlike the mean.

    Papers: Weiszfeld, Tohoku Math. J. 43 (1937); Pillutla, Kakade & Harchaoui, "Robust
    Aggregation for Federated Learning", IEEE TSP 2022 (arXiv:1912.13445).
    """
    return run_whole(_MEDIAN, base, experts, p)
