"""The subspace methods (cat, tsv, iso_c, knots) against hand computations on small matrices,
their factor forms against their dense forms, and the method probes of the LoRA pipeline."""
from __future__ import annotations

import math

import pytest
import torch

from mergelab.methods.lowrank import LowRank
from mergelab.merge.adapter import linear_coefficients, translation_invariant
from mergelab.methods import MethodParams, get_method


def _p(n, globals_=None, **per_expert):
    experts = [{k: v[i] for k, v in per_expert.items()} for i in range(n)]
    return MethodParams(globals=dict(globals_ or {}), experts=experts, generator=torch.Generator().manual_seed(0))


def _run(name, base, taus, p):
    return get_method(name).fn(base, [base + t for t in taus], p)


def test_cat_is_the_weighted_sum():
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t1, t2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]]), torch.tensor([[0.5, 0.5], [2.0, 0.0]])
    got = _run("cat", base, [t1, t2], _p(2, weight=[2.0, -1.0]))
    torch.testing.assert_close(got, torch.tensor([[2.5, 1.5], [1.0, 2.0]]))
    assert get_method("cat").linear_in_delta


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base = torch.zeros(3, 3)
    t1, t2 = torch.diag(torch.tensor([3.0, 1.0, 0.0])), torch.diag(torch.tensor([1.0, 1.0, 0.0]))
    # M = diag(4, 2, 0): σ = (4, 2) (the zero one has no direction), mean 3, λ = 0.5
    got = _run("iso_c", base, [t1, t2], _p(2, {"lambda": 0.5}))
    torch.testing.assert_close(got, torch.diag(torch.tensor([1.5, 1.5, 0.0])), rtol=0, atol=1e-6)
    # a rotated basis gives the rotated answer
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    got = _run("iso_c", base, [q @ t1 @ q.T, q @ t2 @ q.T], _p(2, {"lambda": 0.5}))
    torch.testing.assert_close(got, q @ torch.diag(torch.tensor([1.5, 1.5, 0.0])) @ q.T, rtol=0, atol=1e-5)
    # vectors: λ · mean of the weighted task vectors
    b = torch.tensor([1.0, 1.0])
    got = get_method("iso_c").fn(b, [b + torch.tensor([2.0, 0.0]), b + torch.tensor([0.0, 4.0])],
                                 _p(2, {"lambda": 0.5}, weight=[1.0, 0.5]))
    torch.testing.assert_close(got, torch.tensor([1.5, 1.5]))


def test_iso_c_through_the_column_gram_equals_the_svd_form():
    """Where ``in ≤ out`` (row blocks) Iso-C runs through ``MᵀM = V Σ² Vᵀ``: it equals
    ``λ σ̄ U Vᵀ`` from the SVD of ``M``, for full-rank sums and rank-deficient (LoRA) ones."""
    from mergelab.methods.lowrank import thin_svd

    g = torch.Generator().manual_seed(2)
    for shape, rank in (((300, 200), None), ((256, 256), None), ((300, 200), 4), ((512, 256), 8)):
        def tau():
            if rank is None:
                return 0.01 * torch.randn(*shape, generator=g)
            return 0.1 * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)

        taus = [tau() for _ in range(3)]
        u, s, vh = thin_svd(taus[0] + 0.5 * taus[1] + taus[2])
        want = (u * (0.7 * s.mean())) @ vh
        got = _run("iso_c", torch.zeros(shape), taus, _p(3, {"lambda": 0.7}, weight=[1.0, 0.5, 1.0]))
        assert s.numel() == (min(shape) if rank is None else 3 * rank)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def _tsv_reference(taus, w, lam, k, dtype):
    """TSV-M as the paper writes it: SVDs of each τᵢ (in ``dtype``), top k, polar factors."""
    from mergelab.methods.lowrank import polar, rank_tol

    us, ss, vhs = [], [], []
    for t, wi in zip(taus, w):
        u, s, vh = torch.linalg.svd(t.to(dtype), full_matrices=False)
        keep = min(k, int((s > rank_tol(s, t.shape)).sum()))
        us.append(u[:, :keep]), ss.append(wi * s[:keep]), vhs.append(vh[:keep])
    return ((polar(torch.cat(us, 1)) * (lam * torch.cat(ss))) @ polar(torch.cat(vhs, 0))).double()


def test_tsv_through_the_column_grams_equals_the_svd_form():
    """Where ``in ≤ out`` (row blocks) TSV-M runs through each ``τᵢᵀτᵢ`` and ``UᵀU``: it equals the
    SVD form in float64 to the float32 result's rounding, for full-rank task matrices and
    rank-deficient (LoRA) ones, with k below, at and above their ranks; the float32 SVD form
    (the one used where ``in > out``) is itself ~1e-5 of the largest entry from that."""
    g = torch.Generator().manual_seed(2)
    for shape, rank, k in (((300, 200), None, None), ((256, 256), None, None), ((300, 200), None, 20),
                           ((300, 200), None, 150), ((300, 200), 4, None), ((512, 256), 8, None),
                           ((512, 256), 8, 5)):
        def tau():
            if rank is None:
                return 0.01 * torch.randn(*shape, generator=g)
            return 0.1 * torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)

        taus, w = [tau() for _ in range(3)], [1.0, 0.5, -1.0]
        p = _p(3, {"lambda": 0.7, **({"k": k} if k else {})}, weight=w)
        kk = k or min(shape) // 3
        got = _run("tsv", torch.zeros(shape), taus, p).double()
        want = _tsv_reference(taus, w, 0.7, kk, torch.float64)
        top = float(want.abs().max())
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * top)
        torch.testing.assert_close(got, _tsv_reference(taus, w, 0.7, kk, torch.float32), rtol=0, atol=3e-5 * top)


