"""The methods of issue 18 (karcher, nuslerp, multislerp, sce, nearswap, wudi, iso_cts): each
against a hand computation on small tensors, on the fixture models (the merged model loads in
transformers and each tensor is the method applied to that tensor), and on LoRA experts in ΔW space.
Equality with mergekit 0.1.5 is in tests/test_mergekit_compat.py."""
from __future__ import annotations

import math
import re

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.io.checkpoint import CheckpointReader
from mergelab.merge import merge
from mergelab.methods import MethodParams, get_method
from mergelab.methods.iso_cts import iso_cts_dims
from mergelab.methods.lowrank import LowRank
from mergelab.methods.wudi import wudi_objective
from mergelab.recipe import load_recipe, resolve_params
from mergelab.testing import load_model

NEW = ("karcher", "nuslerp", "multislerp", "sce", "nearswap", "wudi", "iso_cts")
R2 = math.sqrt(2.0)


def run(name, base, experts, experts_params=None, **globals_):
    p = MethodParams(globals=globals_, experts=experts_params or [{} for _ in experts])
    return get_method(name).fn(base, experts, p)


def unit(i, shape=(4, 3)):
    """The matrix with a single 1 at flat position i."""
    out = torch.zeros(shape)
    out.view(-1)[i] = 1.0
    return out


BASE = torch.arange(12, dtype=torch.float32).view(4, 3) / 10


# ------------------------------------------------------------------------------------- karcher


def test_karcher_is_the_geodesic_mean_scaled_by_the_mean_norm():
    zero = torch.zeros(4, 3)
    # equal weights: the midpoint of the quarter circle, with the mean norm (2 + 4)/2
    got = run("karcher", zero, [2 * unit(0), 4 * unit(5)])
    torch.testing.assert_close(got, 3 * (unit(0) + unit(5)) / R2, rtol=0, atol=1e-6)
    # weights 3:1 → a quarter of the way along the 90° arc; the norm is the weighted mean 2
    got = run("karcher", zero, [2 * unit(0), 2 * unit(5)], [{"weight": 3.0}, {"weight": 1.0}])
    a = math.pi / 8
    torch.testing.assert_close(got, 2 * (math.cos(a) * unit(0) + math.sin(a) * unit(5)), rtol=0, atol=1e-6)
    # three orthogonal directions: by symmetry the normalised sum; the base takes no part
    got = run("karcher", BASE, [unit(0), unit(4), unit(8)])
    torch.testing.assert_close(got, (unit(0) + unit(4) + unit(8)) / math.sqrt(3), rtol=0, atol=1e-6)
    assert not get_method("karcher").needs_base
    # one expert comes back as it is; a zero expert is left out of the direction, kept in the norm
    torch.testing.assert_close(run("karcher", zero, [BASE]), BASE)
    torch.testing.assert_close(run("karcher", zero, [2 * unit(1), zero]), unit(1), rtol=0, atol=1e-7)


# ------------------------------------------------------------------------------------- nuslerp


def test_nuslerp_by_hand():
    v1, v2 = unit(0), unit(1)  # orthogonal task vectors of norm 1: Ω = 90°
    got = run("nuslerp", BASE, [BASE + v1, BASE + v2], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, BASE + (v1 + v2) / R2, rtol=0, atol=1e-6)
    # t = w₂/(w₁ + w₂) = 1/3: sin(2Ω/3)/sin Ω = √3/2, sin(Ω/3) = 1/2
    got = run("nuslerp", BASE, [BASE + v1, BASE + v2], [{"weight": 2.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, BASE + math.sqrt(3) / 2 * v1 + 0.5 * v2, rtol=0, atol=1e-6)
    # collinear: plain interpolation of the vectors themselves (their norms are not interpolated)
    got = run("nuslerp", BASE, [BASE + v1, BASE + 3 * v1], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, BASE + 2 * v1, rtol=0, atol=1e-6)
    # use_base: false interpolates the weights themselves (mergekit without base_model)
    got = run("nuslerp", BASE, [v1, v2], [{"weight": 1.0}, {"weight": 1.0}], use_base=False)
    torch.testing.assert_close(got, (v1 + v2) / R2, rtol=0, atol=1e-6)


def test_nuslerp_row_wise_and_column_wise():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [4.0, 0.0]])  # row 0: 90°, row 1: collinear
    rows = run("nuslerp", torch.zeros(2, 2), [a, b], [{"weight": 1.0}, {"weight": 1.0}], nuslerp_flatten=False)
    torch.testing.assert_close(rows, torch.tensor([[1 / R2, 1 / R2], [3.0, 0.0]]), rtol=0, atol=1e-6)
    # nuslerp_row_wise: true takes the vectors along dim 0 (mergekit's name): column 0 is
    # (1, 2) vs (0, 4) at cos Ω = 2/√5; column 1 is (0, 0) vs (1, 0), where the zero vector's
    # norm is clamped to 1e-7 so cos Ω = 0
    cols = run("nuslerp", torch.zeros(2, 2), [a, b], [{"weight": 1.0}, {"weight": 1.0}],
               nuslerp_flatten=False, nuslerp_row_wise=True)
    want = torch.stack([_slerp_half(a[:, j], b[:, j]) for j in range(2)], dim=1)
    torch.testing.assert_close(cols, want, rtol=0, atol=1e-6)


