"""Exact streaming k-th largest (mergelab.methods.kth): hand-checkable cases, the histogram passes,
brackets that hold and that miss, the torch kernels, and a hypothesis property against
``torch.kthvalue`` and against the sample-and-kthvalue selection sparsify used before."""
from __future__ import annotations

import math
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergelab.methods import kth
from mergelab.methods.kth import KthLargest, KthLargestRows, sample_bracket
from mergelab.methods.sparsify import _kth_largest


def select(values: torch.Tensor, ks, *, blocks=1, brackets=None, device="cpu", cls=KthLargest):
    """Run the passes over ``values`` cut into ``blocks`` pieces; the results and the pass count."""
    n = values.numel() if cls is KthLargest else values.shape[1]
    sel = cls(n, ks, device, brackets=brackets)
    parts = values.reshape(-1).tensor_split(blocks) if cls is KthLargest else values.tensor_split(blocks, dim=1)
    passes = 1
    while True:
        for i, part in enumerate(parts):
            sel.observe(part if i % 2 else part.reshape(-1, 1))   # any shape
        if not sel.next_pass():
            return [sel.result(j) for j in range(len(ks))], passes
        passes += 1
        parts = parts[::-1]                                        # any order


def reference(values: torch.Tensor, k: int) -> tuple[float, int, int]:
    """The definition: ``v = torch.kthvalue`` from the top, and the counts around it."""
    x = values.reshape(-1)
    v = x.kthvalue(x.numel() - k + 1).values
    return float(v) + 0.0, int((x > v).sum()), int((x == v).sum())


def old_kth_largest(x: torch.Tensor, k: int, sample: int = 1 << 16) -> tuple[float, int, int]:
    """The selection of ``sparsify._kth_largest`` before kth.py (sample bracket, the band kept,
    ``kthvalue``; widened to a half-line when the bracket misses), on one flat tensor."""
    n = x.numel()
    lo, hi = -math.inf, math.inf
    if n > 4 * sample:
        g = torch.Generator().manual_seed(n)
        s = x[torch.randint(n, (sample,), generator=g)].sort(descending=True).values
        r = k * sample / n
        margin = 4.0 * math.sqrt(r * (1.0 - k / n)) + 16.0
        i_hi, i_lo = int(r - margin), math.ceil(r + margin)
        if i_hi >= 1:
            hi = float(s[i_hi - 1])
        if i_lo <= sample:
            lo = float(s[i_lo - 1])
    for _ in range(2):
        above = int((x > hi).sum()) if hi < math.inf else 0
        band = x[(x >= lo) & (x <= hi)]
        need = k - above
        if 1 <= need <= band.numel():
            v = band.kthvalue(band.numel() - need + 1).values
            return float(v), above + int((band > v).sum()), int((band == v).sum())
        lo, hi = (hi, math.inf) if need < 1 else (-math.inf, lo)
    raise AssertionError("unreachable")


@contextmanager
def kernels(numpy: bool, store_all: int | None = None, store_limit: int | None = None):
    """numpy or torch kernels; a smaller STORE_ALL / STORE_LIMIT to reach the histograms."""
    with mock.patch.object(kth, "USE_NUMPY", numpy), \
         mock.patch.object(kth, "STORE_ALL", kth.STORE_ALL if store_all is None else store_all), \
         mock.patch.object(kth, "STORE_LIMIT", kth.STORE_LIMIT if store_limit is None else store_limit):
        yield


# ------------------------------------------------------------------------------ hand-checked


@pytest.mark.parametrize("numpy", [True, False])
@pytest.mark.parametrize("store_all", [None, 0])   # kept whole (one pass) / two histogram passes
def test_a_small_stream_by_hand(numpy, store_all):
    x = torch.tensor([3.0, 1.0, 2.0, 2.0, 0.0, 2.0])
    with kernels(numpy, store_all):
        got, passes = select(x, [1, 2, 3, 4, 5, 6], blocks=3)
    assert got == [(3.0, 0, 1), (2.0, 1, 3), (2.0, 1, 3), (2.0, 1, 3), (1.0, 4, 1), (0.0, 5, 1)]
    assert passes == (1 if store_all is None else 2)


