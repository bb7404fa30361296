"""Per-tensor parameter resolution: a recipe parameter (scalar, per-layer list, or filtered list)
evaluated for one tensor's layer and module, and the tensor's own random seed."""
from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping
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


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


def layer_of(tensor_name: str) -> tuple[str, int] | None:
    """``("model", 3)`` for ``model.layers.3.mlp.up_proj.weight``; None for a non-layer tensor.

    The first part is the layer stack's prefix (``encoder``/``decoder`` for T5), so stacks of
    different depth are told apart.
    """
    m = _LAYER_RE.search(tensor_name)
    if m is None:
        return None
    return tensor_name[: m.start()], int(m.group(1))


def layer_module(tensor_name: str) -> str | None:
    """``"model.layers.3"`` for ``model.layers.3.mlp.up_proj.weight``: the name of the layer module
    the tensor belongs to (:func:`layer_of`'s layer); None for a non-layer tensor."""
    m = _LAYER_RE.search(tensor_name)
    return None if m is None else tensor_name[: m.end() - 1]


def layer_depths(names) -> dict[str, int]:
    """``{layer-stack prefix: number of layers}`` over tensor names (see :func:`layer_of`)."""
    depth: dict[str, int] = {}
    for n in names:
        loc = layer_of(n)
        if loc is not None:
            depth[loc[0]] = max(depth.get(loc[0], 0), loc[1] + 1)
    return depth


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
