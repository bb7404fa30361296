"""Exact k-th largest of a stream of non-negative float32 values, in passes over the stream.

Read as integers, the bit patterns of non-negative float32 values are in the same order as the
values. :class:`KthLargest` counts them in two histograms: pass 1 counts the 16 high bits
(65 536 buckets), which names the bucket holding the k-th largest value and how many values lie
above it; pass 2 counts the 15 low bits of the values inside that bucket (32 768 bins), which
gives the value itself, how many values are larger and how many are equal. Memory is two
histograms per k whatever the length of the stream; blocks may come in any order and any size,
as long as every pass sees the same values.

A guess of where the k-th value lies (``brackets``: ``lo ≤ v ≤ hi``, e.g. order statistics of a
sample with a margin, :func:`sample_bracket`) takes the place of pass 1: one pass counts the
values above ``hi`` and keeps the (few) values in ``[lo, hi]``, and the k-th is selected among
them. A guess that misses — or that holds more than :data:`STORE_LIMIT` values — costs the two
histogram passes after it, never a wrong answer. A one-value bracket (``lo = hi``, as the sample
of an all-zero task vector gives) only counts. Streams of at most :data:`STORE_ALL` values are
kept whole: one pass.

The comparisons, compactions and counts run in numpy on CPU tensors (views of the same memory:
its boolean masks and compactions are several times faster than torch's there, see
``bench/kth_select.py``) and in torch on other devices. ``-0.0`` counts as ``0.0``; ``+inf`` is
larger than every finite value; NaN is not allowed.

:class:`KthLargestRows` is the same selection for a batch of streams of equal length, one k each,
seen as the rows of each block (the experts of a merge).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

HIGH = 16               #: high bits counted in pass 1 (sign bit excluded): 65 536 buckets
LOW = 31 - HIGH         #: low bits counted in pass 2, inside one bucket: 32 768 bins
STORE_ALL = 1 << 17     #: streams at most this long are kept whole (one pass, no histograms)
STORE_LIMIT = 1 << 23   #: a bracket that holds more values than this is given up for histograms
SUB = 1 << 20           #: elements compared at once (the temporaries stay in cache)
_FLUSH = 1 << 16        #: low-bit keys gathered before they are counted

_WINDOW, _HIGH, _BUCKET, _DONE = "window", "high", "bucket", "done"
_INF_BITS = 0x7F800000  # +inf; the bit patterns above it are NaNs


def _f32(bits: int) -> float:
    """The float32 value of a non-negative bit pattern below the NaN range."""
    if bits >= _INF_BITS:
        return math.inf
    return float(np.array(bits, dtype=np.int32).view(np.float32))


def _f32s(values: Sequence[float]) -> np.ndarray:
    """Bracket ends as float32 (beyond its range: ±inf). Rounding a guess is harmless: all that
    matters is that every value is either above ``hi``, inside ``[lo, hi]`` or below ``lo``."""
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.float32)


def _bucket_bounds(b: int) -> tuple[float, float | None]:
    """Values of bucket ``b`` are in ``[lo, hi)``; hi None: no bound (the bucket of +inf)."""
    top = (b + 1) << LOW
    return _f32(b << LOW), (_f32(top) if top <= _INF_BITS else None)


def sample_bracket(sample: torch.Tensor, n: int, k: int) -> tuple[float, float]:
    """A guess ``(lo, hi)`` of the k-th largest of ``n`` values from a uniform random sample of
    them: the sample's order statistics at rank ``k·s/n`` ± (4 binomial standard deviations + 16),
    ``-inf`` / ``+inf`` where that runs off the sample. It decides how fast the exact answer is
    found, never the answer."""
    s = sample.numel()
    if s == 0:
        return -math.inf, math.inf
    r = k * s / n
    margin = 4.0 * math.sqrt(r * max(0.0, 1.0 - k / n)) + 16.0
    j_hi, j_lo = int(r - margin), math.ceil(r + margin)  # ranks from the top, 1-based
    flat = sample.reshape(-1).float()
    hi = float(flat.kthvalue(s - j_hi + 1).values) if j_hi >= 1 else math.inf
    lo = float(flat.kthvalue(s - j_lo + 1).values) if j_lo <= s else -math.inf
    return lo, hi


class _Query:
    """One k-th largest of one stream (row) and where its search stands."""

    __slots__ = ("above", "bucket", "hi", "k", "kept", "kept_n", "lo", "mode", "result", "row")

    def __init__(self, row: int, k: int):
        self.row, self.k = row, k
        self.mode = _HIGH
        self.lo = self.hi = 0.0
        self.above = 0          # values above the window (_WINDOW) or above the bucket (_BUCKET)
        self.kept: list = []    # _WINDOW: the values inside it, block by block
        self.kept_n = 0
        self.bucket = 0
        self.result: tuple[float, int, int] | None = None


# ----------------------------------------------------------------------------- counting kernels
# Each takes the block as a 2-D array (rows × columns) of the backend (numpy or torch) and adds
# what it finds to accumulators of the same backend.


class _NumpyOps:
    """Kernels on numpy views of CPU tensors."""

    def __init__(self):
        self._b1 = self._b2 = np.empty(0, dtype=bool)
        self._keys = np.empty(0, dtype=np.uint32)

    @staticmethod
    def wrap(values: torch.Tensor):
        return values.detach().numpy()

    def _bools(self, shape):
        size = shape[0] * shape[1]
        if self._b1.size < size:
            self._b1, self._b2 = np.empty(size, dtype=bool), np.empty(size, dtype=bool)
        return self._b1[:size].reshape(shape), self._b2[:size].reshape(shape)

    def window(self, x, lo: np.ndarray, hi: np.ndarray, collect: bool = True):
        """Per row i: the count of ``x > hi[i]``, and the values in ``[lo[i], hi[i]]`` (one array
        per row; with ``collect`` False only their counts)."""
        rows, width = x.shape
        above, inside = self._bools(x.shape)
        np.greater(x, hi[:, None], out=above)
        np.greater_equal(x, lo[:, None], out=inside)
        np.logical_xor(inside, above, out=inside)          # lo ≤ x ≤ hi (lo ≤ hi)
        counts = [np.count_nonzero(above[i]) for i in range(rows)]
        if not collect:
            return counts, [int(np.count_nonzero(inside[i])) for i in range(rows)]
        f = np.flatnonzero(inside)                          # flat positions, row by row
        if x.flags.c_contiguous:
            vals = np.take(x.reshape(-1), f)
        else:
            r = f // width
            vals = x[r, f - r * width]
        cut = np.searchsorted(f, np.arange(rows + 1) * width).tolist()
        return counts, [vals[cut[i]:cut[i + 1]] for i in range(rows)]

    def high(self, row, acc: np.ndarray) -> None:
        """Add the histogram of the high bits of ``row`` to ``acc`` (65 537 bins: -0.0 in the last)."""
        if self._keys.size < row.size:
            self._keys = np.empty(row.size, dtype=np.uint32)
        keys = np.right_shift(row.view(np.uint32), LOW, out=self._keys[: row.size])
        h = torch.bincount(torch.from_numpy(keys.view(np.int32)), minlength=acc.size).numpy()
        if h.size > acc.size:
            raise ValueError("KthLargest: a value below zero (or NaN) was seen")
        acc += h

    @staticmethod
    def low_keys(row, lo: float, hi: float | None):
        """The low bits of the values of ``row`` in ``[lo, hi)`` (hi None: no upper bound)."""
        sel = row[(row >= lo) & (row < hi)] if hi is not None else row[row >= lo]
        return np.bitwise_and(sel.view(np.int32), (1 << LOW) - 1)

    @staticmethod
    def count_low(keys: list, acc: np.ndarray) -> None:
        if keys:
            acc += np.bincount(np.concatenate(keys), minlength=acc.size)

    @staticmethod
    def zeros(size: int) -> np.ndarray:
        return np.zeros(size, dtype=np.int64)

    @staticmethod
    def to_numpy(a) -> np.ndarray:
        return np.asarray(a)

    @staticmethod
    def concat(parts: list):
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


class _TorchOps:
    """The same kernels in torch (GPU tensors; CPU in tests)."""

    def __init__(self, device: torch.device):
        self.device = device

    @staticmethod
    def wrap(values: torch.Tensor):
        return values.detach()

    def window(self, x, lo: np.ndarray, hi: np.ndarray, collect: bool = True):
        lo_t = torch.from_numpy(lo).to(x.device).view(-1, 1)
        hi_t = torch.from_numpy(hi).to(x.device).view(-1, 1)
        above = x > hi_t
        inside = (x >= lo_t) ^ above
        counts = above.sum(1).tolist()
        if not collect:
            return counts, inside.sum(1).tolist()
        r, c = inside.nonzero(as_tuple=True)
        vals = x[r, c]
        cut = torch.searchsorted(r, torch.arange(x.shape[0] + 1, device=x.device)).tolist()
        return counts, [vals[cut[i]:cut[i + 1]] for i in range(x.shape[0])]

    @staticmethod
    def high(row, acc: torch.Tensor) -> None:
        keys = (row.view(torch.int32) >> LOW) & ((1 << (HIGH + 1)) - 1)   # -0.0 → 65 536
        h = torch.bincount(keys, minlength=acc.numel())
        if h.numel() > acc.numel():
            raise ValueError("KthLargest: a value below zero (or NaN) was seen")
        acc += h

    @staticmethod
    def low_keys(row, lo: float, hi: float | None):
        sel = row[(row >= lo) & (row < hi)] if hi is not None else row[row >= lo]
        return sel.view(torch.int32) & ((1 << LOW) - 1)

    @staticmethod
    def count_low(keys: list, acc: torch.Tensor) -> None:
        if keys:
            acc += torch.bincount(torch.cat(keys), minlength=acc.numel())

    def zeros(self, size: int) -> torch.Tensor:
        return torch.zeros(size, dtype=torch.int64, device=self.device)

    @staticmethod
    def to_numpy(a: torch.Tensor) -> np.ndarray:
        return a.cpu().numpy()

    def concat(self, parts: list):
        return torch.cat(parts) if parts else torch.empty(0, device=self.device)


#: numpy kernels for CPU tensors (tests switch this off to run the torch kernels on the CPU)
USE_NUMPY = True


class _Selection:
    """Exact k-th largest values of ``rows`` streams of ``n`` values each; one or more queries
    ``(row, k)``; passes until every query is answered."""

    def __init__(self, n: int, rows: int, queries: Sequence[tuple[int, int]], device,
                 brackets: Sequence[tuple[float, float] | None] | None):
        if n < 1:
            raise ValueError(f"KthLargest needs at least one value, got n={n}")
        self.n, self.rows = int(n), int(rows)
        self.device = torch.device(device)
        self.ops = _NumpyOps() if (self.device.type == "cpu" and USE_NUMPY) else _TorchOps(self.device)
        self.queries = [_Query(r, int(k)) for r, k in queries]
        if brackets is not None and len(brackets) != len(self.queries):
            raise ValueError(f"{len(brackets)} brackets for {len(self.queries)} k")
        for j, q in enumerate(self.queries):
            if not 1 <= q.k <= self.n:
                raise ValueError(f"k must be in [1, n={self.n}], got {q.k}")
            b = brackets[j] if brackets is not None else None
            if b is None and self.n <= STORE_ALL:
                b = (-math.inf, math.inf)        # short stream: keep it whole
            if b is not None:
                lo, hi = float(b[0]), float(b[1])
                if not lo <= hi:            # NaN or crossed: no guess
                    lo, hi = (-math.inf, math.inf) if self.n <= STORE_ALL else (math.nan, math.nan)
                if lo <= hi:
                    q.mode, q.lo, q.hi = _WINDOW, lo, hi
        self._start_pass()

    # -- one pass

    def _start_pass(self) -> None:
        ops = self.ops
        self.seen = 0
        self.high_acc = {q.row: ops.zeros((1 << HIGH) + 1) for q in self.queries if q.mode == _HIGH}
        self.low_acc = {(q.row, q.bucket): ops.zeros(1 << LOW) for q in self.queries if q.mode == _BUCKET}
        self.low_keys: dict = {key: [] for key in self.low_acc}
        self.low_pending = 0
        for q in self.queries:
            q.kept, q.kept_n = [], 0
            if q.mode == _WINDOW:
                q.above = 0
        win = [q for q in self.queries if q.mode == _WINDOW]
        # one window per row, every row: the block is handled in one batch
        self.batched = len(win) == self.rows and sorted(q.row for q in win) == list(range(self.rows))
        if self.batched:
            win.sort(key=lambda q: q.row)
            self.win = win
            self.win_lo, self.win_hi = _f32s([q.lo for q in win]), _f32s([q.hi for q in win])
            self.win_collect = any(q.lo != q.hi for q in win)

    def observe(self, values: torch.Tensor) -> None:
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()                 # exact: the same order and ties
        elif values.dtype != torch.float32:
            raise TypeError(f"KthLargest takes float32 values, got {values.dtype}")
        if values.numel() % self.rows:
            raise ValueError(f"a block of {values.numel()} values is not {self.rows} rows")
        width = values.numel() // self.rows
        x = self.ops.wrap(values.reshape(self.rows, width))
        step = max(1, SUB // self.rows)
        for c0 in range(0, width, step):
            self._observe(x[:, c0:c0 + step])
        self.seen += width

    def _observe(self, x) -> None:
        ops = self.ops
        if self.batched:
            counts, inside = ops.window(x, self.win_lo, self.win_hi, self.win_collect)
            for q, c, v in zip(self.win, counts, inside):
                self._keep(q, c, v)
        else:
            for q in self.queries:
                if q.mode == _WINDOW:
                    r = q.row
                    counts, inside = ops.window(x[r:r + 1], _f32s([q.lo]), _f32s([q.hi]), q.lo != q.hi)
                    self._keep(q, counts[0], inside[0])
        for r, acc in self.high_acc.items():
            ops.high(x[r], acc)
        for (r, b), keys in self.low_keys.items():
            got = ops.low_keys(x[r], *_bucket_bounds(b))
            keys.append(got)
            self.low_pending += int(got.shape[0])
        if self.low_pending > _FLUSH:
            self._flush_low()

    def _keep(self, q: _Query, above: int, inside) -> None:
        """Add a block's count above q's window and the values inside it (or their count)."""
        q.above += int(above)
        if q.lo == q.hi:             # a one-value window: counting is enough
            q.kept_n += inside if isinstance(inside, int) else int(inside.shape[0])
            return
        if q.kept is None:
            return
        size = int(inside.shape[0])
        if size:
            q.kept_n += size
            if q.kept_n > STORE_LIMIT:
                q.kept = None        # too many to keep: this pass only counts, histograms follow
            else:
                q.kept.append(inside)   # a fresh array (or a slice of one) from the kernel

    def _flush_low(self) -> None:
        for key, keys in self.low_keys.items():
            self.ops.count_low(keys, self.low_acc[key])
            keys.clear()
        self.low_pending = 0

    def next_pass(self) -> bool:
        if self.seen != self.n:
            raise ValueError(f"a pass saw {self.seen} values per stream, expected n={self.n}")
        self._flush_low()
        high = {r: self.ops.to_numpy(a) for r, a in self.high_acc.items()}
        low = {key: self.ops.to_numpy(a) for key, a in self.low_acc.items()}
        for q in self.queries:
            if q.mode == _WINDOW:
                self._end_window(q)
            elif q.mode == _HIGH:
                h = high[q.row].copy()
                h[0] += h[1 << HIGH]                  # -0.0 counts as 0.0
                b, above = _locate(h[: 1 << HIGH], q.k)
                q.mode, q.bucket, q.above = _BUCKET, b, above
            elif q.mode == _BUCKET:
                j, above = _locate(low[(q.row, q.bucket)], q.k - q.above)
                v = _f32((q.bucket << LOW) | j)
                q.result = (v, q.above + above, int(low[(q.row, q.bucket)][j]))
                q.mode = _DONE
        more = any(q.mode != _DONE for q in self.queries)
        if more:
            self._start_pass()
        return more

    def _end_window(self, q: _Query) -> None:
        need = q.k - q.above
        if q.lo == q.hi and 1 <= need <= q.kept_n:
            q.result = (float(_f32s([q.lo])[0]) + 0.0, q.above, q.kept_n)
            q.mode = _DONE
            return
        if q.kept is None or not 1 <= need <= q.kept_n:
            q.mode = _HIGH           # the guess missed (or held too much): histograms from here
            q.kept = []
            return
        vals = self.ops.concat(q.kept)
        q.kept = []
        if isinstance(vals, np.ndarray):
            v = np.partition(vals, vals.size - need)[vals.size - need]
            n_gt, n_eq = int(np.count_nonzero(vals > v)), int(np.count_nonzero(vals == v))
        else:
            v = vals.kthvalue(vals.numel() - need + 1).values
            n_gt, n_eq = int((vals > v).sum()), int((vals == v).sum())
        q.result = (float(v) + 0.0, q.above + n_gt, n_eq)   # + 0.0: -0.0 reads 0.0
        q.mode = _DONE

    def result(self, j: int) -> tuple[float, int, int]:
        res = self.queries[j].result
        if res is None:
            raise RuntimeError("KthLargest: the passes are not finished (next_pass() returned True)")
        return res


def _locate(hist: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest of the counted values and the count above that bin."""
    from_top = np.cumsum(hist[::-1])
    i = int(np.searchsorted(from_top, k))          # first i with from_top[i] ≥ k
    if i >= hist.size:
        raise ValueError("KthLargest: the passes did not see the same values")
    b = hist.size - 1 - i
    return b, int(from_top[i] - hist[b])


