"""Compiled CPU loops: the trim-and-reduce of exact TIES over row blocks of task vectors.

It is one sweep over a block that torch does in about ten (a shrink per expert, clamps and four
reductions over the experts), each reading the whole block again. It is compiled with numba (``nogil``: the engine's worker threads run it at once; no
``fastmath``: every float operation is the IEEE one, in the order written, so the result does not
depend on the machine's vector width). The first call compiles it (about two seconds); numba
caches the machine code on disk for the next process.

The loop is the product's own, not a numerical library: the maths is stated where it is used
(:func:`mergelab.methods.ties_factors.ties_from_factors`).
"""
from __future__ import annotations

import threading

import numpy as np

_F0, _F1, _FM1 = np.float32(0.0), np.float32(1.0), np.float32(-1.0)

#: columns reduced at once by :func:`trim_reduce` (its four accumulators stay in the L1 cache)
REDUCE_COLUMNS = 2048


_compiled: dict = {}
_lock = threading.Lock()


def _jit(fn):
    """``fn`` compiled by numba on first use (numba is imported only by a process that needs it)."""
    with _lock:
        if fn.__name__ not in _compiled:
            from numba import njit

            try:
                _compiled[fn.__name__] = njit(nogil=True, cache=True)(fn)
            except RuntimeError:   # no writable cache folder (numba says "no locator"): compile each time
                _compiled[fn.__name__] = njit(nogil=True)(fn)
        return _compiled[fn.__name__]


def trim_reduce(x, below, coef, wsgn, tie_v, tie_keep, tie_find, normalize, out) -> None:
    """See :func:`_trim_reduce`: its compiled form on numpy arrays."""
    _jit(_trim_reduce)(x, below, coef, wsgn, tie_v, tie_keep, tie_find, normalize, out)


def _trim_reduce(x, below, coef, wsgn, tie_v, tie_keep, tie_find, normalize, out):
    """TIES on a block of scaled task vectors ``x`` (experts × entries), into ``out`` (entries).

    Expert ``i`` keeps ``|x| > below[i]``; while ``tie_find[i] > 0`` entries with ``|x| = tie_v[i]``
    remain to be seen: such an entry is kept while ``tie_keep[i] > 0`` and zeroed after, in flat
    order (both counts go down as they are met, so a block sequence carries them along).
    With kept entries scaled so that ``|x| ≥ 1``, ``clamp(x, −1, 1)`` is the sign: per entry,
    ``mixed = Σ coef·x``, ``pos = Σ coef·max(x, 0)``, ``diff = Σ wsgn·sign(x)``, ``cp = Σ wsgn·[x > 0]``
    over kept entries, experts added in order, and ``out = pos / cp`` where ``mixed ≥ 0``,
    ``(mixed − pos) / (cp − diff)`` elsewhere (no division without ``normalize``; a zero divisor
    reads 1).
    """
    count, width = x.shape
    acc = np.empty((4, REDUCE_COLUMNS), np.float32)
    mixed, pos, diff, cp = acc[0], acc[1], acc[2], acc[3]
    for c0 in range(0, width, REDUCE_COLUMNS):
        w = min(width, c0 + REDUCE_COLUMNS) - c0
        acc[:, :w] = _F0
        for i in range(count):
            b, cf, ws = below[i], coef[i], wsgn[i]
            xi = x[i, c0:c0 + w]
            if tie_find[i] > 0:
                tv = tie_v[i]
                for c in range(w):          # flat order: equal values past the quota are dropped
                    if abs(xi[c]) == tv:
                        tie_find[i] -= 1
                        if tie_keep[i] > 0:
                            tie_keep[i] -= 1
                        else:
                            xi[c] = _F0
            for c in range(w):
                v = xi[c]
                y = v if abs(v) > b else _F0
                yp = y if y > _F0 else _F0
                s = _F1 if y > _F0 else (_FM1 if y < _F0 else _F0)
                mixed[c] += cf * y
                pos[c] += cf * yp
                diff[c] += ws * s
                cp[c] += ws * (_F1 if y > _F0 else _F0)
        for c in range(w):
            m, p = mixed[c], pos[c]
            n = m - p
            if normalize:
                q = cp[c]
                r = q - diff[c]
                p = p / (q if q != _F0 else _F1)
                n = n / (r if r != _F0 else _F1)
            out[c0 + c] = p if m >= _F0 else n