@pytest.mark.parametrize("numpy", [True, False])
def test_zeros_negative_zero_infinity_and_denormals(numpy):
    tiny = torch.tensor([1, 2, 3], dtype=torch.int32).view(torch.float32)     # the 3 smallest denormals
    x = torch.cat([torch.tensor([0.0, -0.0, 0.0, math.inf, 1e-38, 3.4e38]), tiny])
    with kernels(numpy, store_all=0):
        got, passes = select(x, [1, 2, 3, 5, 6, 7, 9], blocks=4)
    assert passes == 2
    d = [float(t) for t in tiny]
    assert got == [(math.inf, 0, 1), (float(np.float32(3.4e38)), 1, 1), (float(np.float32(1e-38)), 2, 1), (d[1], 4, 1),
                   (d[0], 5, 1), (0.0, 6, 3), (0.0, 6, 3)]
    assert math.copysign(1.0, got[-1][0]) == 1.0          # -0.0 reads as 0.0
    with kernels(numpy):
        assert select(x, [7])[0] == [(0.0, 6, 3)]


@pytest.mark.parametrize("numpy", [True, False])
def test_all_equal_values(numpy):
    """One bucket for the histograms; a one-value bracket (all-zero task vectors) only counts."""
    x = torch.full((300_000,), 0.25)
    with kernels(numpy):
        assert select(x, [1, 150_000, 300_000], blocks=7) == ([(0.25, 0, 300_000)] * 3, 2)
        assert select(x, [1, 300_000], blocks=7, brackets=[(0.25, 0.25)] * 2) == ([(0.25, 0, 300_000)] * 2, 1)
        z = torch.zeros(3, 100_000)
        z[1, 7] = 1.0
        got = select(z, [5, 5, 1], blocks=2, cls=KthLargestRows, brackets=[(0.0, 0.0)] * 3)
        assert got == ([(0.0, 0, 100_000), (0.0, 1, 99_999), (0.0, 0, 100_000)], 1)