def _slerp_half(x, y):
    nx, ny = max(float(x.norm()), 1e-7), max(float(y.norm()), 1e-7)
    om = math.acos(max(-1.0, min(1.0, float(x @ y) / (nx * ny))))
    return (math.sin(om / 2) * x + math.sin(om / 2) * y) / math.sin(om)


# ------------------------------------------------------------------------------------- multislerp


def test_multislerp_is_the_mean_direction_with_the_mean_norm():
    v = [2 * unit(0), 4 * unit(5)]
    got = run("multislerp", BASE, [BASE + x for x in v])
    torch.testing.assert_close(got, BASE + 3 * (unit(0) + unit(5)) / R2, rtol=0, atol=1e-6)
    # weights 3:1 → direction of 0.75 e₀ + 0.25 e₅ (unit vectors), norm 0.75·2 + 0.25·4
    got = run("multislerp", BASE, [BASE + x for x in v], [{"weight": 3.0}, {"weight": 1.0}])
    d = (0.75 * unit(0) + 0.25 * unit(5)) / math.sqrt(0.75 ** 2 + 0.25 ** 2)
    torch.testing.assert_close(got, BASE + 2.5 * d, rtol=0, atol=1e-6)
    # not normalised: the norm is Σ wᵢ nᵢ
    got = run("multislerp", BASE, [BASE + x for x in v], [{"weight": 3.0}, {"weight": 1.0}], normalize_weights=False)
    torch.testing.assert_close(got, BASE + 10 * d, rtol=0, atol=1e-5)
    # opposite vectors cancel: two fall back to the weighted sum, three are an error
    got = run("multislerp", BASE, [BASE + unit(0), BASE - unit(0)], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, BASE, rtol=0, atol=1e-6)
    with pytest.raises(RecipeError, match="no direction"):
        run("multislerp", BASE, [BASE + unit(0), BASE - unit(0), BASE + unit(1)],
            [{"weight": 1.0}, {"weight": 1.0}, {"weight": 0.0}])


# ------------------------------------------------------------------------------------- sce


def test_sce_selects_weighs_and_erases_by_hand():
    base = torch.zeros(2, 2)
    d1, d2 = torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([[2.0, 1.0], [0.0, -1.0]])
    # energies mean(δ²) = 3.5 and 1.5 → c = (0.7, 0.3); signs of the sum (3, −1, 0, 2) = (+, −, +, +)
    got = run("sce", base, [d1, d2])
    torch.testing.assert_close(got, torch.tensor([[(0.7 * 1 + 0.3 * 2) / 1.0, -2.0], [0.0, 3.0]]))
    # select_topk 0.5: variances (0.25, 2.25, 0, 4), 3 non-zero → k = 1 keeps the last entry;
    # δ₂'s −1 there disagrees with the sign of the sum
    got = run("sce", base, [d1, d2], select_topk=0.5)
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [0.0, 3.0]]))
    # tiny task vectors (Σ mean δ² < 1e-6): equal weights, as mergekit does
    got = run("sce", base, [1e-4 * d1, 1e-4 * d2])
    torch.testing.assert_close(got, 1e-4 * torch.tensor([[1.5, -2.0], [0.0, 3.0]]))
    # lambda scales the merged task vector; the base is added back
    got = run("sce", BASE[:2, :2], [BASE[:2, :2] + d1, BASE[:2, :2] + d2], **{"lambda": 0.5})
    torch.testing.assert_close(got, BASE[:2, :2] + 0.5 * torch.tensor([[1.3, -2.0], [0.0, 3.0]]))


# ------------------------------------------------------------------------------------- nearswap


