"""Exact k-th largest of float32 magnitudes (mergelab.methods.kth): which way of counting is fastest.

CPU seconds per element (``time.process_time``, best of ``--reps``; the cores are shared, and CPU
time is what another process' load disturbs least), torch single-threaded, for

* the histogram of pass 1 (high bits of the float32 patterns) on 16M-element blocks: numpy shift +
  ``torch.bincount`` (int32 keys), torch shift + ``torch.bincount``, ``np.bincount``,
  ``index_add_``, ``torch.histc`` of the keys as floats — and the split (high bits 12 … 18);
* pass 2 (the low bits inside the bucket): numpy compaction + ``np.bincount``, or torch
  ``clamp`` + ``bincount`` over all values;
* a bracketed pass (count above, keep the values inside) in numpy and in torch;
* :class:`KthLargest` end to end (no bracket: two passes; sample bracket: one), the old
  sample-and-``kthvalue`` selection of ``sparsify`` (copied here), and
  :class:`KthLargestRows` on TIES-shaped blocks (27 experts × 9 rows × 4096).

    PYTHONPATH=src python bench/kth_select.py [--reps 3]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from _measure import load_text

N = 1 << 24


def cpu_ns(fn, n: int, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best / n * 1e9


def chunked(x: torch.Tensor, sub: int, fn) -> None:
    for s in range(0, x.numel(), sub):
        fn(x[s:s + sub])


def old_kth_largest(x: torch.Tensor, k: int, sample: int = 1 << 16) -> tuple[float, int, int]:
    """The selection sparsify used before kth.py (sample bracket, collect, kthvalue), one block."""
    n = x.numel()
    g = torch.Generator().manual_seed(n)
    s = x[torch.randint(n, (sample,), generator=g)].sort(descending=True).values
    r = k * sample / n
    margin = 4.0 * math.sqrt(r * (1.0 - k / n)) + 16.0
    hi, lo = float(s[int(r - margin) - 1]), float(s[math.ceil(r + margin) - 1])
    above = 0
    parts = []
    for c in x.split(1 << 17):
        above += int((c > hi).sum())
        parts.append(c[(c >= lo) & (c <= hi)])
    band = torch.cat(parts)
    v = band.kthvalue(band.numel() - (k - above) + 1).values
    return float(v), above + int((band > v).sum()), int((band == v).sum())


def main() -> None:
    from mergelab.methods import kth

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    reps = args.reps
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, generator=g).abs_()
    xn = x.numpy()
    k = N // 5
    print(f"torch {torch.__version__}, numpy {np.__version__}, 1 thread, load {load_text()}; "
          "CPU ns per element, best of", reps)

    print("\npass 1, histogram of the high bits (16M-element block, in sub-blocks):")
    for high in (12, 14, 16, 18):
        low = 31 - high
        for sub in (1 << 16, 1 << 18, 1 << 20):
            keys = np.empty(sub, dtype=np.uint32)

            def np_torch(c, low=low, keys=keys, bins=(1 << high) + 1):
                kk = np.right_shift(c.numpy().view(np.uint32), low, out=keys[: c.numel()])
                torch.bincount(torch.from_numpy(kk.view(np.int32)), minlength=bins)

            def run(sub=sub, fn=np_torch):
                chunked(x, sub, fn)

            print(f"  high {high:2d} bits, sub-block 2^{sub.bit_length() - 1}: numpy shift + torch.bincount "
                  f"{cpu_ns(run, N, reps):.2f}", flush=True)
    sub = 1 << 18
    keys = np.empty(sub, dtype=np.uint32)
    acc = torch.zeros(1 << 17, dtype=torch.int64)
    ones = torch.ones(sub, dtype=torch.int64)
    variants = {
        "torch shift & mask + torch.bincount": lambda c: torch.bincount(
            (c.view(torch.int32) >> 15) & 0x1FFFF, minlength=65537),
        "numpy shift + np.bincount": lambda c: np.bincount(
            np.right_shift(c.numpy().view(np.uint32), 15, out=keys[: c.numel()]), minlength=65537),
        "torch shift + index_add_": lambda c: acc.index_add_(
            0, (c.view(torch.int32) >> 15) & 0x1FFFF, ones[: c.numel()]),
        "torch shift + histc of the keys as float": lambda c: torch.histc(
            ((c.view(torch.int32) >> 15) & 0x1FFFF).float(), bins=65537, min=0, max=65537),
    }
    for name, fn in variants.items():
        print(f"  high 16 bits, sub-block 2^18: {name} {cpu_ns(lambda fn=fn: chunked(x, sub, fn), N, reps):.2f}",
              flush=True)

    print("\npass 2, low bits inside the bucket of the k-th value (16M-element block):")
    b = int(np.float32(np.partition(xn, N - k)[N - k]).view(np.int32)) >> 15
    lo, hi = float(np.int32(b << 15).view(np.float32)), float(np.int32((b + 1) << 15).view(np.float32))

    def np_low(c):
        a = c.numpy()
        sel = a[(a >= lo) & (a < hi)].view(np.int32)
        np.bincount(np.bitwise_and(sel, 0x7FFF), minlength=1 << 15)

    def torch_clamp(c):
        kk = (c.view(torch.int32) - ((b << 15) - 1)).clamp_(0, (1 << 15) + 1)
        torch.bincount(kk, minlength=(1 << 15) + 2)

    for name, fn in (("numpy compaction + np.bincount", np_low), ("torch clamp + bincount", torch_clamp)):
        print(f"  sub-block 2^18: {name} {cpu_ns(lambda fn=fn: chunked(x, sub, fn), N, reps):.2f}", flush=True)

    print("\nbracketed pass (count above hi, keep [lo, hi]; sample bracket of 2^16):")
    idx = torch.randint(N, (1 << 16,), generator=g)
    br = kth.sample_bracket(x[idx], N, k)
    for use_np in (True, False):
        kth.USE_NUMPY = use_np

        def one_pass():
            sel = kth.KthLargest(N, [k], brackets=[br])
            sel.observe(x)
            assert not sel.next_pass()

        print(f"  KthLargest, one pass, {'numpy' if use_np else 'torch'} kernels: "
              f"{cpu_ns(one_pass, N, reps):.2f}", flush=True)
    kth.USE_NUMPY = True

    print("\nend to end, k = n/5 of 16M values:")
    want = old_kth_largest(x, k)

    def two_pass():
        sel = kth.KthLargest(N, [k])
        passes = 1
        while True:
            sel.observe(x)
            if not sel.next_pass():
                break
            passes += 1
        assert passes == 2 and sel.result() == want

    print(f"  KthLargest, no bracket (two passes): {cpu_ns(two_pass, N, reps):.2f}")

    def bracketed():
        sel = kth.KthLargest(N, [k], brackets=[kth.sample_bracket(x[torch.randint(N, (1 << 16,))], N, k)])
        sel.observe(x)
        assert not sel.next_pass() and sel.result() == want

    print(f"  KthLargest, sample bracket (one pass, sample included): {cpu_ns(bracketed, N, reps):.2f}")
    print(f"  old sparsify selection (sample, collect, kthvalue): {cpu_ns(lambda: old_kth_largest(x, k), N, reps):.2f}")

    print("\nKthLargestRows on TIES blocks (27 rows × 36 864, sample brackets), per element of a block:")
    rows, width, blocks = 27, 9 * 4096, 64
    xb = torch.randn(rows, width, generator=g).abs_()
    brs = [kth.sample_bracket(xb[i, torch.randint(width, (1 << 15,), generator=g)], width, width // 5)
           for i in range(rows)]
    for use_np in (True, False):
        kth.USE_NUMPY = use_np

        def rows_pass():
            sel = kth.KthLargestRows(width * blocks, [width * blocks // 5] * rows, brackets=brs)
            for _ in range(blocks):
                sel.observe(xb)
            assert not sel.next_pass()

        print(f"  {'numpy' if use_np else 'torch'} kernels: {cpu_ns(rows_pass, rows * width * blocks, reps):.2f}",
              flush=True)
    kth.USE_NUMPY = True
    print(f"\nload after {load_text()}")


if __name__ == "__main__":
    main()
