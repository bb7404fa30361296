"""Per-tensor parameter resolution: a recipe parameter (scalar, per-layer list, or filtered list)
evaluated for one tensor's layer and module, and the tensor's own random seed."""
from __future__ import annotations

import hashlib
from typing import Any, Mapping

from mergelab.io.layers import layer_of
from mergelab.methods import MethodParams
from mergelab.recipe.schema import Recipe, as_number


def evaluate_param(value: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter for one tensor at layer position ``t`` ∈ [0, 1] (None: no filter matched).

    A list of numbers is interpolated linearly at ``t``; a list of other scalars picks
    ``value[int(t·(n−1))]``; a list of ``{filter, value}`` takes the first entry whose filter is
    absent, ``"*"``, or a substring of ``tensor_name``.
    """
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate_param(entry["value"], tensor_name, t)
        return None
    if isinstance(value, list):
        nums = [as_number(v) for v in value]
        if any(n is None for n in nums):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(nums) - 1)
        i0 = int(scaled)
        i1 = min(len(nums) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * nums[i0] + frac * nums[i1]
    if isinstance(value, str) and as_number(value) is not None:
        return as_number(value)
    return value


def layer_position(tensor_name: str, num_layers: int) -> float:
    """``t`` for layer-list interpolation: layer ``i`` of ``L`` → ``i/(L−1)`` (1 if ``L`` = 1).

    Tensors outside the layer stack (embeddings, final norm, head) get ``t = 0``, as in mergekit.
    """
    loc = layer_of(tensor_name)
    if loc is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, max(0.0, loc[1] / (num_layers - 1)))


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A 63-bit seed from (recipe seed, tensor name), stable across runs, machines and orders."""
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_params(recipe: Recipe, tensor_name: str, num_layers: int):
    """The :class:`~mergelab.methods.MethodParams` of one tensor.

    Layer lists are evaluated at the tensor's layer position, filters against its name; the
    generator (CPU) is seeded from ``(recipe.seed, tensor_name)``, so random methods give the
    same bytes whatever the order, thread or device. Parameters that resolve to nothing (no
    filter matched) are left out, so the method's default applies.
    """
    import torch


    t = layer_position(tensor_name, num_layers)

    def resolve(params: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in params.items():
            v = evaluate_param(value, tensor_name, t)
            if v is not None:
                out[key] = v
        return out

    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(recipe.seed, tensor_name))
    return MethodParams(globals=resolve(recipe.method.params),
                        experts=[resolve(e.params) for e in recipe.experts], generator=gen)
