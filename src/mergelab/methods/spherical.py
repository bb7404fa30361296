"""Merges on the sphere: the Karcher mean, NuSLERP and Multi-SLERP (as mergekit 0.1.5 has them).

Notation as in :mod:`mergelab.methods.basic`: ``θ_0`` base, ``θ_i`` experts, ``δ_i = θ_i − θ_0``,
``w_i`` = ``weight``. Each tensor is one vector (flattened) unless a method says otherwise.

Every result here is a linear combination of the inputs with a few scalar coefficients, so the
methods make one pass over the tensors for the norms and inner products (accumulated in float64),
do the spherical geometry on those scalars, and one pass to form the result; no unit vectors or
tangent vectors of the tensor's size are ever held.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import Block, Blockwise, MethodParams, Passes, chunks, register, run_whole


def _weights(p: MethodParams, n: int) -> list[float]:
    w = p.per_expert("weight", 1.0) if p.experts else [p.get("weight", 1.0)] * n
    if len(w) != n:
        raise RecipeError(f"{n} experts but {len(w)} per-expert parameter sets")
    return [float(x) for x in w]


def _gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G_ij = ⟨v_i, v_j⟩`` of flat tensors, in float64 on the CPU, one pass in chunks."""
    k = len(vectors)
    g = torch.zeros(k, k, dtype=torch.float64)
    for sl in chunks(vectors[0].numel(), vectors[0].device):
        block = torch.stack([v[sl] for v in vectors]).double()
        g += (block @ block.T).cpu()
    return g


def _vectors(blk: Block, use_base: bool) -> list[torch.Tensor]:
    """The flat vectors a method works on in one block: task vectors ``δ_i``, or the experts."""
    return [(e - blk.base).reshape(-1) if use_base else e.reshape(-1) for e in blk.experts]


def _pass_gram(passes: Passes, use_base: bool) -> torch.Tensor:
    """:func:`_gram` of the whole tensor's vectors, summed block by block in the same chunks."""
    g = None
    for blk in passes():
        vs = _vectors(blk, use_base)
        g = _gram(vs) if g is None else g + _gram(vs)
    return g


def _combine(vectors: Sequence[torch.Tensor], coeffs: Sequence[float], shape, start: torch.Tensor | None = None) -> torch.Tensor:
    """``start + Σ c_i v_i`` (``start`` None: 0) as a new float32 tensor of ``shape``."""
    out = torch.zeros_like(vectors[0]) if start is None else start.reshape(-1).clone()
    for c, v in zip(coeffs, vectors):
        if c != 0.0:
            out.add_(v, alpha=float(c))
    return out.view(shape)


# ------------------------------------------------------------------------------------ Karcher


def karcher_coefficients(gram: torch.Tensor, alphas: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """The Karcher mean of the unit vectors ``u_i = v_i/‖v_i‖`` as ``Σ_j c_j v_j``: returns ``c``
    scaled by ``Σ_i α_i ‖v_i‖`` (so ``Σ_j c_j v_j`` is the merged tensor), from the Gram matrix
    ``G_ij = ⟨v_i, v_j⟩`` alone. See :func:`karcher` for the iteration."""
    k = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt()
    alphas_t = torch.tensor([float(a) for a in alphas], dtype=torch.float64)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros(k, dtype=torch.float64)
    inv = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))
    cos = gram * inv[:, None] * inv[None, :]          # ⟨u_i, u_j⟩
    a = torch.where(valid, alphas_t, torch.zeros_like(alphas_t))
    a = a / a.sum()
    sq = lambda c: float(c @ cos @ c)                 # noqa: E731  ‖Σ c_j u_j‖²
    c = a.clone()
    mean_norm = math.sqrt(max(sq(c), 0.0))
    if mean_norm < tol:
        c = torch.zeros(k, dtype=torch.float64)
        c[int(valid.nonzero()[0])] = 1.0
    else:
        c = c / mean_norm
    for _ in range(max_iter):
        dots = (cos @ c).clamp(-1.0, 1.0)              # ⟨mean, u_i⟩
        tangent = torch.zeros(k, dtype=torch.float64)
        for i in range(k):
            if not bool(valid[i]):
                continue
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            step = float(a[i]) * theta / math.sin(theta)
            tangent -= step * float(dots[i]) * c
            tangent[i] += step
        t_norm = math.sqrt(max(sq(tangent), 0.0))
        if t_norm < tol:
            break
        c = math.cos(t_norm) * c + math.sin(t_norm) * tangent / t_norm
        n = math.sqrt(max(sq(c), 0.0))
        if n > tol:
            c = c / n
    scale = float((alphas_t * norms).sum())
    return c * inv * scale


def _karcher_stats(passes: Passes, p: MethodParams, shape: tuple) -> list[float] | None:
    """Coefficients of the experts in the result (None: one expert, returned as it is)."""
    k = passes.n_experts
    if k == 1:
        return None
    w = _weights(p, k)
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise RecipeError(f"karcher: weights must be ≥ 0 with a positive sum, got {w}")
    alphas = [x / sum(w) for x in w]
    max_iter, tol = int(p.get("max_iter", 10)), float(p.get("tol", 1e-5))
    return karcher_coefficients(_pass_gram(passes, False), alphas, max_iter, tol).tolist()