class KthLargest:
    """Exact k-th largest of n non-negative float32 values seen in blocks, in two passes.

    ``ks``: several k at once (1 ≤ k ≤ n). Call :meth:`observe` for every block of a pass (any
    shape, any order, every pass the same values), then :meth:`next_pass`: True when another
    pass over the same values is needed. :meth:`result` then gives, for ``ks[j]``,
    ``(v, #(values > v), #(values == v))``. ``brackets`` (optional, one ``(lo, hi)`` or None per
    k): a guess of where each k-th value lies, which makes one pass enough when it holds.
    """

    def __init__(self, n: int, ks: Sequence[int], device: torch.device | str = "cpu", *,
                 brackets: Sequence[tuple[float, float] | None] | None = None):
        self._sel = _Selection(n, 1, [(0, k) for k in ks], device, brackets)

    def observe(self, values: torch.Tensor) -> None:
        """One block (any shape; float32, ≥ 0)."""
        self._sel.observe(values.reshape(1, -1))

    def next_pass(self) -> bool:
        """Close a pass: True when another pass over the same values is needed."""
        return self._sel.next_pass()

    def result(self, j: int = 0) -> tuple[float, int, int]:
        """For ``ks[j]``: ``(v, #(values > v), #(values == v))``."""
        return self._sel.result(j)


class KthLargestRows:
    """:class:`KthLargest` for ``len(ks)`` streams of ``n`` values each, the k-th largest of
    stream i being ``ks[i]``: every block is ``(len(ks), w)`` (or any shape with that many rows
    first), row i holding w values of stream i; the rows are handled in one batch."""

    def __init__(self, n: int, ks: Sequence[int], device: torch.device | str = "cpu", *,
                 brackets: Sequence[tuple[float, float] | None] | None = None):
        self._sel = _Selection(n, len(ks), list(enumerate(ks)), device, brackets)

    def observe(self, values: torch.Tensor) -> None:
        self._sel.observe(values)

    def next_pass(self) -> bool:
        return self._sel.next_pass()

    def result(self, i: int) -> tuple[float, int, int]:
        """For stream i: ``(v, #(values > v), #(values == v))``."""
        return self._sel.result(i)
