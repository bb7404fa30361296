"""Merge LoRA adapters in ΔW space into one PEFT adapter (``output: {format: lora}``).

Every expert is a LoRA adapter of the recipe's base. For each adapted weight matrix the experts'
changes are ``ΔWᵢ = scale · Bᵢ Aᵢ`` (zero for an adapter without that module) and the merged
change ``ΔW`` is computed by the cheapest exact route the method allows:

``factors``
    the low-rank methods ``cat``, ``tsv``, ``iso_c``, ``knots``
    (:data:`~mergelab.methods.lora_subspace.FACTOR_METHODS`) work on the factors directly;
``concat``
    a method that is linear in the task vectors (``linear`` with normalised weights,
    ``task_arithmetic``, ...) gives ``ΔW = Σ cᵢ ΔWᵢ`` with coefficients ``cᵢ`` read off the method
    itself, i.e. the concatenation ``[c₁B₁ … c_TB_T] @ [A₁; …; A_T]`` — exact, rank Σ rᵢ;
``ties-factors``
    TIES is evaluated from the factors in small row blocks (the same result as the registered
    ``ties`` on the materialised ΔWᵢ, without ever holding them);
``dense``
    any other method runs on the materialised ΔWᵢ of this one module, from a zero base;
``dense-from-base``
    … or, when the method is not translation-invariant (``fn(W, W+Δ) − W ≠ fn(0, Δ)``, e.g.
    ``slerp``), on ``W + ΔWᵢ`` with ``ΔW = fn(W, …) − W``; the result is then rarely low-rank,
    which the recorded error shows.

The adapter output is exact where the route is (ranks add up: Σ rᵢ), unless ``output.rank`` asks
for less or ``output.energy`` for a share of the energy: then, and for the dense routes always,
``ΔW`` is re-factored by a truncated SVD — exact via QR of the stacked factors for the factor
routes (:func:`~mergelab.lora.truncate`), randomised with a measured error for dense matrices
(:func:`~mergelab.lora.lowrank_approx`). A dense route without ``output.rank`` keeps Σ rᵢ (the
rank an exact linear merge would need). The relative reconstruction error
``‖ΔW − B'A'‖_F / ‖ΔW‖_F`` of every module is written to ``merge_report.json`` beside the adapter.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.io.adapter import (LowRank, LoraExpertSource, OutputModule, concat, is_adapter_dir, lowrank_approx, open_lora_expert, truncate, write_adapter)
from mergelab.methods import MethodParams, MethodSpec, get_method
from mergelab.progress import ProgressBar
from mergelab.methods.lora_subspace import FACTOR_METHODS
from mergelab.recipe import layer_depths
from mergelab.util import natural_key

REPORT_NAME = "merge_report.json"
_BLOCK_ELEMS = 1 << 20   # elements of all experts' rows in flight per block on the CPU (4 MB)
_BLOCK_ELEMS_GPU = 1 << 27  # ... and on a GPU (512 MB)
_SAMPLE = 1 << 15        # sampled entries that bracket (or estimate) a magnitude cut


# ------------------------------------------------------------------------------- method probes


def _clone_params(p: MethodParams) -> MethodParams:
    gen = None
    if p.generator is not None:
        gen = torch.Generator(device=p.generator.device)
        gen.set_state(p.generator.get_state())
    return MethodParams(globals=dict(p.globals), experts=[dict(e) for e in p.experts], generator=gen)


def _probe_data(n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``n`` task vectors (8×8) whose sums are exact in float32 and whose magnitudes
    are all distinct, so that no rounding or tie can tell two mathematically equal results apart."""
    g = torch.Generator().manual_seed(0)
    base = torch.randint(-4, 5, (8, 8), generator=g).float()
    deltas = []
    for _ in range(n):
        mag = (torch.randperm(64, generator=g) + 1).float().view(8, 8) / 16
        sign = torch.randint(0, 2, (8, 8), generator=g).float() * 2 - 1
        deltas.append(mag * sign)
    return base, deltas


