"""A cheap fingerprint of a merged model: a fixed random projection of its task vector.

The task vector is ``merged − base`` over every tensor both hold with the same shape. Its
fingerprint is a count sketch of ``DIM`` numbers: element ``j`` of tensor ``n`` is added, with
sign ``s(n, j)``, to bucket ``h(n, j)``, where ``h`` and ``s`` are drawn from a generator seeded by
the tensor's name, so two submissions are projected the same way. The projection preserves inner
products in expectation, so the cosine of two fingerprints estimates the cosine of the two task
vectors. Tensors go through in blocks of ``BLOCK`` elements (bounded memory).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

DIM = 1024
BLOCK = 1 << 22


def _tensors(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                out[name] = f
    return out


def task_vector_sketch(merged: str | Path, base: str | Path, dim: int = DIM) -> list[float] | None:
    """The count sketch of ``merged − base`` (None when no tensor is shared)."""
    import torch  # heavy: loaded only when a fingerprint is made
    from safetensors import safe_open

    merged, base = Path(merged), Path(base)
    mt, bt = _tensors(merged), _tensors(base)
    y = torch.zeros(dim, dtype=torch.float64)
    shared = 0
    for name in sorted(mt):
        if name not in bt:
            continue
        with safe_open(str(mt[name]), framework="pt") as a, safe_open(str(bt[name]), framework="pt") as b:
            x, x0 = a.get_tensor(name), b.get_tensor(name)
        if x.shape != x0.shape or not x.is_floating_point():
            continue
        shared += 1
        delta = (x.float() - x0.float()).flatten()
        gen = torch.Generator().manual_seed(int(hashlib.sha256(name.encode()).hexdigest()[:15], 16))
        for start in range(0, delta.numel(), BLOCK):
            part = delta[start:start + BLOCK]
            idx = torch.randint(0, dim, (part.numel(),), generator=gen)
            sign = torch.randint(0, 2, (part.numel(),), generator=gen).to(torch.float64) * 2 - 1
            y.index_add_(0, idx, sign * part.to(torch.float64))
    return y.tolist() if shared else None


def cosine(a: list[float], b: list[float]) -> float | None:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return None
    return sum(x * y for x, y in zip(a, b)) / (na * nb)
