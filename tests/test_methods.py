"""Every full-model merge method against a hand computation on small tensors."""
from __future__ import annotations

import math

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.methods import REGISTRY, MethodParams, get_method
from mergelab.methods.sparsify import topk_mask

OURS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "geometric_median")


def T(*values):
    return torch.tensor(values, dtype=torch.float32)


def run(name, base, experts, experts_params=None, generator=None, **globals_):
    p = MethodParams(globals=globals_, experts=experts_params or [{} for _ in experts], generator=generator)
    return get_method(name).fn(base, experts, p)


# ------------------------------------------------------------------------------------- linear


def test_linear_is_the_weighted_average_without_the_base():
    base = T(100.0, -100.0)  # takes no part
    out = run("linear", base, [T(1, 2), T(3, 4)], [{"weight": 1.0}, {"weight": 3.0}])
    assert torch.allclose(out, T(2.5, 3.5))  # (1·[1,2] + 3·[3,4]) / 4
    out = run("linear", base, [T(1, 2), T(3, 4)], [{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    assert torch.allclose(out, T(10, 14))


def test_linear_refuses_weights_that_sum_to_zero():
    with pytest.raises(RecipeError, match="sum to zero"):
        run("linear", T(0, 0), [T(1, 2), T(3, 4)], [{"weight": 1.0}, {"weight": -1.0}])


def test_task_arithmetic_adds_weighted_task_vectors():
    base = T(1, 1)
    # δ1 = [1, -1], δ2 = [0, 2]; Σ wδ = [1, 0]; λ = 2 → base + [2, 0]
    out = run("task_arithmetic", base, [T(2, 0), T(1, 3)], [{"weight": 1.0}, {"weight": 0.5}], **{"lambda": 2.0})
    assert torch.allclose(out, T(3, 1))
    out = run("task_arithmetic", base, [T(2, 0), T(1, 3)], [{"weight": 1.0}, {"weight": 0.5}], normalize=True)
    assert torch.allclose(out, base + T(1, 0) / 1.5)


# --------------------------------------------------------------------------------------- TIES

D1 = T(3, -2, 0.5, 1, -4, 0.1)
D2 = T(-1, 2, 0.4, -3, -1, 0.2)


def test_ties_trims_elects_and_averages_by_hand():
    base = torch.zeros(6)
    # density 0.5 keeps 3 of 6: δ1 → [3, -2, 0, 0, -4, 0]; δ2 → [-1, 2, 0, -3, 0, 0] (|-1| ties at
    # index 0 and 4: the lower index wins). Σ = [2, 0, 0, -3, -4, 0] → signs + + + - - +.
    out = run("ties", base, [base + D1, base + D2], density=0.5)
    assert torch.allclose(out, T(3, 2, 0, -3, -4, 0))


def test_ties_weights_take_part_in_the_election_and_the_division():
    base = T(1, 1, 1, 1, 1, 1)
    # d2 = 0.5·[-1, 2, 0, -3, 0, 0]; Σ = [2.5, -1, 0, -1.5, -4, 0] → signs + - + - - +
    # entry 1: only d1 = -2 agrees → -2/1; entry 3: only d2 = -1.5 agrees → -1.5/0.5 = -3
    out = run("ties", base, [base + D1, base + D2], [{"weight": 1.0}, {"weight": 0.5}], density=0.5)
    assert torch.allclose(out, base + T(3, -2, 0, -3, -4, 0))
    out = run("ties", base, [base + D1, base + D2], [{"weight": 1.0}, {"weight": 0.5}],
              density=0.5, normalize=False, **{"lambda": 0.5})
    assert torch.allclose(out, base + 0.5 * T(3, -2, 0, -1.5, -4, 0))


def test_ties_per_expert_density_and_rescale():
    base = torch.zeros(6)
    # expert 1 keeps 2 (|3|, |-4|); expert 2 keeps all. L1 rescale of expert 1: 10.6 / 7
    p = [{"density": 0.34}, {"density": 1.0}]
    out = run("ties", base, [D1, D2], p, rescale=True)
    d1 = T(3, 0, 0, 0, -4, 0) * (D1.abs().sum() / 7)
    total = d1 + D2
    agree1, agree2 = (torch.sign(d1) == torch.where(total >= 0, 1.0, -1.0)), (torch.sign(D2) == torch.where(total >= 0, 1.0, -1.0))
    expect = (d1 * agree1 + D2 * agree2) / (agree1.float() + agree2.float()).clamp_min(1)
    assert torch.allclose(out, expect)


def test_topk_mask_is_exact_with_ties_broken_by_index_on_large_tensors():
    # Past the sampling threshold, with bfloat16-valued deltas (many equal magnitudes) and zeros.
    g = torch.Generator().manual_seed(0)
    n = 300_000
    b = torch.randn(n, generator=g).bfloat16().float()
    e = (b + 0.01 * torch.randn(n, generator=g)).bfloat16().float()
    e[: n // 10] = b[: n // 10]
    a = (e - b).abs()
    order = torch.sort(a, descending=True, stable=True).indices
    for density in (0.001, 0.2, 0.7, 0.95):
        k = int(density * n)
        want = torch.zeros(n, dtype=torch.bool)
        want[order[:k]] = True
        got = topk_mask(e, b, k)
        assert torch.equal(got, want) and int(got.sum()) == k


# --------------------------------------------------------------------------------------- DARE


def _draws(seed, n, count):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) for _ in range(count)]


def test_dare_linear_drops_at_random_and_rescales_to_the_l1_norm():
    base = T(0.5, 0.5, 0.5, 0.5, 0.5, 0.5)
    u1, u2 = _draws(7, 6, 2)  # uniform numbers in flat order, expert after expert
    out = run("dare_linear", base, [base + D1, base + D2], [{"weight": 1.0}, {"weight": 2.0}],
              generator=torch.Generator().manual_seed(7), density=0.5)
    expect = base.clone()
    for u, d, w in ((u1, D1, 1.0), (u2, D2, 2.0)):
        kept = d * (u < 0.5)
        expect += w * kept * (d.abs().sum() / kept.abs().sum())
    assert torch.allclose(out, expect)


def test_dare_ties_without_rescale_elects_signs_and_sums():
    base = torch.zeros(6)
    u1, u2 = _draws(3, 6, 2)
    out = run("dare_ties", base, [D1, D2], generator=torch.Generator().manual_seed(3), density=0.6, rescale=False)
    k1, k2 = D1 * (u1 < 0.6), D2 * (u2 < 0.6)
    sign = torch.where(k1 + k2 >= 0, 1.0, -1.0)
    expect = k1 * (torch.sign(k1) == sign) + k2 * (torch.sign(k2) == sign)  # normalize: false by default
    assert torch.allclose(out, expect)


def test_dare_keeps_a_density_share_and_is_reproducible():
    base = torch.zeros(200_000)
    e = torch.ones(200_000)
    a = run("dare_linear", base, [e], generator=torch.Generator().manual_seed(1), density=0.3, rescale=False)
    b = run("dare_linear", base, [e], generator=torch.Generator().manual_seed(1), density=0.3, rescale=False)
    c = run("dare_linear", base, [e], generator=torch.Generator().manual_seed(2), density=0.3, rescale=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.mean()) - 0.3) < 0.005


def test_random_methods_need_a_generator():
    with pytest.raises(RecipeError, match="generator"):
        run("dare_ties", torch.zeros(3), [T(1, 2, 3)], density=0.5)


# -------------------------------------------------------------------------------- Breadcrumbs

BC = T(5, -4, 3, -2, 1, 0.5, -0.25, 0.1, 0.05, 0.01)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = torch.zeros(10)
    # density 0.5 keeps 5; gamma 0.1 drops the 1 largest first
    out = run("breadcrumbs", base, [BC], density=0.5, gamma=0.1)
    assert torch.allclose(out, T(0, -4, 3, -2, 1, 0.5, 0, 0, 0, 0))
    # gamma 0.6 would leave fewer than 5: only 10 - 5 outliers are dropped
    out = run("breadcrumbs", base, [BC], density=0.5, gamma=0.6)
    assert torch.allclose(out, T(0, 0, 0, 0, 0, 0.5, -0.25, 0.1, 0.05, 0.01))


def test_breadcrumbs_ties_elects_signs():
    base = torch.zeros(10)
    other = -BC.flip(0)  # [-0.01, -0.05, -0.1, 0.25, -0.5, -1, 2, -3, 4, -5]
    out = run("breadcrumbs_ties", base, [BC, other], density=0.5, gamma=0.1)
    k1 = T(0, -4, 3, -2, 1, 0.5, 0, 0, 0, 0)
    k2 = T(0, 0, 0, 0, -0.5, -1, 2, -3, 4, 0)
    s = torch.where(k1 + k2 >= 0, 1.0, -1.0)
    assert torch.allclose(out, k1 * (torch.sign(k1) == s) + k2 * (torch.sign(k2) == s))


# -------------------------------------------------------------------------------------- DELLA


def test_della_keeps_by_rank_probability_and_rescales():
    base = torch.zeros(5)
    d = T(0.1, -0.5, 0.3, 0.2, -0.4)
    # ranks (0 = smallest |δ|): 0, 4, 2, 1, 3 → p = 0.5 - 0.4 + 0.8·rank/4
    p = T(0.1, 0.9, 0.5, 0.3, 0.7)
    (u,) = _draws(11, 5, 1)
    out = run("della_linear", base, [d], generator=torch.Generator().manual_seed(11), density=0.5, epsilon=0.4)
    kept = d * (u < p)
    assert torch.allclose(out, kept * (d.abs().sum() / kept.abs().sum()))


def test_della_keep_rate_follows_the_rank_in_each_row():
    rows, cols = 20_000, 5
    d = torch.arange(1.0, cols + 1).repeat(rows, 1)  # rank r in column r
    out = run("della_linear", torch.zeros(rows, cols), [d], generator=torch.Generator().manual_seed(0),
              density=0.5, epsilon=0.3, rescale=False)
    rate = (out != 0).float().mean(dim=0)
    assert torch.allclose(rate, torch.linspace(0.2, 0.8, cols), atol=0.015)


def test_della_refuses_epsilon_outside_the_density():
    with pytest.raises(RecipeError, match="epsilon"):
        run("della", torch.zeros(4), [T(1, 2, 3, 4)], generator=torch.Generator(), density=0.2, epsilon=0.3)


# ------------------------------------------------------------------------------------ geometric


def test_slerp_by_hand():
    r = math.sqrt(0.5)
    assert torch.allclose(run("slerp", T(1, 0), [T(0, 1)], t=0.5), T(r, r))
    assert torch.allclose(run("slerp", T(2, 0), [T(0, 1)], t=0.5), T(2 * r, r))  # norms are kept per input
    assert torch.allclose(run("slerp", T(1, 2), [T(2, 4)], t=0.25), T(1.25, 2.5))  # collinear: lerp
    a, b = T(0.3, -1, 2), T(1, 0.5, -0.2)
    assert torch.allclose(run("slerp", a, [b], t=0.0), a, atol=1e-6)
    assert torch.allclose(run("slerp", a, [b], t=1.0), b, atol=1e-6)
    assert torch.allclose(run("slerp", a, [b], [{"t": 1.0}], t=0.0), b, atol=1e-6)  # the expert's own t wins


def test_slerp_needs_t():
    with pytest.raises(RecipeError, match="needs the parameter t"):
        run("slerp", T(1, 0), [T(0, 1)])


def test_model_stock_by_hand():
    # δ1 = [1, 1], δ2 = [1, 0]: cos = 1/√2; t = 2c/(1+c); result = t·mean(experts) + (1-t)·base
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = run("model_stock", T(0, 0), [T(1, 1), T(1, 0)])
    assert torch.allclose(out, t * T(1, 0.5))
    # opposite task vectors: cos = -1 → denominator 0 → stay at the base
    assert torch.allclose(run("model_stock", T(2, 2), [T(3, 2), T(1, 2)]), T(2, 2))


def test_model_stock_filter_wise_uses_one_angle_per_row():
    base = torch.zeros(2, 2)
    e1, e2 = torch.tensor([[1.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out = run("model_stock", base, [e1, e2], filter_wise=True)
    c0 = 1 / math.sqrt(2)
    t0 = 2 * c0 / (1 + c0)  # row 0 as above; row 1 orthogonal: cos 0 → t 0
    assert torch.allclose(out, torch.tensor([[t0, t0 * 0.5], [0.0, 0.0]]))


def test_geometric_median_by_hand():
    base = T(5.0)
    # task vectors 0, 1, 10: the median is 1 (the mean would be 3.67)
    out = run("geometric_median", base, [base + T(0.0), base + T(1.0), base + T(10.0)], eps=1e-9)
    assert abs(float(out) - 6.0) < 1e-3
    # weight 3 of 5 on the third: it is the weighted median
    out = run("geometric_median", base, [base + T(0.0), base + T(1.0), base + T(10.0)],
              [{"weight": 1}, {"weight": 1}, {"weight": 3}], eps=1e-9)
    assert abs(float(out) - 15.0) < 1e-3


def test_geometric_median_resists_an_outlier():
    base = torch.zeros(2)
    square = [T(0, 0), T(1, 0), T(0, 1), T(1, 1)]
    out = run("geometric_median", base, square)
    assert torch.allclose(out, T(0.5, 0.5), atol=1e-5)
    out = run("geometric_median", base, square + [T(100, 100)], **{"lambda": 2.0})
    assert (out / 2 - T(0.5, 0.5)).norm() < 0.5  # the mean would be at (20.4, 20.4)


# --------------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", OURS)
def test_methods_are_pure_documented_and_shape_preserving(name):
    spec = get_method(name)
    assert "Paper" in spec.doc or "Reference" in spec.doc
    assert "θ" in spec.doc  # states the formula
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    n = spec.n_experts[1] or 3
    experts = [base + 0.1 * torch.randn(6, 4, generator=g) for _ in range(max(n, spec.n_experts[0]))]
    before = [base.clone()] + [e.clone() for e in experts]
    params = MethodParams(globals={"density": 0.5, "t": 0.3}, experts=[{} for _ in experts],
                          generator=torch.Generator().manual_seed(1))
    if name == "slerp":
        params.globals = {"t": 0.3}
    if name.startswith("della"):
        params.globals["epsilon"] = 0.1
    out = spec.fn(base, experts, params)
    assert out.shape == base.shape and out.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(before, [base] + experts))  # inputs untouched
    assert name in REGISTRY