def _close(a: torch.Tensor, b: torch.Tensor, scale: float) -> bool:
    return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) <= 1e-5 * max(scale, 1.0)


def translation_invariant(spec: MethodSpec, p: MethodParams, n: int) -> bool:
    """Whether ``fn(W, [W + Δᵢ]) − W == fn(0, [Δᵢ])`` for these parameters (tested on a probe).

    True for every task-vector method (TIES, DARE, ...); false for ``slerp`` and for ``linear``
    with weights that do not sum to 1 without normalisation (the base weights get scaled too).
    """
    base, deltas = _probe_data(n)
    scale = float(base.abs().max()) + max(float(d.abs().max()) for d in deltas)
    plain = spec.fn(torch.zeros_like(base), deltas, _clone_params(p))
    shifted = spec.fn(base, [base + d for d in deltas], _clone_params(p)) - base
    return _close(plain, shifted, scale)


def linear_coefficients(spec: MethodSpec, p: MethodParams, n: int) -> list[float] | None:
    """``cᵢ`` with ``fn(W, [W + Δᵢ]) − W = Σ cᵢ Δᵢ``, or None if the method is not that for ``p``.

    Only methods registered ``linear_in_delta`` are asked. The coefficients are read off the
    method itself — ``fn(0, [e₁, …, e_n])`` with unit vectors ``eᵢ`` is ``c`` — and then checked
    on a probe with a non-zero base, so a method whose base does not cancel (``linear`` without
    normalisation) is caught.
    """
    if not spec.linear_in_delta or spec.random:
        return None
    eye = torch.eye(n)
    coeffs = spec.fn(torch.zeros(n), [eye[i] for i in range(n)], _clone_params(p))
    base, deltas = _probe_data(n)
    got = spec.fn(base, [base + d for d in deltas], _clone_params(p)) - base
    want = sum(float(c) * d for c, d in zip(coeffs, deltas))
    scale = float(base.abs().max()) + max(float(d.abs().max()) for d in deltas) * float(coeffs.abs().sum())
    return [float(c) for c in coeffs] if _close(got, want, scale) else None


# ------------------------------------------------------------------------------- TIES on factors


