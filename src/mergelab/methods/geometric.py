"""Geometric merges: SLERP, Model Stock, and the geometric median of task vectors.

Notation as in :mod:`mergelab.methods.basic`: ``θ_0`` base, ``θ_i`` experts, ``δ_i = θ_i − θ_0``.
Each tensor is treated as one vector (flattened), except Model Stock with ``filter_wise: true``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import MethodParams, register
from mergelab.methods.sparsify import chunks

_DOT_THRESHOLD = 0.9995  # above this |cos|, the two vectors are treated as collinear (lerp)
_NORM_EPS = 1e-8


@register("slerp", n_experts=(1, 1), expert_params=("t",), global_params=("t",))
def slerp(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Spherical linear interpolation from the base (``t = 0``) to the one expert (``t = 1``).

    With ``cos Ω = ⟨θ_0, θ_1⟩ / (‖θ_0‖ ‖θ_1‖)`` (a norm below 1e-8 counts as 1):
    ``θ = sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1``, and the plain
    ``θ = (1−t) θ_0 + t θ_1`` when ``|cos Ω| > 0.9995`` (nearly collinear). ``t`` is required;
    give it as a list to vary it across layers, or per module with filters.

    Reference: Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985; used for
    model merging by mergekit (Goddard et al., arXiv:2403.13257) and by the top entries of the
    LLM Merging Competition.
    """
    t = p.per_expert("t", None)[0]
    if t is None:
        raise RecipeError("slerp needs the parameter t (0 = base, 1 = expert)",
                          hint="add e.g. `t: 0.5` to the method, or a list like `t: [0, 0.5, 1]`")
    t = float(t)
    v0, v1 = base, experts[0]
    n0, n1, dot = 0.0, 0.0, 0.0
    a, b = v0.reshape(-1), v1.reshape(-1)
    for sl in chunks(a.numel(), a.device):
        x, y = a[sl].double(), b[sl].double()
        n0 += float(x.dot(x))
        n1 += float(y.dot(y))
        dot += float(x.dot(y))
    n0, n1 = math.sqrt(n0), math.sqrt(n1)
    n0, n1 = (n0 if n0 > _NORM_EPS else 1.0), (n1 if n1 > _NORM_EPS else 1.0)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if abs(cos) > _DOT_THRESHOLD:
        c0, c1 = 1.0 - t, t
    else:
        omega = math.acos(cos)
        c0, c1 = math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return torch.add(v0 * c0, v1, alpha=c1)


@register("model_stock", n_experts=(2, None), global_params=("filter_wise",))
def model_stock(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Model Stock: move from the base towards the experts' average by a ratio set by the angle
    between their task vectors.

    ``cos θ`` = mean over expert pairs of ``⟨δ_i, δ_j⟩ / (‖δ_i‖ ‖δ_j‖)`` (norm products clamped
    to ≥ 1e-6); with ``k`` experts, ``t = k cos θ / (1 + (k−1) cos θ)`` (0 where the denominator
    is below 1e-6), ``θ = t · mean_i θ_i + (1−t) θ_0``. With ``filter_wise: true`` the angle and
    ``t`` are computed per row (output filter) instead of for the whole tensor. Needs ≥ 2 experts.

    Paper: Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024
    (arXiv:2403.19522).
    """
    k = len(experts)
    shape = base.shape
    if p.get("filter_wise", False):
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [e.unsqueeze(0) if e.dim() == 1 else e for e in experts]
    else:
        w0, ws = base.reshape(-1), [e.reshape(-1) for e in experts]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos),
                    k * cos / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


@register("geometric_median", expert_params=("weight",),
          global_params=("lambda", "max_iter", "eps", "tol"))
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
    weights = torch.tensor([float(w) for w in p.per_expert("weight", 1.0)], dtype=torch.float64)
    if (weights <= 0).any():
        raise RecipeError(f"geometric_median: weights must be positive, got {weights.tolist()}")
    max_iter, eps, tol = int(p.get("max_iter", 100)), float(p.get("eps", 1e-6)), float(p.get("tol", 1e-10))
    k = len(experts)
    b = base.reshape(-1)
    es = [e.reshape(-1) for e in experts]
    gram = torch.zeros(k, k, dtype=torch.float64)
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
    out = b.clone()
    lam = float(p.get("lambda", 1.0))
    for ci, e in zip(c.tolist(), es):
        out.add_(e - b, alpha=lam * ci)
    return out.view(base.shape)