def test_nearswap_moves_each_entry_at_most_t_towards_the_expert():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    expert = torch.tensor([0.001, 0.5, -2.0, 1.0])
    # w = clamp(t/|Δ|, 0, 1) = (1, 0.2, 0.05, 1)
    got = run("nearswap", base, [expert], t=0.1)
    torch.testing.assert_close(got, torch.tensor([0.001, 0.1, -0.1, 1.0]))
    with pytest.raises(RecipeError, match="needs the parameter t"):
        run("nearswap", base, [expert])


# ------------------------------------------------------------------------------------- wudi


def test_wudi_first_adam_step_by_hand():
    """τ₁ = [1 0], τ₂ = [1 1] (first rows; second rows zero): τ_m = [2 1], the residuals
    (τ_m − τᵢ)τᵢᵀ are 1 and 1, ∇L = 2(1·[1 0]/1 + 1·[1 1]/2) = [3 1]; Adam's first step is
    lr · sign(∇L)."""
    t1, t2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert float(wudi_objective(t1 + t2, [t1, t2])) == pytest.approx(1.5)
    got = run("wudi", BASE[:2, :2], [BASE[:2, :2] + t1, BASE[:2, :2] + t2], steps=1, lr=0.01)
    torch.testing.assert_close(got, BASE[:2, :2] + torch.tensor([[1.99, 0.99], [0.0, 0.0]]), rtol=0, atol=1e-6)
    # lambda scales the result; steps 0 is task arithmetic
    got = run("wudi", BASE[:2, :2], [BASE[:2, :2] + t1, BASE[:2, :2] + t2], steps=1, lr=0.01, **{"lambda": 2.0})
    torch.testing.assert_close(got, BASE[:2, :2] + torch.tensor([[3.98, 1.98], [0.0, 0.0]]), rtol=0, atol=1e-6)
    got = run("wudi", BASE[:2, :2], [BASE[:2, :2] + t1, BASE[:2, :2] + t2], steps=0)
    torch.testing.assert_close(got, BASE[:2, :2] + t1 + t2)


def test_wudi_keeps_non_interfering_sums_and_lowers_the_objective():
    # task vectors whose rows are orthogonal across tasks do not interfere: the sum is optimal
    t1, t2 = 2 * unit(0) + unit(3), -unit(7) + 3 * unit(10)   # rows use columns 0 and 1 only
    got = run("wudi", BASE, [BASE + t1, BASE + t2], steps=20, lr=0.1)
    torch.testing.assert_close(got, BASE + t1 + t2, rtol=0, atol=1e-6)
    # one expert: its task vector is the optimum
    torch.testing.assert_close(run("wudi", BASE, [BASE + t1], steps=20, lr=0.1), BASE + t1, rtol=0, atol=1e-6)
    # interfering tasks: the objective falls, towards the least-squares optimum R G⁻¹
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(4, 3, generator=g) for _ in range(3)]
    got = run("wudi", torch.zeros(4, 3), taus, steps=3000, lr=1e-2)
    c = [1 / float(t.square().sum()) for t in taus]
    gram = sum(ci * t.T @ t for ci, t in zip(c, taus))
    best = sum(ci * t @ t.T @ t for ci, t in zip(c, taus)) @ torch.linalg.inv(gram)
    assert float(wudi_objective(got, taus)) < 0.5 * float(wudi_objective(sum(taus), taus))
    torch.testing.assert_close(got, best, rtol=0, atol=2e-2)
    # vectors (norms, biases): task arithmetic
    v = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(run("wudi", v, [v + 1, v - 3], **{"lambda": 0.5}), v - 1)


def test_wudi_matches_autograd_and_torch_adam():
    """The paper's code: autograd of the objective, torch.optim.Adam, from the sum."""
    g = torch.Generator().manual_seed(1)
    for shape in [(6, 5), (3, 9)]:  # both ways of applying G
        taus = [0.1 * torch.randn(*shape, generator=g) for _ in range(3)]
        ref = torch.nn.Parameter(sum(taus).clone())
        opt = torch.optim.Adam([ref], lr=1e-3, foreach=False)
        for _ in range(40):
            opt.zero_grad()
            wudi_objective(ref, taus).backward()
            opt.step()
        got = run("wudi", torch.zeros(shape), taus, steps=40, lr=1e-3)
        torch.testing.assert_close(got, ref.detach(), rtol=0, atol=2e-6)


