"""Placeholder (replaced by the kth branch): exact k-th largest by two histogram passes."""
from __future__ import annotations

from typing import Sequence

import torch


class KthLargest:
    def __init__(self, n, ks: Sequence[int], device="cpu"):
        self.n, self.ks = n, list(ks)
        self._pass = 0
        self._hi = torch.zeros(1 << 15, dtype=torch.int64)
        self._lo = [torch.zeros(1 << 16, dtype=torch.int64) for _ in self.ks]
        self._bins: list[int] = []
        self._above: list[int] = []
        self._res: list = []

    def observe(self, values):
        bits = values.reshape(-1).contiguous().view(torch.int32).cpu()
        if self._pass == 0:
            self._hi += torch.bincount((bits >> 16).long(), minlength=1 << 15)
        else:
            hi = bits >> 16
            for j, b in enumerate(self._bins):
                sel = bits[hi == b]
                self._lo[j] += torch.bincount((sel & 0xFFFF).long(), minlength=1 << 16)

    def next_pass(self):
        if self._pass == 0:
            csum = self._hi.flip(0).cumsum(0)  # csum[i] = count with hi >= (32767 - i)
            for k in self.ks:
                i = int(torch.searchsorted(csum, torch.tensor(k)))
                b = (1 << 15) - 1 - i
                self._bins.append(b)
                self._above.append(int(csum[i - 1]) if i > 0 else 0)
            self._pass = 1
            return True
        for j, k in enumerate(self.ks):
            lo = self._lo[j]
            csum = lo.flip(0).cumsum(0)
            need = k - self._above[j]
            i = int(torch.searchsorted(csum, torch.tensor(need)))
            low = (1 << 16) - 1 - i
            n_gt = self._above[j] + (int(csum[i - 1]) if i > 0 else 0)
            n_eq = int(lo[low])
            v = torch.tensor([(self._bins[j] << 16) | low], dtype=torch.int32).view(torch.float32).item()
            self._res.append((v, n_gt, n_eq))
        self._pass = 2
        return False

    def result(self, j=0):
        return self._res[j]