@pytest.mark.parametrize("numpy", [True, False])
def test_passes_with_and_without_a_bracket(numpy):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    x = torch.randn(n, generator=g).abs_()
    x[: n // 4] = x[: n // 4].bfloat16().float()        # many equal values
    ks = [1, n // 5, n]
    want = [reference(x, k) for k in ks]
    with kernels(numpy):
        assert select(x, ks, blocks=5) == (want, 2)                     # histograms: two passes
        sample = x[torch.randint(n, (1 << 15,), generator=g)]
        assert select(x, ks, blocks=5, brackets=[sample_bracket(sample, n, k) for k in ks]) == (want, 1)
        assert select(x, ks, blocks=5, brackets=[(5.0, 6.0), None, (0.0, 0.0)]) == (want, 3)  # missed: 1 + 2
    with kernels(numpy, store_limit=1000):                               # a bracket holding too much
        assert select(x, [n // 2], brackets=[(0.0, math.inf)]) == ([reference(x, n // 2)], 3)


def test_rows_are_separate_streams_with_their_own_k():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 50_000, generator=g).abs_()
    x[2] = x[2].bfloat16().float()
    ks = [1, 10_000, 25_000, 50_000]
    want = [reference(x[i], k) for i, k in enumerate(ks)]
    for numpy in (True, False):
        with kernels(numpy, store_all=0):
            assert select(x, ks, blocks=3, cls=KthLargestRows) == (want, 2)
            brackets = [sample_bracket(x[i, :4096], 50_000, k) for i, k in enumerate(ks)]
            brackets[1] = (10.0, 11.0)                                    # one row misses
            assert select(x, ks, blocks=3, cls=KthLargestRows, brackets=brackets) == (want, 3)


def test_misuse_is_refused():
    with pytest.raises(ValueError, match="k must be in"):
        KthLargest(10, [0])
    with pytest.raises(ValueError, match="k must be in"):
        KthLargest(10, [11])
    with pytest.raises(TypeError, match="float32"):
        KthLargest(3, [1]).observe(torch.zeros(3, dtype=torch.float64))
    sel = KthLargest(3, [1])
    sel.observe(torch.zeros(2))
    with pytest.raises(ValueError, match="saw 2 values"):
        sel.next_pass()
    with pytest.raises(RuntimeError, match="not finished"):
        KthLargest(3, [1]).result()
    for numpy in (True, False):
        with kernels(numpy, store_all=0), pytest.raises(ValueError, match="below zero"):
            KthLargest(2, [1]).observe(torch.tensor([1.0, -2.0]))
    # half-precision values are widened exactly
    sel = KthLargest(3, [2])
    sel.observe(torch.tensor([0.5, 0.25, 1.0], dtype=torch.bfloat16))
    assert not sel.next_pass() and sel.result() == (0.5, 1, 1)


def test_sample_bracket_holds_the_kth_value_of_a_fair_sample():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1_000_000, generator=g)
    for k in (1, 1000, 200_000, 999_999):
        lo, hi = sample_bracket(x[torch.randint(x.numel(), (1 << 15,), generator=g)], x.numel(), k)
        assert lo <= reference(x, k)[0] <= hi
    assert sample_bracket(torch.empty(0), 10, 3) == (-math.inf, math.inf)


# ------------------------------------------------------------------------------------ property

FLOAT32 = st.floats(min_value=0.0, max_value=float(np.finfo(np.float32).max), width=32, allow_subnormal=True)


@st.composite
def streams(draw):
    """Non-negative float32 values with many repeats, zeros and denormals; a k; a block count."""
    pool = draw(st.lists(FLOAT32 | st.sampled_from([0.0, 1e-45, 2e-45, 1.0, 1.0000001]), min_size=1, max_size=12))
    values = draw(st.lists(st.sampled_from(pool) | FLOAT32, min_size=1, max_size=300))
    k = draw(st.integers(1, len(values)))
    return torch.tensor(values, dtype=torch.float32), k, draw(st.integers(1, 6))


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(case=streams(), numpy=st.booleans(), store_all=st.sampled_from([None, 0]),
       bracket=st.sampled_from([None, "sample", "edge", "wrong"]))
def test_same_answer_as_kthvalue_and_the_old_selection(case, numpy, store_all, bracket):
    x, k, blocks = case
    n = x.numel()
    want = reference(x, k)
    assert old_kth_largest(x, k) == want
    brackets = None
    if bracket == "sample":
        brackets = [sample_bracket(x[torch.randint(n, (max(1, n // 3),))], n, k)]
    elif bracket == "edge":               # the answer on a bracket edge (equal values at the edge)
        brackets = [(want[0], want[0])]
    elif bracket == "wrong":
        brackets = [(float(x.max()) * 2 + 1, math.inf)]
    with kernels(numpy, store_all):
        got, passes = select(x, [k, 1, n], blocks=blocks, brackets=None if brackets is None else brackets * 3)
    assert got == [want, reference(x, 1), reference(x, n)]
    assert passes <= 3


def test_sparsify_selection_matches_the_old_one_past_the_sample_threshold():
    """sparsify's ``_kth_largest`` (now kth.py) against its former body, sampled sizes and ties."""
    g = torch.Generator().manual_seed(3)
    n = 300_000
    b = torch.randn(n, generator=g).bfloat16().float()
    e = (b + 0.01 * torch.randn(n, generator=g)).bfloat16().float()
    e[: n // 10] = b[: n // 10]
    a = (e - b).abs()
    for k in (1, 300, int(0.2 * n), n - 5, n):
        got = _kth_largest(lambda sl: (e[sl] - b[sl]).abs_(), lambda i: (e[i] - b[i]).abs_(), n, k,
                           torch.device("cpu"))
        assert got == old_kth_largest(a, k) == reference(a, k)
