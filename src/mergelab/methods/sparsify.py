"""Sparsified task arithmetic: TIES, DARE, Model Breadcrumbs, DELLA (and their linear variants).

All of them follow one scheme (mergekit calls it "generalized task arithmetic"):

1. **sparsify** each task vector ``δ_i = θ_i − θ_0`` with a keep-mask ``m_i``:
   ``magnitude`` (TIES: the ``density`` share of largest ``|δ_i|``), ``random`` (DARE:
   ``m_i ~ Bernoulli(density)``), ``outliers`` (Breadcrumbs: drop the ``gamma`` share of largest
   and then the smallest, keeping ``density``), ``della`` (DELLA: keep with a probability that grows
   with the magnitude rank inside each row, from ``density − ε`` to ``density + ε``);
2. optionally **rescale** (``rescale: true``) the kept part to the L1 norm of the whole:
   ``δ̃_i = (m_i ⊙ δ_i) · ‖δ_i‖₁ / ‖m_i ⊙ δ_i‖₁`` (unchanged if either norm is below 1e-7);
3. **weight**: ``d_i = w_i δ̃_i``;
4. optionally elect a **sign** per entry (TIES "sum" consensus): ``s = sign(Σ_i d_i)`` (``+`` for
   0) and keep only the entries that agree: ``a_i = [sign(d_i) = s]``; otherwise ``a_i = 1``;
5. **combine**: ``δ = Σ_i a_i d_i``, divided by ``Σ_i a_i w_i`` (per entry, 1 where it is 0) with
   consensus, or by ``Σ_i w_i`` without, when ``normalize: true``; ``θ = θ_0 + λ δ``.

Exact-count selection (magnitude, outliers) keeps exactly ``max(1, ⌊density · n⌋)`` entries; among
entries of equal magnitude at the cut, the lower flat index wins, so the result is deterministic.
Random masks use uniform numbers drawn on the CPU from ``p.generator`` (in flat order, expert by
expert), so they do not depend on the device.

Work is done in chunks of the flattened tensor, so the temporaries stay small and in cache and
peak memory stays near inputs + output; only the selection thresholds need a pass over the whole
tensor first. Inputs are float32 (or any float type) of one shape; the result has that shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import CHUNK, Block, Blockwise, MethodParams, Passes, chunks, register, run_whole
from mergelab.methods.kth import KthLargest, sample_bracket
from mergelab.methods.ties_factors import ties_from_factors

RANDOM_CHUNK = 1 << 20  # uniform numbers drawn per call (the draw itself is order-preserving)
_SAMPLE = 1 << 16       # sample size for locating a selection threshold


def uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` uniform numbers in [0, 1), drawn on the CPU in flat order, then moved to ``device``."""
    if generator is None:
        raise RecipeError("a random merge method was called without a random generator")
    out = torch.empty(n, device=generator.device)
    for s in range(0, n, RANDOM_CHUNK):   # in place: the same numbers as torch.rand, no copies
        out[s: s + RANDOM_CHUNK].uniform_(generator=generator)
    return out.to(device)


# --------------------------------------------------------------------------- exact top-k selection


def _kth_largest(delta: Callable[[slice], torch.Tensor], at: Callable[[torch.Tensor], torch.Tensor],
                 n: int, k: int, device: torch.device) -> tuple[float, int, int]:
    """The k-th largest of ``|δ|`` (1 ≤ k ≤ n): ``(v, #(|δ| > v), #(|δ| = v))``.

    ``delta(slice)`` gives a chunk of ``|δ|``; ``at(index)`` gives ``|δ|`` at given positions.
    A random sample brackets ``v`` (:func:`~mergelab.methods.kth.sample_bracket`); one pass over
    the chunks counts the entries above the bracket and keeps the (few) inside it, and the exact
    ``v`` is selected among those (:class:`~mergelab.methods.kth.KthLargest`). A bracket that
    misses costs two histogram passes more, so the answer is always exact; the sample only
    decides how fast it is found.
    """
    bracket = (-math.inf, math.inf)  # a short tensor is kept whole
    if n > 4 * _SAMPLE:
        g = torch.Generator().manual_seed(n)  # fixed: the sample affects speed, never the result
        bracket = sample_bracket(at(torch.randint(n, (_SAMPLE,), generator=g).to(device)), n, k)
    sel = KthLargest(n, [k], device, brackets=[bracket])
    while True:
        for sl in chunks(n, device):
            sel.observe(delta(sl))
        if not sel.next_pass():
            return sel.result()