def test_wudi_refuses_bad_steps_and_lr():
    with pytest.raises(RecipeError, match="steps"):
        run("wudi", BASE, [BASE + unit(0)], steps=-1)
    with pytest.raises(RecipeError, match="lr"):
        run("wudi", BASE, [BASE + unit(0)], lr=0)


# ------------------------------------------------------------------------------------- iso_cts


def _e(i, n):
    return torch.eye(n)[i]


def test_iso_cts_by_hand():
    """5×4, two tasks, common_space_fraction 0.5: r = 4, k₀ = 2, s = round(2/2) = 1, k = 2.
    M = 4 e₀f₀ᵀ + 3 e₁f₁ᵀ + 1.1 e₂f₂ᵀ + 0.8 e₃f₃ᵀ: the common space is (e₀, e₁); outside it τ₁
    is 0.9 e₂f₂ᵀ and τ₂ is 0.2 e₂f₂ᵀ + 0.8 e₃f₃ᵀ, whose top directions are e₂ and e₃. The chosen
    singular values (4, 3, 0.9, 0.8) have mean 2.175 (Iso-C: the mean of M's, 2.225)."""
    def outer(i, c):
        return c * torch.outer(_e(i, 5), _e(i, 4))
    t1 = outer(0, 4.0) + outer(2, 0.9)
    t2 = outer(1, 3.0) + outer(2, 0.2) + outer(3, 0.8)
    assert iso_cts_dims(4, 2, 0.5) == (2, 1)
    zero = torch.zeros(5, 4)
    got = run("iso_cts", zero, [t1, t2], common_space_fraction=0.5)
    torch.testing.assert_close(got, 2.175 * torch.eye(5, 4), rtol=0, atol=1e-5)
    torch.testing.assert_close(run("iso_c", zero, [t1, t2]), 2.225 * torch.eye(5, 4), rtol=0, atol=1e-5)
    # in rotated bases the answer rotates with them; λ and the base are applied as in iso_c
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g))
    p, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    got = run("iso_cts", BASE.new_ones(5, 4), [1 + q @ t1 @ p.T, 1 + q @ t2 @ p.T],
              common_space_fraction=0.5, **{"lambda": 0.5})
    torch.testing.assert_close(got, 1 + 0.5 * 2.175 * q @ torch.eye(5, 4) @ p.T, rtol=0, atol=1e-5)


def test_iso_cts_dimensions_and_special_cases():
    assert iso_cts_dims(64, 3, 0.8) == (52, 4)     # k₀ = 51, s = round(13/3) = 4, k = 64 − 12
    assert iso_cts_dims(10, 4, 0.8) == (10, 0)     # k₀ = 8, s = round(0.5) = 0 (half to even)
    assert iso_cts_dims(3, 2, 0.34) == (1, 1)
    assert iso_cts_dims(2, 3, 0.0) == (2, 0)       # s capped at ⌊r/T⌋ = 0
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    one = [base + torch.randn(6, 5, generator=g)]
    torch.testing.assert_close(run("iso_cts", base, one), run("iso_c", base, one), rtol=0, atol=1e-5)
    two = one + [base + torch.randn(6, 5, generator=g)]
    torch.testing.assert_close(run("iso_cts", base, two, common_space_fraction=1.0), run("iso_c", base, two),
                               rtol=0, atol=1e-5)
    v = torch.tensor([1.0, 1.0])
    got = run("iso_cts", v, [v + torch.tensor([2.0, 0.0]), v + torch.tensor([0.0, 4.0])],
              [{"weight": 1.0}, {"weight": 0.5}], **{"lambda": 0.5})
    torch.testing.assert_close(got, torch.tensor([1.5, 1.5]))


def _iso_cts_reference(taus, w, lam, fraction, dtype):
    """Iso-CTS as the paper writes it, with SVDs in ``dtype`` (float32: the form used where in > out)."""
    from mergelab.methods.lowrank import polar, rank_tol

    eps = torch.finfo(torch.float32).eps
    taus = [(wi * t).to(dtype) for wi, t in zip(w, taus)]
    shape = taus[0].shape
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    r = int((s > rank_tol(s, shape)).sum())
    k, per = iso_cts_dims(r, len(taus), fraction)
    uc, top = u[:, :k], float(s[0])
    blocks = [(uc, s[:k], vh[:k])]
    for t in taus if per else ():
        uu, ss, vv = torch.linalg.svd(t - uc @ (uc.T @ t), full_matrices=False)
        keep = min(per, int((ss > max(shape) * eps * max(top, float(torch.linalg.matrix_norm(t)))).sum()))
        blocks.append((uu[:, :keep], ss[:keep], vv[:keep]))
    blocks = [b for b in blocks if b[1].numel()]
    sigma = torch.cat([b[1] for b in blocks]).mean()
    u, vh = polar(torch.cat([b[0] for b in blocks], 1)), polar(torch.cat([b[2] for b in blocks], 0))
    return ((u * (lam * sigma)) @ vh).double()