def _rows_per_block(n_experts: int, cols: int, device: torch.device) -> int:
    budget = _BLOCK_ELEMS if device.type == "cpu" else _BLOCK_ELEMS_GPU
    return max(1, budget // max(1, n_experts * cols))


class _Stack:
    """The experts' factors padded to one rank and stacked, so that a row block of every
    ``Bᵢ @ Aᵢ`` is one batched matmul. :meth:`block` is the one place these values are computed,
    so every pass over them sees the same bits (zero padding adds exact zeros)."""

    def __init__(self, parts: Sequence[LowRank], scales: Sequence[float]):
        r = max(q.rank for q in parts)
        m, n = parts[0].shape
        dev = parts[0].B.device
        self.B = torch.zeros(len(parts), m, r, device=dev)
        self.A = torch.zeros(len(parts), r, n, device=dev)
        for i, (q, c) in enumerate(zip(parts, scales)):
            self.B[i, :, : q.rank] = q.B * c   # c = ±2^e: exact
            self.A[i, : q.rank] = q.A
        self.count, self.m, self.n = len(parts), m, n

    def block(self, r0: int, r1: int, buf: torch.Tensor) -> torch.Tensor:
        """Rows r0:r1 of every ``Bᵢ @ Aᵢ``, in ``buf`` (count × rows × in) or, for a shorter last
        block, in a new contiguous tensor."""
        out = buf if buf.shape[1] == r1 - r0 else buf.new_empty(self.count, r1 - r0, self.n)
        return torch.bmm(self.B[:, r0:r1], self.A, out=out)

    def sample(self, size: int) -> torch.Tensor:
        """``|ΔWᵢ|`` at ``size`` seeded random positions (the same for every expert), as
        (count, size): the rows of Bᵢ and columns of Aᵢ needed, gathered once, dotted pairwise."""
        g = torch.Generator().manual_seed(self.m * self.n)
        idx = torch.randint(self.m * self.n, (size,), generator=g).sort().values.to(self.B.device)
        k = self.B.shape[2]
        experts = torch.arange(self.count, device=self.B.device).view(-1, 1)
        b = self.B.reshape(-1, k).index_select(0, (experts * self.m + idx // self.n).view(-1))
        a_t = self.A.transpose(1, 2).reshape(-1, k)
        a = a_t.index_select(0, (experts * self.n + idx % self.n).view(-1))
        return b.mul_(a).sum(1).abs_().view(self.count, size)


@dataclass
class _Cut:
    """Where TIES trims one expert: keep ``|x| > v``, and ``|x| = v`` except at ``drop`` (flat
    positions of equal entries beyond the quota, which the dense form leaves out by position)."""

    v: float
    drop: torch.Tensor


def magnitude_cuts(stack: _Stack, ks: Sequence[int], rows: int, exact: bool = True) -> list[_Cut]:
    """The top-``kᵢ`` cut of ``|ΔWᵢ|`` of every expert.

    ``exact``: the bracketed selection of :mod:`mergelab.methods.sparsify` — a seeded sample of
    entries brackets each k-th value; one pass over row blocks counts the entries above the
    bracket and collects (value, position) of those inside it; the exact k-th value is selected
    among them (a bracket that missed is widened and that expert redone, so the sample decides the
    speed, never the answer). Equal values at the cut are kept in flat order, as ``topk_mask``.

    Otherwise the cut is the same order statistic of that sample, scaled to the matrix: no pass
    over the matrix, and each kept share within about ±1.5 % (relative, one standard deviation,
    at density 0.2) of the density — which is a different TIES result, not an approximation of
    the exact one to rounding: on 27 random rank-8 adapters of a 4096² matrix it changed 4 % of
    the entries of the merged ΔW and its norm-wise value by 15 %. Matrices of at most four
    samples' entries always get the exact cut.
    """
    m, n, count = stack.m, stack.n, stack.count
    total = m * n
    device = stack.B.device
    lo = torch.full((count,), -math.inf, device=device)
    hi = torch.full((count,), math.inf, device=device)
    if total > 4 * _SAMPLE:
        sample = stack.sample(_SAMPLE)

        def kth(i: int, j: int) -> torch.Tensor:  # the j-th largest sampled value of expert i
            return sample[i].kthvalue(_SAMPLE - min(_SAMPLE, max(1, j)) + 1).values

        if not exact:
            none = torch.empty(0, dtype=torch.int64, device=device)
            return [_Cut(float(kth(i, round(k * _SAMPLE / total))), none) for i, k in enumerate(ks)]
        for i, k in enumerate(ks):
            r = k * _SAMPLE / total            # ± 4 binomial standard deviations + 16
            margin = 4.0 * math.sqrt(r * (1.0 - k / total)) + 16.0
            j_hi, j_lo = int(r - margin), int(math.ceil(r + margin))
            if j_hi >= 1:
                hi[i] = kth(i, j_hi) * (1 + 1e-5)
            if j_lo <= _SAMPLE:
                lo[i] = kth(i, j_lo) * (1 - 1e-5)
    cuts: list[_Cut | None] = [None] * count
    todo = list(range(count))
    buf = torch.empty(count, min(rows, m), n, device=device)
    for _ in range(2):
        finite = bool(torch.isfinite(lo[todo]).all() and torch.isfinite(hi[todo]).all())
        mid, half = ((lo + hi) / 2).view(-1, 1), ((hi - lo) / 2).view(-1, 1)
        above = [0] * count
        vals: list[list[torch.Tensor]] = [[] for _ in range(count)]
        where: list[list[torch.Tensor]] = [[] for _ in range(count)]
        edges = torch.arange(count + 1, device=device)
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            a = stack.block(r0, r1, buf).abs_().view(count, -1)
            width = a.shape[1]
            if len(todo) == count and finite:      # first pass, sampled brackets: vectorised
                for i in todo:
                    above[i] += int(torch.count_nonzero(a[i] > hi[i]))
                f = ((a - mid).abs_() <= half).view(-1).nonzero().view(-1)   # lo ≤ |x| ≤ hi
            elif len(todo) == count and not torch.isfinite(lo).any() and not torch.isfinite(hi).any():
                f = torch.arange(a.numel(), device=device)                     # no sample: take all
            else:                                   # a bracket that missed, redone as a half-line
                fs = []
                for i in todo:
                    if hi[i] < math.inf:
                        above[i] += int(torch.count_nonzero(a[i] > hi[i]))
                    fs.append(((a[i] >= lo[i]) & (a[i] <= hi[i])).nonzero().view(-1) + i * width)
                f = torch.cat(fs)
            got = a.view(-1)[f]
            cut = torch.searchsorted(f, edges * width).tolist()  # f is increasing: split by expert
            for i in todo:
                if cut[i + 1] > cut[i]:
                    vals[i].append(got[cut[i]:cut[i + 1]])
                    where[i].append(f[cut[i]:cut[i + 1]] - i * width + r0 * n)
        retry = []
        for i in todo:
            v_i = torch.cat(vals[i]) if vals[i] else torch.empty(0, device=device)
            p_i = torch.cat(where[i]) if where[i] else torch.empty(0, dtype=torch.int64, device=device)
            need = ks[i] - above[i]
            if not 1 <= need <= v_i.numel():
                lo[i], hi[i] = (hi[i], math.inf) if need < 1 else (-math.inf, lo[i])
                retry.append(i)
                continue
            v = v_i.kthvalue(v_i.numel() - need + 1).values
            quota = need - int((v_i > v).sum())
            cuts[i] = _Cut(float(v), p_i[v_i == v][quota:])   # positions in flat order
        if not retry:
            return cuts  # type: ignore[return-value]
        todo = retry
    raise AssertionError("unreachable: a half-line bracket always holds the k-th value")


def ties_from_factors(parts: Sequence[LowRank | None], p: MethodParams, shape: tuple[int, int],
                      device: torch.device, *, exact_cut: bool = True) -> torch.Tensor | None:
    """The registered ``ties`` of the ΔWᵢ = BᵢAᵢ with a zero base, computed from the factors.

    Same definition as :func:`mergelab.methods.sparsify.ties`: keep the ⌊density·n⌋ largest
    ``|ΔWᵢ|`` (:func:`magnitude_cuts`), ``dᵢ = wᵢ · trimmed ΔWᵢ``, elect the sign of ``Σ dᵢ`` per
    entry (``+`` for 0), and ``λ · Σ_agreeing dᵢ / Σ_agreeing wᵢ`` (no division with
    ``normalize: false``). Row blocks of all experts are formed from the factors, trimmed and
    reduced while in cache, so memory stays at one output matrix and nothing is formed twice
    per pass; with ``exact_cut`` the result equals the dense form up to the order of float
    additions (the cut costs one more pass; ``exact_cut=False`` takes it from a sample).

    The reductions over experts are matrix-vector products on values scaled so that each
    expert's cut lies in [1, 2) (by a power of two, ``±2^eᵢ``, which is exact): then a kept
    entry has ``|x| ≥ 1`` and ``clamp(x, 0, 1)`` is exactly the indicator ``[x > 0]``.

    Returns None when the dense form must be used: ``rescale: true``, a ``density`` of 1 or
    more (no trimming), or a cut at magnitude 0 (an expert that is mostly exact zeros).
    """
    m, n = shape
    weights = [float(w) for w in p.per_expert("weight", 1.0)]
    densities = [float(d) for d in p.per_expert("density", 1.0)]
    if len(weights) != len(parts):
        weights, densities = [1.0] * len(parts), [float(p.get("density", 1.0))] * len(parts)
    if bool(p.get("rescale", False)):
        return None
    normalize = bool(p.get("normalize", True))
    lam = float(p.get("lambda", 1.0))
    used: list[tuple[LowRank, float, float]] = []
    for q, w, d in zip(parts, weights, densities):
        if q is None or q.rank == 0 or w == 0 or d <= 0:
            continue  # nothing kept, or weight 0: no part in the sum, the sign or the divisor
        if d >= 1:
            return None
        used.append((q, w, d))
    out = torch.zeros(m, n, device=device)
    if not used:
        return out
    count = len(used)
    rows = _rows_per_block(count, n, device)
    # sign(wᵢ) folded into Bᵢ (exact), so that dᵢ > 0 ⟺ xᵢ > 0 and dᵢ = |wᵢ| xᵢ
    stack = _Stack([q for q, _, _ in used], [1.0 if w > 0 else -1.0 for _, w, _ in used])
    cuts = magnitude_cuts(stack, [max(1, int(d * m * n)) for _, _, d in used], rows, exact=exact_cut)
    if any(c.v <= 0 for c in cuts):
        return None  # most entries are exactly 0: the cut keeps every non-zero, leave it to the dense form
    # rescale expert i by 2^eᵢ with 2^eᵢ · vᵢ ∈ [1, 2): exact, so the cut stays where it was
    exps = [(-math.frexp(c.v)[1] + 1) if c.v > 0 else 0 for c in cuts]
    stack = _Stack([q for q, _, _ in used], [math.ldexp(1.0 if w > 0 else -1.0, e)
                                            for (_, w, _), e in zip(used, exps)])
    below = [float(torch.nextafter(torch.tensor(math.ldexp(c.v, e)), torch.tensor(0.0)))
             for c, e in zip(cuts, exps)]                        # |x'| > below ⟺ |x| ≥ vᵢ
    coef = torch.tensor([[abs(w) * math.ldexp(1.0, -e) for (_, w, _), e in zip(used, exps)]], device=device)
    w_sgn = torch.tensor([[w for _, w, _ in used]], device=device)
    buf = torch.empty(count, min(rows, m), n, device=device)
    kept = torch.empty_like(buf)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        x = stack.block(r0, r1, buf).view(count, -1)
        y = kept.view(count, -1)[:, : x.shape[1]]
        for i, c in enumerate(cuts):
            torch.ops.aten.hardshrink.out(x[i], below[i], out=y[i])       # trim
            if c.drop.numel():  # equal values beyond the quota, by position
                d = c.drop[(c.drop >= r0 * n) & (c.drop < r1 * n)]
                if d.numel():
                    y[i, d - r0 * n] = 0.0
        mixed = (coef @ y).view(-1)                              # Σ dᵢ
        if normalize:
            diff = (w_sgn @ y.clamp(-1, 1)).view(-1)             # Σ wᵢ [dᵢ > 0] − Σ wᵢ [dᵢ < 0]
        pos = (coef @ y.clamp_(min=0)).view(-1)                  # Σ of positive dᵢ
        neg = mixed - pos
        if normalize:
            cp = (w_sgn @ y.clamp_(max=1)).view(-1)              # Σ wᵢ [dᵢ > 0]
            cn = cp - diff                                       # Σ wᵢ [dᵢ < 0]
            pos.div_(cp.masked_fill_(cp == 0, 1.0))
            neg.div_(cn.masked_fill_(cn == 0, 1.0))
        torch.where(mixed >= 0, pos, neg, out=out[r0:r1].view(-1))
    return out.mul_(lam) if lam != 1.0 else out


# ------------------------------------------------------------------------------- one module


@dataclass
class ModuleResult:
    """The merged ΔW of one module as factors, and how it was obtained."""

    name: str
    factors: LowRank
    route: str
    input_rank: int
    rel_error: float


def _limit(lr: LowRank, rank: int | None, energy: float | None) -> tuple[LowRank, float]:
    """Keep an exact factorisation as it is unless a rank or energy limit asks for less."""
    if energy is None and (rank is None or rank >= lr.rank):
        return lr, 0.0
    return truncate(lr, rank, energy)


def svd_generator(seed: int, name: str) -> torch.Generator:
    """The CPU generator of the randomised SVD of one tensor, from (recipe seed, tensor name)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{name}\x00lora-svd".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return g


def merge_module(name: str, parts: Sequence[LowRank | None], spec: MethodSpec, p: MethodParams,
                 shape: tuple[int, int], *, rank: int | None = None, energy: float | None = None,
                 base_tensor: Callable[[], torch.Tensor] | None = None, seed: int = 0,
                 device: torch.device = torch.device("cpu"), exact_ties: bool = True) -> ModuleResult:
    """Merge one module's ΔWᵢ (``None``: the adapter lacks it) into factors; see the module doc."""
    try:
        return _merge_module(name, parts, spec, p, shape, rank, energy, base_tensor, seed, device, exact_ties)
    except RecipeError as exc:
        raise RecipeError(f"{spec.name} on tensor {name!r}: {exc.message}", hint=exc.hint) from None


def _merge_module(name, parts, spec, p, shape, rank, energy, base_tensor, seed, device, exact_ties) -> ModuleResult:
    in_rank = sum(q.rank for q in parts if q is not None)
    if spec.name in FACTOR_METHODS:
        lr, err = _limit(FACTOR_METHODS[spec.name](parts, p, shape), rank, energy)
        return ModuleResult(name, lr, "factors", in_rank, err)
    coeffs = linear_coefficients(spec, p, len(parts))
    if coeffs is not None:
        lr, err = _limit(concat(parts, coeffs, shape), rank, energy)
        return ModuleResult(name, lr, "concat", in_rank, err)
    merged, route = None, "ties-factors"
    if spec.name == "ties":
        merged = ties_from_factors(parts, p, shape, device, exact_cut=exact_ties)
    if merged is None:
        merged, route = _dense_merge(spec, p, parts, shape, base_tensor, device)
    target = rank if rank is not None else max(1, min(in_rank, min(shape)))
    lr, err = lowrank_approx(merged, target, energy, generator=svd_generator(seed, name))
    return ModuleResult(name, lr, route, in_rank, err)


def _dense_merge(spec, p, parts, shape, base_tensor, device) -> tuple[torch.Tensor, str]:
    deltas = [q.dense() if q is not None else torch.zeros(shape, device=device) for q in parts]
    if translation_invariant(spec, p, len(parts)):
        return spec.fn(torch.zeros(shape, device=device), deltas, p), "dense"
    if base_tensor is None:
        raise RecipeError(f"{spec.name} is not a task-vector method (its result depends on the base "
                          "weights themselves) and no base tensor was given")
    w = base_tensor().to(device, torch.float32)
    for d in deltas:
        d.add_(w)
    return spec.fn(w, deltas, p) - w, "dense-from-base"


# ------------------------------------------------------------------------------- the pipeline




def merge_lora_experts(base, experts: Sequence[LoraExpertSource], spec: MethodSpec,
                       params_for: Callable[[str], MethodParams], *, rank: int | None = None,
                       energy: float | None = None, device: torch.device = torch.device("cpu"),
                       seed: int = 0, workers: int | None = None, exact_ties: bool = True,
                       on_module: Callable[[ModuleResult], None] | None = None) -> list[ModuleResult]:
    """Merge every module that at least one adapter changes; results in the base's tensor order.

    ``base`` is the base :class:`~mergelab.checkpoint.TensorSource` (read only by the
    ``dense-from-base`` route), ``params_for(name)`` the method parameters of one tensor.
    ``workers`` modules are merged at once (default: one per torch thread on the CPU, each
    running torch single-threaded, as the engine does, so the bits do not depend on ``workers``;
    one on a GPU); only their factors (and, on the dense routes, their ΔWᵢ) are held.
    """
    names = sorted({n for e in experts for n in e.modules}, key=natural_key)
    threads = torch.get_num_threads()
    n_workers = workers or (max(1, threads) if device.type == "cpu" else 1)

    def work(name: str) -> ModuleResult:
        parts = [e.factors(name) for e in experts]
        parts = [None if q is None else q.to(device) for q in parts]
        res = merge_module(name, parts, spec, params_for(name), tuple(base.shape(name)), rank=rank,
                           energy=energy, base_tensor=lambda: base.get(name), seed=seed, device=device,
                           exact_ties=exact_ties)
        return ModuleResult(res.name, res.factors.to("cpu"), res.route, res.input_rank, res.rel_error)

    results: list[ModuleResult] = []
    if device.type == "cpu":  # single-threaded torch per module: the same bits for any worker count
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="mergelab-lora") as pool:
            pending = deque(names)
            inflight: deque = deque()
            try:
                while pending or inflight:
                    while pending and len(inflight) < n_workers:
                        inflight.append(pool.submit(work, pending.popleft()))
                    res = inflight.popleft().result()   # in order: the output does not depend on timing
                    results.append(res)
                    if on_module is not None:
                        on_module(res)
            except BaseException:
                for fut in inflight:
                    fut.cancel()
                raise
    finally:
        torch.set_num_threads(threads)
    return results


@dataclass
class LoraMergeResult:
    """What :func:`merge_to_adapter` did."""

    out_dir: Path
    modules: int
    max_rank: int
    parameters: int
    max_rel_error: float
    routes: dict[str, int]
    device: str
    method: str
    seconds: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        routes = ", ".join(f"{k} {v}" for k, v in sorted(self.routes.items()))
        return (f"merged {self.modules} LoRA modules with {self.method} on {self.device} into one adapter "
                f"(rank ≤ {self.max_rank}, {self.parameters / 1e6:.2f} M parameters; routes: {routes}; "
                f"largest relative error {self.max_rel_error:.2e}) in {self.seconds.get('total', 0):.1f} s "
                f"→ {self.out_dir}")


def _common(values, default=None):
    vals = set(values)
    return vals.pop() if len(vals) == 1 else default


def merge_to_adapter(recipe, out_dir: str | os.PathLike, *, device: str = "auto", force: bool = False,
                     progress: bool = True, workers: int | None = None,
                     exact_ties: bool = True) -> LoraMergeResult:
    """Merge the recipe's LoRA experts into one PEFT adapter in ``out_dir`` (``output.format: lora``).

    Writes ``adapter_config.json``, ``adapter_model.safetensors`` and ``merge_report.json`` (method,
    inputs, and per module the route, ranks and relative reconstruction error) into a temporary
    folder that is renamed into place at the end. Every expert must be a LoRA adapter of the base.
    ``exact_ties=False`` (or the recipe's ``output.ties_cuts: sampled``) takes TIES' magnitude
    cuts from a sample instead of a pass over every
    ΔWᵢ: about twice as fast for many large adapters, but a different TIES result (each kept
    share within ~1.5 % of ``density``; see :func:`magnitude_cuts`).
    """
    from mergelab.util import atomic_output_dir, check_output_dir
    from mergelab.merge.full import check_not_an_input, data_statistics, open_inputs
    from mergelab.util import pick_device
    from mergelab.recipe import Recipe, layer_of, load_recipe, resolve_params

    t0 = time.perf_counter()
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    out_dir = Path(out_dir)
    check_output_dir(out_dir, force)
    dev = pick_device(device)
    spec = get_method(recipe.method.name)
    base_path = recipe.base.resolve()
    expert_paths = [Path(e.resolve()) for e in recipe.experts]
    for i, path in enumerate(expert_paths):
        if not is_adapter_dir(path):
            raise RecipeError(
                f"experts[{i}] ({path}): output format lora needs every expert to be a LoRA adapter, "
                "and this is not one (no adapter_config.json)",
                hint="use output format full to merge full fine-tunes, alone or mixed with LoRA adapters")
    check_not_an_input(out_dir, [base_path, *expert_paths])
    opened: list = []
    try:
        base, experts = open_inputs(base_path, expert_paths, opened, open_lora_expert)
        kinds = {}
        for e in experts:
            for name, mod in e.modules.items():
                if kinds.setdefault(name, mod.kind) != mod.kind:
                    raise RecipeError(f"tensor {name!r} is adapted as {kinds[name]} by one expert and "
                                      f"as {mod.kind} by {e.path}")
        grams = data_statistics(recipe, base_path, expert_paths, experts, dev, progress)
        base_names = base.keys()
        depth = layer_depths(base_names)
        deepest = max(depth.values(), default=0)

        def params_for(name: str) -> MethodParams:
            loc = layer_of(name)
            p = resolve_params(recipe, name, depth.get(loc[0], 0) if loc else deepest)
            if grams is not None:
                p.stats = [g.get(name, dev) for g in grams]
            return p

        with _Progress(len(kinds), progress) as bar:
            results = merge_lora_experts(base, experts, spec, params_for, rank=recipe.output.rank,
                                         energy=recipe.output.energy, device=dev, seed=recipe.seed,
                                         workers=workers, exact_ties=exact_ties and recipe.output.ties_cuts == "exact",
                                         on_module=bar.advance)
        t_merge = time.perf_counter()
        modules = {r.name: OutputModule(r.factors, kinds[r.name]) for r in results}
        dtype = recipe.output.torch_dtype or _common((e.adapter.dtype for e in experts), torch.float32)
        base_id = recipe.base.model if recipe.base.model is not None else str(Path(base_path).absolute())
        report = _report(recipe, spec, experts, results, dtype)
        with atomic_output_dir(out_dir, force) as tmp:
            write_adapter(tmp, modules, base_model_name_or_path=base_id,
                          task_type=_common(e.adapter.task_type for e in experts),
                          dtype=dtype, base_keys=base_names, revision=recipe.base.revision)
            (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    finally:
        for src in opened:
            src.close()
    t_end = time.perf_counter()
    written = [r for r in results if r.factors.rank > 0]
    routes: dict[str, int] = {}
    for r in results:
        routes[r.route] = routes.get(r.route, 0) + 1
    return LoraMergeResult(
        out_dir=out_dir, modules=len(written), max_rank=max((r.factors.rank for r in written), default=0),
        parameters=sum(r.factors.B.numel() + r.factors.A.numel() for r in written),
        max_rel_error=max((r.rel_error for r in results), default=0.0), routes=routes, device=str(dev),
        method=spec.name, seconds={"merge": t_merge - t0, "total": t_end - t0})


def _report(recipe, spec: MethodSpec, experts: Sequence[LoraExpertSource], results: Sequence[ModuleResult],
            dtype: torch.dtype) -> dict:
    errors = [r.rel_error for r in results]
    return {
        "method": {"name": spec.name, **recipe.method.params},
        "seed": recipe.seed,
        "base": str(recipe.base),
        "experts": [{"path": str(e.path), "base_model_name_or_path": e.adapter.base_model_name_or_path,
                     "modules": len(e.modules), "ranks": sorted({m.rank for m in e.modules.values()}),
                     **dict(recipe.experts[i].params)} for i, e in enumerate(experts)],
        "output": {"rank": recipe.output.rank, "energy": recipe.output.energy, "dtype": str(dtype).removeprefix("torch.")},
        "summary": {"modules": len(results), "max_rel_error": max(errors, default=0.0),
                    "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
                    "max_rank": max((r.factors.rank for r in results), default=0)},
        "modules": {r.name: {"route": r.route, "input_rank": r.input_rank, "rank": r.factors.rank,
                             "rel_error": r.rel_error} for r in results},
    }


def _module_columns() -> tuple:
    from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

    return (TextColumn("[bold]merging adapters[/]"), BarColumn(),
            TextColumn("{task.completed}/{task.total} modules"), TimeElapsedColumn(),
            TextColumn("[dim]{task.fields[current]}[/]"))


class _Progress(ProgressBar):
    """A progress bar over modules, or nothing."""

    def __init__(self, total: int, show: bool):
        super().__init__(show, _module_columns, total, current="")

    def advance(self, res: ModuleResult) -> None:
        self.update(advance=1, current=f"{res.name} ({res.route}, rank {res.factors.rank})")
