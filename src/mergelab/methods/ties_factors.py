"""TIES on LoRA experts, computed from their factors ``ΔWᵢ = Bᵢ Aᵢ`` in row blocks, never holding
the experts' dense ΔWᵢ: the factor form of :func:`mergelab.methods.sparsify.ties`.

Exact magnitude cuts (:func:`magnitude_cuts`) bracket each expert's k-th largest ``|ΔWᵢ|`` from a
sample and select it exactly in one pass over the blocks (:mod:`mergelab.methods.kth`), so the
result equals the dense method up to the order of float additions.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from mergelab.methods import MethodParams
from mergelab.methods.cpu_kernels import trim_reduce
from mergelab.methods.kth import KthLargestRows, sample_bracket
from mergelab.methods.lowrank import LowRank


BLOCK_ELEMS = 1 << 21   # elements of all experts' rows in flight per block on the CPU (4 MB)


BLOCK_ELEMS_GPU = 1 << 27  # ... and on a GPU (512 MB)


#: the compiled trim-and-reduce on the CPU (tests switch it off to compare with the torch form,
#: which other devices run)
USE_KERNELS = True


SAMPLE = 1 << 15        # sampled entries that bracket (or estimate) a magnitude cut


def rows_per_block(n_experts: int, cols: int, device: torch.device) -> int:
    budget = BLOCK_ELEMS if device.type == "cpu" else BLOCK_ELEMS_GPU
    return max(1, budget // max(1, n_experts * cols))


class FactorStack:
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
class MagnitudeCut:
    """Where TIES trims one expert: keep ``|x| > v``, and of the ``n_eq`` entries with ``|x| = v``
    the first ``keep_eq`` in flat order, as the dense ``topk_mask`` does (``n_eq`` 0: not
    counted, keep them all)."""

    v: float
    n_eq: int = 0
    keep_eq: int = 0

    @property
    def dropped(self) -> int:
        """Entries equal to ``v`` left out (the last ones in flat order)."""
        return max(0, self.n_eq - self.keep_eq)


def magnitude_cuts(stack: FactorStack, ks: Sequence[int], rows: int, exact: bool = True) -> list[MagnitudeCut]:
    """The top-``kᵢ`` cut of ``|ΔWᵢ|`` of every expert.

    ``exact``: a seeded sample of entries brackets each k-th value
    (:func:`~mergelab.methods.kth.sample_bracket`); one pass over the row blocks counts the
    entries above each bracket and keeps the few inside it, and the exact k-th value is selected
    among them (:class:`~mergelab.methods.kth.KthLargestRows`; a bracket that misses costs two
    histogram passes more, so the sample decides the speed, never the answer). Equal values at the
    cut are kept in flat order, as ``topk_mask`` (the trimming pass finds them).

    Otherwise the cut is the same order statistic of that sample, scaled to the matrix: no pass
    over the matrix, and each kept share within about ±1.5 % (relative, one standard deviation,
    at density 0.2) of the density — which is a different TIES result, not an approximation of
    the exact one to rounding: on 27 random rank-8 adapters of a 4096² matrix it changed 4 % of
    the entries of the merged ΔW and its norm-wise value by 15 %. Matrices of at most four
    samples' entries always get the exact cut (kept whole: one pass).
    """
    m, n, count = stack.m, stack.n, stack.count
    total = m * n
    device = stack.B.device
    brackets = None
    if total > 4 * SAMPLE:
        sample = stack.sample(SAMPLE)
        if not exact:
            def kth(i: int, j: int) -> float:  # the j-th largest sampled value of expert i
                return float(sample[i].kthvalue(SAMPLE - min(SAMPLE, max(1, j)) + 1).values)

            return [MagnitudeCut(kth(i, round(k * SAMPLE / total))) for i, k in enumerate(ks)]
        brackets = [sample_bracket(sample[i], total, k) for i, k in enumerate(ks)]
    sel = KthLargestRows(total, ks, device, brackets=brackets)
    buf = torch.empty(count, min(rows, m), n, device=device)
    while True:
        for r0 in range(0, m, rows):
            sel.observe(stack.block(r0, min(m, r0 + rows), buf).abs_().view(count, -1))
        if not sel.next_pass():
            break
    cuts = []
    for i, k in enumerate(ks):
        v, n_gt, n_eq = sel.result(i)
        cuts.append(MagnitudeCut(v, n_eq, k - n_gt))
    return cuts


def _equal_positions(x: torch.Tensor, v: float) -> torch.Tensor:
    """Flat positions of ``|x| = v`` in the 1-D ``x``, increasing (numpy on the CPU: its boolean
    masks are several times faster there)."""
    if x.device.type == "cpu":
        a = x.numpy()
        return torch.from_numpy(np.flatnonzero(np.abs(a) == np.float32(v)))
    return (x.abs() == v).nonzero().view(-1)


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
    rows = rows_per_block(count, n, device)
    # sign(wᵢ) folded into Bᵢ (exact), so that dᵢ > 0 ⟺ xᵢ > 0 and dᵢ = |wᵢ| xᵢ
    stack = FactorStack([q for q, _, _ in used], [1.0 if w > 0 else -1.0 for _, w, _ in used])
    cuts = magnitude_cuts(stack, [max(1, int(d * m * n)) for _, _, d in used], rows, exact=exact_cut)
    if any(c.v <= 0 for c in cuts):
        return None  # most entries are exactly 0: the cut keeps every non-zero, leave it to the dense form
    # rescale expert i by 2^eᵢ with 2^eᵢ · vᵢ ∈ [1, 2): exact, so the cut stays where it was
    exps = [(-math.frexp(c.v)[1] + 1) if c.v > 0 else 0 for c in cuts]
    stack = FactorStack([q for q, _, _ in used], [math.ldexp(1.0 if w > 0 else -1.0, e)
                                            for (_, w, _), e in zip(used, exps)])
    below = [float(torch.nextafter(torch.tensor(math.ldexp(c.v, e)), torch.tensor(0.0)))
             for c, e in zip(cuts, exps)]                        # |x'| > below ⟺ |x| ≥ vᵢ
    coef = torch.tensor([[abs(w) * math.ldexp(1.0, -e) for (_, w, _), e in zip(used, exps)]], device=device)
    w_sgn = torch.tensor([[w for _, w, _ in used]], device=device)
    # experts with more entries equal to their cut than the quota: [scaled v, kept left, still to find]
    tied = {i: [math.ldexp(c.v, e), c.keep_eq, c.n_eq] for i, (c, e) in enumerate(zip(cuts, exps)) if c.dropped}
    buf = torch.empty(count, min(rows, m), n, device=device)
    if device.type == "cpu" and USE_KERNELS:  # one compiled sweep per block
        f32 = np.float32
        args = (np.array(below, f32), coef.view(-1).numpy(), w_sgn.view(-1).numpy(),
                np.array([t[0] for t in (tied.get(i, (-1.0,)) for i in range(count))], f32),
                np.array([tied[i][1] if i in tied else 0 for i in range(count)], np.int64),
                np.array([tied[i][2] if i in tied else 0 for i in range(count)], np.int64), normalize)
        flat = out.view(-1).numpy()
        for r0 in range(0, m, rows):
            r1 = min(m, r0 + rows)
            trim_reduce(stack.block(r0, r1, buf).view(count, -1).numpy(), *args, flat[r0 * n:r1 * n])
        return out.mul_(lam) if lam != 1.0 else out
    kept = torch.empty_like(buf)
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        x = stack.block(r0, r1, buf).view(count, -1)
        y = kept.view(count, -1)[:, : x.shape[1]]
        for i in range(count):
            torch.ops.aten.hardshrink.out(x[i], below[i], out=y[i])       # trim
        for i, t in list(tied.items()):  # equal values beyond the quota, in flat order
            pos = _equal_positions(x[i], t[0])
            if pos.numel() > t[1]:
                y[i, pos[t[1]:].to(device)] = 0.0
            t[1] = max(0, t[1] - pos.numel())
            t[2] -= pos.numel()
            if t[2] <= 0:
                del tied[i]
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