def topk_mask(e: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` entries of largest ``|e − b|`` (flat tensors); ties: lower index first
    (the whole-tensor form of :class:`Cut`)."""
    n = e.numel()
    cut = Cut(k)
    if 0 < k < n:
        cut.v, cut.n_gt, cut.n_eq = _kth_largest(lambda sl: (e[sl] - b[sl]).abs_(),
                                                 lambda i: (e[i] - b[i]).abs_(), n, k, e.device)
    return cut.mask((e - b).abs_(), cut.start(), n)


# ------------------------------------------------------------------------------------ keep masks


@dataclass
class Cut:
    """An exact top-``k`` cut of ``|δ_i|``: keep ``> v``, and the first ``quota`` entries ``= v``."""

    k: int
    v: float = math.inf
    n_gt: int = 0
    n_eq: int = 0

    def start(self) -> list[int]:
        """The quota of entries equal to ``v`` still to keep, carried through one pass in order."""
        return [self.k - self.n_gt]

    def mask(self, a: torch.Tensor, quota: list[int], n: int) -> torch.Tensor:
        """Keep-mask of a block of ``|δ|`` (flat, in order) under this cut."""
        if self.k <= 0:
            return torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
        if self.k >= n:
            return torch.ones(a.numel(), dtype=torch.bool, device=a.device)
        if quota[0] >= self.n_eq:  # no tie at the cut: keep everything at or above v
            return a >= self.v
        m = a > self.v
        if quota[0] > 0:   # the first `quota` entries equal to v, in flat order
            take = torch.nonzero(a == self.v).view(-1)[: quota[0]]
            m[take] = True
            quota[0] -= take.numel()
        return m


@dataclass
class _Sparsifier:
    """The keep-mask of one expert: a kind, its cuts (magnitude, outliers) or random states."""

    kind: str
    density: float
    cuts: list[Cut] = field(default_factory=list)
    epsilon: float = 0.0
    states: dict[int, torch.Tensor] = field(default_factory=dict)  # block start → generator state

    def start(self) -> list[list[int]]:
        return [c.start() for c in self.cuts]

    @property
    def random(self) -> bool:
        return self.kind in ("random", "della")

    def cut_mask(self, a: torch.Tensor, carry: list[list[int]], n: int) -> torch.Tensor:
        """Keep-mask of the next entries ``a = |δ|`` (flat, in order) under the magnitude cuts."""
        if self.kind == "magnitude":
            return self.cuts[0].mask(a, carry[0], n)
        return self.cuts[1].mask(a, carry[1], n) & ~self.cuts[0].mask(a, carry[0], n)

    def mask(self, blk: Block, i: int, carry: list[list[int]], n: int, generator: torch.Generator | None) -> torch.Tensor:
        """Keep-mask (flat bool) of expert ``i`` over one block."""
        e, b = blk.experts[i].reshape(-1), blk.base.reshape(-1)
        if not self.random:
            return self.cut_mask(torch.sub(e, b).abs_(), carry, n)
        if self.kind == "della" and self.density <= 0:   # nothing kept, nothing drawn
            return torch.zeros(e.numel(), dtype=torch.bool, device=e.device)
        gen = torch.Generator(device=generator.device)
        gen.set_state(self.states[blk.start])
        u = uniform(e.numel(), gen, e.device)
        if self.kind == "random":
            return u < self.density
        return _della_block(e, b, blk.shape, self.density, self.epsilon, u)


def _della_block(e, b, shape, density, eps, u) -> torch.Tensor:
    """DELLA's keep-mask of whole rows: keep an entry with a probability that grows with its rank."""
    n = e.numel()
    if density <= 0:
        return torch.zeros(n, dtype=torch.bool, device=e.device)
    cols = shape[-1] if len(shape) >= 2 else n
    rows = n // cols if cols else 0
    keep = torch.empty(n, dtype=torch.bool, device=e.device)
    step = max(1, CHUNK // max(cols, 1))
    for r0 in range(0, rows, step):
        sl = slice(r0 * cols, min(rows, r0 + step) * cols)
        a = (e[sl] - b[sl]).abs_().view(-1, cols)
        rank = a.argsort(dim=1, stable=True).argsort(dim=1).to(torch.float32)  # 0 = smallest in row
        rank_norm = rank / (cols - 1) if cols > 1 else torch.full_like(rank, 0.5)
        prob = (density - eps) + rank_norm * 2 * eps
        keep[sl] = u[sl] < prob.view(-1)
    return keep


def _sparsifier(kind: str, density: float, n: int, p: MethodParams, i: int) -> _Sparsifier:
    if kind == "magnitude":
        return _Sparsifier(kind, density, [Cut(max(1, int(density * n)) if density > 0 else 0)])
    if kind == "outliers":
        gamma = float(p.per_expert("gamma", 0.01)[i])
        if not 0 <= gamma <= 1:
            raise RecipeError(f"gamma must be in [0, 1], got {gamma}")
        keep_n = int(density * n)
        skip_top = min(int(gamma * n), n - keep_n)  # fewer outliers dropped if density needs them
        return _Sparsifier(kind, density, [Cut(skip_top), Cut(skip_top + keep_n)])
    eps = 0.0
    if kind == "della" and density > 0:
        eps = float(p.per_expert("epsilon", 0.15)[i])
        if not (0 < density - eps and density + eps < 1):
            raise RecipeError(f"della: density ± epsilon must lie inside (0, 1), got density {density} "
                              f"and epsilon {eps}", hint="lower epsilon, or move density away from 0 and 1")
    return _Sparsifier(kind, density, epsilon=eps)


# ------------------------------------------------------------------------------------ the scheme


@dataclass
class _GtaStats:
    """What every block of a sparsified task-arithmetic merge shares."""

    n: int
    weights: list[float]
    coefs: list[float]
    sparsifiers: list[_Sparsifier | None]
    normalize: bool
    lam: float
    carry: list[list[list[int]]] = field(default_factory=list)  # per expert, per cut: quota left


def _find_cuts(passes: Passes, cuts: list[tuple[int, Cut]], n: int) -> None:
    """Fill in the exact value of every cut ``(expert, cut)`` with ``0 < k < n``: one pass when the
    sample's brackets hold, two histogram passes more where one misses."""
    todo = [(i, c) for i, c in cuts if 0 < c.k < n]
    if not todo:
        return
    experts = sorted({i for i, _ in todo})
    brackets: dict[int, list] = {i: [None] * sum(1 for j, _ in todo if j == i) for i in experts}
    if passes.sample is not None:
        blk = passes.sample()
        b = blk.base.reshape(-1)
        for i in experts:
            s = torch.sub(blk.experts[i].reshape(-1), b).abs_()
            brackets[i] = [sample_bracket(s, n, c.k) for j, c in todo if j == i]
    sel = {i: KthLargest(n, [c.k for j, c in todo if j == i], passes.device, brackets=brackets[i]) for i in experts}
    active = dict(sel)
    while active:
        for blk in passes():
            b = blk.base.reshape(-1)
            for i, s in active.items():
                s.observe(torch.sub(blk.experts[i].reshape(-1), b).abs_())
        active = {i: s for i, s in active.items() if s.next_pass()}
    for i, s in sel.items():
        for j, c in enumerate(c for e, c in todo if e == i):
            c.v, c.n_gt, c.n_eq = s.result(j)


def _gta_stats(passes: Passes, p: MethodParams, shape: tuple, *, sparsify: str | None, consensus: bool,
               normalize: bool, rescale: bool) -> _GtaStats:
    """Every expert's keep rule (exact cuts, random states) and coefficient (weight × L1 rescale)."""
    n = math.prod(shape)
    weights = [float(w) for w in p.per_expert("weight", 1.0)]
    densities = [float(d) for d in p.per_expert("density", 1.0)]
    normalize = bool(p.get("normalize", normalize))
    rescale = bool(p.get("rescale", rescale))
    sps = [_sparsifier(sparsify, d, n, p, i) if sparsify is not None and d < 1 else None
           for i, d in enumerate(densities)]
    _find_cuts(passes, [(i, c) for i, sp in enumerate(sps) if sp is not None for c in sp.cuts], n)
    if any(sp is not None and sp.kind in ("random", "della") for sp in sps):
        # expert by expert, as one draw over the flattened tensor: note the generator's state
        # where each block starts, then skip the block's draws
        if p.generator is None:
            raise RecipeError("a random merge method was called without a random generator")
        layout = passes.blocks() if n else []
        for sp in sps:
            if sp is None or sp.kind not in ("random", "della") or (sp.kind == "della" and sp.density <= 0):
                continue
            for start, size in layout:
                sp.states[start] = p.generator.get_state()
                skip = torch.empty(min(RANDOM_CHUNK, size), device=p.generator.device)
                for s0 in range(0, size, RANDOM_CHUNK):
                    skip[: min(RANDOM_CHUNK, size - s0)].uniform_(generator=p.generator)
    coefs = list(weights)
    if rescale and any(sp is not None for sp in sps):
        before, after = [0.0] * len(sps), [0.0] * len(sps)
        carry = [sp.start() if sp is not None else [] for sp in sps]
        for blk in passes():
            b = blk.base.reshape(-1)
            for i, sp in enumerate(sps):
                if sp is None:
                    continue
                keep = sp.mask(blk, i, carry[i], n, p.generator)
                e = blk.experts[i].reshape(-1)
                for sl in chunks(b.numel(), b.device):
                    a = (e[sl] - b[sl]).abs_()
                    before[i] += float(a.sum(dtype=torch.float64))
                    after[i] += float(a.mul_(keep[sl]).sum(dtype=torch.float64))
        for i, sp in enumerate(sps):
            if sp is not None and before[i] >= 1e-7 and after[i] >= 1e-7:
                coefs[i] = weights[i] * (before[i] / after[i])
    st = _GtaStats(n, weights, coefs, sps, normalize, float(p.get("lambda", 1.0)))
    st.carry = [sp.start() if sp is not None else [] for sp in sps]
    return st


def _gta_apply(blk: Block, st: _GtaStats, p: MethodParams, *, consensus: bool) -> torch.Tensor:
    """One block: masked, weighted task vectors, signs elected per entry, added to the base."""
    b = blk.base.reshape(-1)
    es = [e.reshape(-1) for e in blk.experts]
    # random masks are drawn for the whole block (from the generator's state where it starts);
    # magnitude cuts are applied chunk by chunk to the task vector already in cache
    keeps = [sp.mask(blk, i, st.carry[i], st.n, p.generator) if sp is not None and sp.random else None
             for i, sp in enumerate(st.sparsifiers)]
    wsum = sum(st.weights)
    out = torch.empty_like(b)
    for sl in chunks(b.numel(), b.device):
        bc = b[sl]
        ds = []
        for i, (e, keep, c) in enumerate(zip(es, keeps, st.coefs)):
            d = torch.sub(e[sl], bc)
            if keep is not None:
                d.mul_(keep[sl])
            elif st.sparsifiers[i] is not None:
                d.mul_(st.sparsifiers[i].cut_mask(d.abs(), st.carry[i], st.n))
            if c != 1.0:
                d.mul_(c)
            ds.append(d)
        mixed = torch.add(ds[0], ds[1]) if len(ds) > 1 else ds[0].clone()
        for d in ds[2:]:
            mixed.add_(d)
        if consensus:
            sign = torch.where(mixed >= 0, 1.0, -1.0)  # the elected sign (+ for a zero sum)
            mixed.zero_()
            divisor = torch.zeros_like(bc) if st.normalize else None
            for d, w in zip(ds, st.weights):
                agree = d.mul(sign).gt_(0)  # 1 where d has the elected sign, else 0
                mixed.addcmul_(d, agree)
                if divisor is not None:
                    divisor.add_(agree, alpha=w)
            if divisor is not None:
                mixed.div_(divisor.masked_fill_(divisor == 0, 1))
        elif st.normalize and abs(wsum) >= 1e-8:
            mixed.div_(wsum)
        torch.add(bc, mixed, alpha=st.lam, out=out[sl])
    return out.view(blk.base.shape)


def gta_form(*, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool) -> Blockwise:
    """The :class:`Blockwise` form of one variant of the scheme (its defaults as keywords)."""
    return Blockwise(partial(_gta_stats, sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale),
                     partial(_gta_apply, consensus=consensus))


def generalized_task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams, *,
                                sparsify: str | None, consensus: bool, normalize: bool,
                                rescale: bool) -> torch.Tensor:
    """Steps 1–5 of the module docstring; ``normalize``/``rescale`` are the method's defaults."""
    form = gta_form(sparsify=sparsify, consensus=consensus, normalize=normalize, rescale=rescale)
    return run_whole(form, base, experts, p)


_GTA = ("weight", "density")
_COMMON = ("lambda", "normalize", "rescale", "int8_mask")


_TIES = gta_form(sparsify="magnitude", consensus=True, normalize=True, rescale=False)


@register("ties", blockwise=_TIES, from_factors=ties_from_factors, expert_params=_GTA, global_params=_COMMON)
def ties(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """TIES-Merging: trim each task vector to its largest ``density`` share, elect a sign per
    entry by mass, average the agreeing entries.

    ``m_i`` = top-⌊density·n⌋ of ``|δ_i|``; ``d_i = w_i m_i ⊙ δ_i``; ``s = sign(Σ_i d_i)``;
    ``θ = θ_0 + λ Σ_i [sign d_i = s] d_i / Σ_i [sign d_i = s] w_i``.
    Defaults: ``density`` 1, ``weight`` 1, ``lambda`` 1, ``normalize`` true, ``rescale`` false.

    Paper: Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
    NeurIPS 2023 (arXiv:2306.01708).
    """
    return run_whole(_TIES, base, experts, p)


_DARE_TIES = gta_form(sparsify="random", consensus=True, normalize=False, rescale=True)


@register("dare_ties", blockwise=_DARE_TIES, random=True, expert_params=_GTA, global_params=_COMMON)
def dare_ties(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """DARE with TIES sign election: drop entries at random, rescale, elect signs, sum.

    ``m_i ~ Bernoulli(density)``; ``δ̃_i = m_i ⊙ δ_i · ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁``; ``d_i = w_i δ̃_i``;
    ``θ = θ_0 + λ Σ_i [sign d_i = sign Σ_j d_j] d_i``.
    Defaults: ``normalize`` false, ``rescale`` true (L1, as mergekit; the paper's ``1/density``
    equals it in expectation).

    Paper: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous
    Models as a Free Lunch", ICML 2024 (arXiv:2311.03099).
    """
    return run_whole(_DARE_TIES, base, experts, p)


_DARE_LINEAR = gta_form(sparsify="random", consensus=False, normalize=False, rescale=True)


@register("dare_linear", blockwise=_DARE_LINEAR, random=True, expert_params=_GTA, global_params=_COMMON)
def dare_linear(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """DARE: drop entries of each task vector at random, rescale, add.

    ``m_i ~ Bernoulli(density)``; ``θ = θ_0 + λ Σ_i w_i m_i ⊙ δ_i · ‖δ_i‖₁/‖m_i ⊙ δ_i‖₁``.
    Defaults: ``normalize`` false, ``rescale`` true.

    Paper: Yu et al., "Language Models are Super Mario", ICML 2024 (arXiv:2311.03099).
    """
    return run_whole(_DARE_LINEAR, base, experts, p)


_BREADCRUMBS = gta_form(sparsify="outliers", consensus=False, normalize=False, rescale=False)


@register("breadcrumbs", blockwise=_BREADCRUMBS, expert_params=_GTA + ("gamma",), global_params=_COMMON)
def breadcrumbs(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Model Breadcrumbs: drop the largest ``gamma`` share (outliers) and the smallest entries of
    each task vector, keeping a ``density`` share; add the weighted results.

    ``m_i`` keeps the entries of ``|δ_i|`` ranked ``g+1 … g+⌊density·n⌋`` from the top, with
    ``g = min(⌊gamma·n⌋, n − ⌊density·n⌋)``; ``θ = θ_0 + λ Σ_i w_i m_i ⊙ δ_i``.
    Defaults: ``gamma`` 0.01, ``normalize`` false, ``rescale`` false.

    Paper: Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
    Sparse Masks", ECCV 2024 (arXiv:2312.06795).
    """
    return run_whole(_BREADCRUMBS, base, experts, p)


_BREADCRUMBS_TIES = gta_form(sparsify="outliers", consensus=True, normalize=False, rescale=False)


@register("breadcrumbs_ties", blockwise=_BREADCRUMBS_TIES, expert_params=_GTA + ("gamma",), global_params=_COMMON)
def breadcrumbs_ties(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Model Breadcrumbs masks followed by TIES sign election (sum of agreeing entries).

    ``m_i`` as in ``breadcrumbs``; ``d_i = w_i m_i ⊙ δ_i``;
    ``θ = θ_0 + λ Σ_i [sign d_i = sign Σ_j d_j] d_i``. Defaults: ``normalize`` false.

    Paper: Davari & Belilovsky, ECCV 2024 (arXiv:2312.06795), with the sign election of
    Yadav et al., NeurIPS 2023 (arXiv:2306.01708).
    """
    return run_whole(_BREADCRUMBS_TIES, base, experts, p)


_DELLA = gta_form(sparsify="della", consensus=True, normalize=True, rescale=True)


@register("della", blockwise=_DELLA, random=True, expert_params=_GTA + ("epsilon",), global_params=_COMMON)
def della(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """DELLA-Merging: magnitude-based random pruning (MagPrune), rescale, elect signs, average.

    In each row, an entry of rank ``r`` (0 = smallest ``|δ_i|``, of ``c`` columns) is kept with
    probability ``density − ε + 2ε · r/(c−1)``; kept entries are rescaled to the L1 norm, weighted,
    and combined as in TIES: ``θ = θ_0 + λ Σ_i a_i d_i / Σ_i a_i w_i``.
    Defaults: ``epsilon`` 0.15, ``normalize`` true, ``rescale`` true.

    Paper: Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024 (arXiv:2406.11617).
    """
    return run_whole(_DELLA, base, experts, p)


_DELLA_LINEAR = gta_form(sparsify="della", consensus=False, normalize=False, rescale=True)


@register("della_linear", blockwise=_DELLA_LINEAR, random=True, expert_params=_GTA + ("epsilon",), global_params=_COMMON)
def della_linear(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """DELLA's MagPrune masks and rescaling, then a weighted sum without sign election.

    ``θ = θ_0 + λ Σ_i w_i δ̃_i`` with ``δ̃_i`` as in ``della``. Defaults: ``normalize`` false,
    ``rescale`` true.

    Paper: Deep et al., 2024 (arXiv:2406.11617).
    """
    return run_whole(_DELLA_LINEAR, base, experts, p)