def test_tsv_keeps_orthogonal_tasks_and_orthogonalises_overlapping_ones():
    e = torch.eye(3)
    base = torch.zeros(3, 3)
    # orthogonal subspaces: the merge is the plain sum
    t1, t2 = 2 * torch.outer(e[0], e[0]), 3 * torch.outer(e[1], e[1])
    torch.testing.assert_close(_run("tsv", base, [t1, t2], _p(2)), t1 + t2, rtol=0, atol=1e-6)
    # overlapping left singular vectors u1 = e0, u2 = (e0 + e1)/√2; right ones f1 = e0, f2 = e1
    c = 1 / math.sqrt(2)
    u2 = c * (e[0] + e[1])
    t1, t2 = 2 * torch.outer(e[0], e[0]), 3 * torch.outer(u2, e[1])
    U = torch.stack([e[0], u2], dim=1)
    # U⊥ = U (UᵀU)^(-1/2), UᵀU = [[1, c], [c, 1]] with eigenvalues 1 ± c on (1, ±1)/√2
    a, b = (1 + c) ** -0.5, (1 - c) ** -0.5
    inv_sqrt = 0.5 * torch.tensor([[a + b, a - b], [a - b, a + b]])
    want = U @ inv_sqrt @ torch.diag(torch.tensor([2.0, 3.0])) @ torch.stack([e[0], e[1]])
    torch.testing.assert_close(_run("tsv", base, [t1, t2], _p(2)), want, rtol=0, atol=1e-5)
    # k = 1 keeps each task's top singular triplet only
    t = 5 * torch.outer(e[0], e[2]) + torch.outer(e[1], e[1])
    torch.testing.assert_close(_run("tsv", base, [t], _p(1, {"k": 1})), 5 * torch.outer(e[0], e[2]), rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="positive integer"):
        _run("tsv", base, [t], _p(1, {"k": 0}))


def test_knots_ties_decides_in_the_aligned_basis():
    """[τ1 τ2] = [[1, 0, -.5, 0], [0, 0, 0, 2]]: rows are orthogonal, so U S Vh is read off by
    hand; TIES on the aligned rows keeps 1/√1.25 (expert 1 outvotes -0.5/√1.25) → ΔW[0,0] = 1,
    where task arithmetic gives 0.5."""
    base = torch.zeros(2, 2)
    t1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    t2 = torch.tensor([[-0.5, 0.0], [0.0, 2.0]])
    got = _run("knots", base, [t1, t2], _p(2, {"merge": "ties"}))
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0], [0.0, 2.0]]), rtol=0, atol=1e-6)
    got = _run("knots", base, [t1, t2], _p(2, {"merge": "task_arithmetic"}))
    torch.testing.assert_close(got, t1 + t2, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="knots itself"):
        _run("knots", base, [t1, t2], _p(2, {"merge": "knots"}))


@pytest.mark.parametrize("name, globals_", [
    ("cat", {}), ("tsv", {}), ("tsv", {"k": 3, "lambda": 0.7}), ("iso_c", {"lambda": 1.3}),
    ("knots", {"merge": "ties", "density": 0.5}), ("knots", {"merge": "task_arithmetic", "lambda": 0.5}),
])
def test_factor_forms_equal_dense_forms(name, globals_):
    g = torch.Generator().manual_seed(0)
    shape = (40, 24)
    parts = [LowRank(torch.randn(40, r, generator=g), torch.randn(r, 24, generator=g)) for r in (3, 5, 2)]
    parts[1] = None  # an adapter without this module contributes zero
    dense = [torch.zeros(shape) if q is None else q.dense() for q in parts]
    base = torch.randn(shape, generator=g)
    p = _p(3, globals_, weight=[1.0, 0.5, -2.0])
    d = get_method(name).fn(base, [base + x for x in dense], p) - base
    f = get_method(name).factors(parts, p, shape)
    torch.testing.assert_close(f.dense(), d, rtol=0, atol=1e-4 * float(d.abs().max()))
    assert f.rank <= sum(q.rank for q in parts if q is not None)


def test_methods_are_documented_with_formula_and_paper():
    for name, paper in (("cat", "add_weighted_adapter"), ("tsv", "2412.00081"), ("iso_c", "2502.04959"),
                        ("knots", "2410.19735")):
        doc = get_method(name).doc
        assert paper in doc and "θ" in doc, name


def test_probes_tell_linear_and_translation_invariant_methods_apart():
    p3 = _p(3, weight=[1.0, 0.5, 2.0])
    assert linear_coefficients(get_method("linear"), p3, 3) == pytest.approx([1 / 3.5, 0.5 / 3.5, 2 / 3.5])
    assert linear_coefficients(get_method("task_arithmetic"), _p(3, {"lambda": 0.5}, weight=[1.0, 0.5, 2.0]), 3) \
        == pytest.approx([0.5, 0.25, 1.0])
    # without normalisation the base weights are scaled too: not a task-vector merge
    assert linear_coefficients(get_method("linear"), _p(3, {"normalize": False}, weight=[1.0, 0.5, 2.0]), 3) is None
    assert not translation_invariant(get_method("linear"), _p(3, {"normalize": False}, weight=[1.0, 0.5, 2.0]), 3)
    assert linear_coefficients(get_method("ties"), p3, 3) is None
    for name in ("ties", "dare_ties", "model_stock", "breadcrumbs", "della"):
        assert translation_invariant(get_method(name), _p(3, {"density": 0.5}), 3), name
    assert not translation_invariant(get_method("slerp"), _p(1, {"t": 0.3}), 1)