def _karcher_apply(blk: Block, coeffs: list[float] | None, p: MethodParams) -> torch.Tensor:
    if coeffs is None:
        return blk.experts[0].clone()
    return _combine(_vectors(blk, False), coeffs, blk.base.shape)


_KARCHER = Blockwise(_karcher_stats, _karcher_apply)


@register("karcher", needs_base=False, expert_params=("weight",), global_params=("max_iter", "tol"),
          blockwise=_KARCHER)
def karcher(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """The Karcher (Riemannian, Fréchet) mean of the experts' directions on the unit sphere,
    scaled by their mean norm; the base takes no part (as in ``linear``).

    With ``u_i = θ_i/‖θ_i‖`` and ``α_i = w_i/Σ w_j`` (experts of norm ≤ ``tol`` are left out of
    the direction), ``μ`` minimises ``Σ_i α_i arccos²⟨μ, u_i⟩`` on the sphere, found by Riemannian
    gradient steps from the normalised weighted mean: the tangent
    ``g = Σ_i α_i (φ_i / sin φ_i)(u_i − cos φ_i μ)`` with ``φ_i = arccos⟨μ, u_i⟩`` (terms with
    ``φ_i < tol`` skipped), then the exponential map ``μ ← cos‖g‖ μ + sin‖g‖ g/‖g‖``, renormalised;
    stop when ``‖g‖ < tol`` or after ``max_iter`` steps.

        θ = (Σ_i α_i ‖θ_i‖) · μ.

    Defaults: ``weight`` 1 (mergekit 0.1.5 has no weights: equal ones), ``max_iter`` 10,
    ``tol`` 1e-5. One expert: returned as it is. Every iterate is a combination of the ``u_i``,
    so the iteration runs on the coefficients with the Gram matrix of the experts (float64): one
    pass over the tensor for the Gram matrix, one to form the result.

    Reference: Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl.
    Math. 30 (1977); Buss & Fillmore, "Spherical averages and applications to spherical splines
    and interpolation", ACM TOG 20 (2001); mergekit's ``karcher`` (arXiv:2603.04972).
    """
    return run_whole(_KARCHER, base, experts, p)


# ------------------------------------------------------------------------------------ NuSLERP


def _nuslerp_pairwise(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of the rows of two matrices (vectors along the last dimension), mergekit's rule."""
    n0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = ((v0 / n0) * (v1 / n1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    safe = torch.where(colinear, torch.ones_like(sin), sin)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / safe)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / safe)
    return c0 * v0 + c1 * v1


def _slerp_coefficients(t: float, n0: float, n1: float, dot: float) -> tuple[float, float]:
    n0, n1 = max(n0, 1e-7), max(n1, 1e-7)
    cos = max(-1.0, min(1.0, dot / (n0 * n1)))
    if 1 - cos * cos <= 1e-16:
        return 1 - t, t
    theta = math.acos(cos)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


def _nuslerp_stats(passes: Passes, p: MethodParams, shape: tuple) -> tuple[float, tuple[float, float] | None]:
    """``t``, and for the flattened form the two coefficients (from the 2 × 2 Gram matrix)."""
    w1, w2 = _weights(p, 2)
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    if not (bool(p.get("nuslerp_flatten", True)) or len(shape) < 2):
        return t, None
    g = _pass_gram(passes, bool(p.get("use_base", True)))
    return t, _slerp_coefficients(t, math.sqrt(g[0, 0]), math.sqrt(g[1, 1]), float(g[0, 1]))


def _nuslerp_apply(blk: Block, st: tuple, p: MethodParams) -> torch.Tensor:
    t, coeffs = st
    use_base, base = bool(p.get("use_base", True)), blk.base
    v0, v1 = (blk.experts[0] - base, blk.experts[1] - base) if use_base else (blk.experts[0], blk.experts[1])
    if coeffs is not None:
        out = torch.add(v0.reshape(-1) * coeffs[0], v1.reshape(-1), alpha=coeffs[1]).view(base.shape)
    elif bool(p.get("nuslerp_row_wise", False)):
        out = _nuslerp_pairwise(t, v0.transpose(0, -1), v1.transpose(0, -1)).transpose(0, -1)
    else:
        out = _nuslerp_pairwise(t, v0, v1)
    return out.add_(base) if use_base else out


def _nuslerp_blocks(p: MethodParams, shape: tuple) -> bool:
    """Row blocks hold whole vectors, except for the column form (``nuslerp_row_wise``)."""
    return bool(p.get("nuslerp_flatten", True)) or not bool(p.get("nuslerp_row_wise", False))


_NUSLERP = Blockwise(_nuslerp_stats, _nuslerp_apply, only_if=_nuslerp_blocks)


@register("nuslerp", n_experts=(2, 2), expert_params=("weight",),
          global_params=("nuslerp_flatten", "nuslerp_row_wise", "use_base"), blockwise=_NUSLERP)
def nuslerp(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """NuSLERP: spherical interpolation of two experts' task vectors, the position given by weights.

    ``t = w_2 / (w_1 + w_2)`` (0.5 when ``|w_1 + w_2| < 1e-6``); with ``v_i = δ_i``
    (``use_base: false``: ``v_i = θ_i``), ``cos Ω = ⟨v_1, v_2⟩ / (‖v_1‖ ‖v_2‖)`` (norms clamped to
    ≥ 1e-7),

        θ = θ_0 + sin((1−t)Ω)/sin Ω · v_1 + sin(tΩ)/sin Ω · v_2,

    and ``(1−t) v_1 + t v_2`` where ``1 − cos²Ω ≤ 1e-16`` (collinear). The vectors are the whole
    tensor (``nuslerp_flatten: true``, the default), else each row (``nuslerp_row_wise: false``)
    or each column (``nuslerp_row_wise: true``; mergekit's names). Defaults: ``weight`` 1,
    ``use_base`` true (mergekit: a config without ``base_model`` interpolates the weights themselves).
    Unlike ``slerp`` it needs no base at all and reads ``t`` off the experts' weights.

    Reference: mergekit's ``nuslerp`` (Goddard et al., arXiv:2403.13257); SLERP: Shoemake,
    SIGGRAPH 1985.
    """
    return run_whole(_NUSLERP, base, experts, p)


# ------------------------------------------------------------------------------------ Multi-SLERP


def _multislerp_stats(passes: Passes, p: MethodParams, shape: tuple) -> list[float] | None:
    """Coefficients of the vectors in ``θ − θ_0`` (None: one expert, returned as it is)."""
    k = passes.n_experts
    if k == 1:
        return None
    w = _weights(p, k)
    if p.get("normalize_weights", True):
        if abs(sum(w)) < 1e-12:
            raise RecipeError(f"multislerp: the weights {w} sum to zero, so they cannot be normalized",
                              hint="change the weights, or set normalize_weights: false")
        w = [x / sum(w) for x in w]
    eps = float(p.get("eps", 1e-8))
    gram = _pass_gram(passes, bool(p.get("use_base", True)))
    norms = gram.diagonal().clamp_min(0).sqrt()
    c = torch.tensor(w, dtype=torch.float64) / (norms + eps)     # m = Σ c_i v_i
    mean_norm = math.sqrt(max(float(c @ gram @ c), 0.0))
    if mean_norm < eps:
        if k == 2:
            return w
        raise RecipeError("multislerp: the weighted sum of the unit task vectors is zero (opposite "
                          "experts whose weights cancel), so it has no direction",
                          hint="change the weights")
    scale = float((torch.tensor(w, dtype=torch.float64) * norms).sum()) / mean_norm
    return (c * scale).tolist()


def _multislerp_apply(blk: Block, coeffs: list[float] | None, p: MethodParams) -> torch.Tensor:
    if coeffs is None:
        return blk.experts[0].clone()
    use_base = bool(p.get("use_base", True))
    return _combine(_vectors(blk, use_base), coeffs, blk.base.shape, blk.base if use_base else None)


_MULTISLERP = Blockwise(_multislerp_stats, _multislerp_apply)


@register("multislerp", expert_params=("weight",), global_params=("normalize_weights", "eps", "use_base"),
          blockwise=_MULTISLERP)
def multislerp(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Multi-SLERP: barycentric interpolation on the sphere of any number of task vectors.

    With ``v_i = δ_i`` (``use_base: false``: ``v_i = θ_i``), ``n_i = ‖v_i‖``, ``u_i = v_i/(n_i + ε)``
    and weights ``w_i`` (divided by ``Σ w_j`` when ``normalize_weights``), mergekit projects the
    ``u_i`` onto the tangent space at the normalised weighted mean ``μ = m/‖m‖``,
    ``m = Σ_i w_i u_i``, averages there and maps back with the exponential map. The weighted mean
    of the tangent vectors is ``m − ⟨m, μ⟩μ = 0`` exactly, so the map returns ``μ`` itself and

        θ = θ_0 + (Σ_i w_i n_i) · μ,

    i.e. the direction of the weighted mean of the unit task vectors with the weighted mean
    norm (mergekit computes the zero tangent in floating point: the two agree to rounding,
    ~1e-7 relative). When ``‖m‖ < ε`` (opposite vectors that cancel) two experts fall back to
    ``θ_0 + w_1 v_1 + w_2 v_2``, more are an error. One expert: returned as it is.
    Defaults: ``weight`` 1, ``normalize_weights`` true, ``eps`` 1e-8, ``use_base`` true
    (mergekit: a config without ``base_model`` interpolates the weights themselves).

    Reference: Goddard, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea),
    mergekit's ``multislerp``; Buss & Fillmore, ACM TOG 20 (2001).
    """
    return run_whole(_MULTISLERP, base, experts, p)