def test_iso_cts_through_the_column_grams_equals_the_svd_form():
    """Where ``in ≤ out`` (row blocks) Iso-CTS runs through ``τᵢᵀτᵢ``, ``Mᵀτᵢ`` and ``UᵀU``: it equals
    the SVD form in float64 to the float32 result's rounding, for full-rank and rank-deficient
    (LoRA) task matrices, common fractions 0–1. The float32 SVD form (used where in > out) is
    itself 1e-6 to 6e-5 of the largest entry from that — how far depends on the CPU's LAPACK
    kernels (6e-5 for the rank-4 case with AVX-512 MKL, under 3e-5 elsewhere), hence 2e-4 here —
    and ~1e-3 where ``[U_c U₁ U₂]`` is ill-conditioned (σ_min 0.025: two LoRA residuals sharing
    M's 12 remaining directions)."""
    g = torch.Generator().manual_seed(2)
    for shape, rank, n, fraction, old_tol in (
            ((300, 200), None, 3, 0.8, 2e-4), ((256, 256), None, 2, 0.8, 2e-4), ((300, 200), 4, 3, 0.8, 2e-4),
            ((512, 256), 8, 3, 0.8, 2e-4), ((300, 200), None, 3, 0.5, 2e-4), ((512, 256), 8, 2, 0.3, 1e-3),
            ((300, 200), None, 3, 0.0, 2e-4), ((300, 200), None, 3, 1.0, 2e-4)):
        def tau():
            if rank is None:
                return 0.01 * torch.randn(*shape, generator=g)
            return 0.1 * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)

        taus, w = [tau() for _ in range(n)], [1.0, 0.5, -1.0][:n]
        got = run("iso_cts", torch.zeros(shape), taus, [{"weight": x} for x in w],
                  common_space_fraction=fraction, **{"lambda": 0.7}).double()
        want = _iso_cts_reference(taus, w, 0.7, fraction, torch.float64)
        top = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * top)
        old = _iso_cts_reference(taus, w, 0.7, fraction, torch.float32)
        torch.testing.assert_close(got, old, rtol=0, atol=old_tol * top)


def test_iso_cts_factor_form_equals_the_dense_form():
    g = torch.Generator().manual_seed(2)
    shape = (12, 9)
    parts = [LowRank(torch.randn(12, r, generator=g), torch.randn(r, 9, generator=g)) for r in (2, 3, 1)]
    parts.insert(1, None)  # an expert without this module
    p = MethodParams(globals={"lambda": 0.7, "common_space_fraction": 0.6},
                     experts=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}, {"weight": 1.0}])
    spec = get_method("iso_cts")
    lr = spec.factors(parts, p, shape)
    assert lr.rank <= 6
    dense = spec.fn(torch.zeros(shape), [q.dense() if q is not None else torch.zeros(shape) for q in parts], p)
    torch.testing.assert_close(lr.dense(), dense, rtol=0, atol=1e-4 * float(dense.abs().max()))


# ------------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", NEW)
def test_new_methods_are_pure_documented_and_shape_preserving(name):
    spec = get_method(name)
    assert ("Paper" in spec.doc or "Reference" in spec.doc) and "θ" in spec.doc
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    experts = [base + 0.1 * torch.randn(6, 4, generator=g) for _ in range(spec.n_experts[1] or 3)]
    before = [base.clone()] + [e.clone() for e in experts]
    out = spec.fn(base, experts, MethodParams(globals={"t": 0.05, "steps": 3}, experts=[{} for _ in experts]))
    assert out.shape == base.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(torch.equal(x, y) for x, y in zip(before, [base] + experts))
    assert not spec.linear_in_delta and not spec.random


# ------------------------------------------------------------------------------------- fixture models


RECIPES = {
    "karcher": {"name": "karcher"},
    "nuslerp": {"name": "nuslerp"},
    "multislerp": {"name": "multislerp"},
    "sce": {"name": "sce", "select_topk": 0.5},
    "nearswap": {"name": "nearswap", "t": 0.01},
    "wudi": {"name": "wudi", "steps": 20, "lr": 1e-4},
    "iso_cts": {"name": "iso_cts", "lambda": 0.8},
}


def _experts(spec, paths):
    n = spec.n_experts[1] or 3
    return [{"path": str(p)} for p in paths[:n]]


@pytest.mark.parametrize("family", ["llama", "gemma", "t5"])
def test_new_methods_on_fixture_models_load_and_equal_the_method(zoo, tmp_path, family):
    """Full fine-tunes: every tensor written is the method on that tensor (checked on a matrix
    and a vector), and the merged model loads in transformers and runs."""
    fz = zoo[family]
    base = CheckpointReader(fz.base)
    names = [n for n in base.keys() if n.endswith(("q.weight", "q_proj.weight"))][:1] + \
            [n for n in base.keys() if "norm" in n or "layer_norm" in n][:1]
    for method, cfg in RECIPES.items():
        spec = get_method(method)
        recipe = load_recipe({"base": {"path": str(fz.base)}, "experts": _experts(spec, fz.experts), "method": cfg})
        out = tmp_path / method
        merge(recipe, out, progress=False)
        merged = CheckpointReader(out)
        srcs = [CheckpointReader(e["path"]) for e in _experts(spec, fz.experts)]
        for name in names:
            want = spec.fn(base.get(name).float(), [s.get(name).float() for s in srcs],
                           resolve_params(recipe, name, 2))
            torch.testing.assert_close(merged.get(name).float(), want, rtol=1e-6, atol=1e-6, msg=f"{method} {name}")
            assert not torch.equal(want, base.get(name).float()), f"{method} left {name} unchanged"
        if method in ("karcher", "wudi", "iso_cts") or family == "llama":  # a load per method on llama
            model = load_model(out)
            ids = torch.tensor([[1, 5, 9, 2]])
            with torch.no_grad():
                kw = {"decoder_input_ids": ids[:, :1]} if family == "t5" else {}
                assert torch.isfinite(model(input_ids=ids, **kw).logits).all()


def test_new_methods_on_lora_experts_in_delta_space(zoo, tmp_path):
    """LoRA experts: a full output is the method on W and W + ΔWᵢ; an adapter output takes the
    exact factor route for iso_cts and the dense routes for the others."""
    from mergelab.io.adapter import open_lora_expert

    fz = zoo["llama"]
    base = CheckpointReader(fz.base)
    name = "model.layers.1.self_attn.q_proj.weight"  # adapted by loras 0 and 1
    for method, cfg in RECIPES.items():
        spec = get_method(method)
        experts = _experts(spec, fz.loras)
        full = load_recipe({"base": {"path": str(fz.base)}, "experts": experts, "method": cfg})
        merge(full, tmp_path / method / "full", progress=False)
        w = base.get(name).float()
        srcs = [open_lora_expert(e["path"], base) for e in experts]
        want = spec.fn(w, [s.get(name).float() for s in srcs], resolve_params(full, name, 2))
        torch.testing.assert_close(CheckpointReader(tmp_path / method / "full").get(name), want,
                                   rtol=1e-6, atol=1e-6, msg=method)
        adapter = load_recipe({"base": {"path": str(fz.base)}, "experts": experts, "method": cfg,
                               "output": {"format": "lora", "rank": 64}})
        res = merge(adapter, tmp_path / method / "adapter", progress=False)
        if method == "iso_cts":
            assert set(res.routes) == {"factors"}
        elif method == "karcher" or (method in ("nuslerp", "multislerp") and cfg.get("use_base") is False):
            assert set(res.routes) == {"dense-from-base"}
        else:
            assert set(res.routes) == {"dense"}, (method, res.routes)


@pytest.mark.parametrize("method, n, message", [
    ({"name": "wudi", "steps": -1}, 1, "method.steps: expected a whole number at least 0, got -1"),
    ({"name": "sce", "select_topk": 2}, 1, "method.select_topk: expected a number between 0 and 1, got 2"),
    ({"name": "nuslerp", "nuslerp_flatten": "yes"}, 2, "method.nuslerp_flatten: expected true or false, got 'yes'"),
    ({"name": "iso_cts", "common_space_fraction": 1.5}, 1, "method.common_space_fraction: expected a number between 0 and 1"),
])
def test_new_method_parameters_are_checked_by_the_recipe(method, n, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        load_recipe({"base": {"path": "b"}, "experts": [{"path": "e"}] * n, "method": method})
