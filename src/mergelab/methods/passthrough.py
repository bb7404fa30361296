"""Passthrough: one input copied as it is (optionally scaled), the tensor-level half of layer stacking.

Layer stacking itself — which layers of which model go where — is :mod:`mergelab.merge.slices`;
this function is what happens to each tensor on the way.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.methods import MethodParams, register


@register("passthrough", needs_base=False, n_experts=(1, 1), expert_params=("scale",), global_params=("scale",),
          elementwise=True)
def passthrough(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """The one input unchanged, or times ``scale``: ``θ = θ_1``, or ``θ = s·θ_1``.

    Used by layer stacking (``slices``): each output tensor is a copy of one tensor of one model;
    ``scale`` (default: none, the bytes are copied) scales it, e.g. ``scale: [{filter: o_proj,
    value: 0}, {value: 1}]`` to silence the attention output of a repeated layer. Elementwise:
    large tensors are copied in row blocks.

    Reference: mergekit's ``passthrough`` method (Goddard et al., "Arcee's MergeKit: A Toolkit for
    Merging Large Language Models", 2024, arXiv:2403.13257), which it reproduces.
    """
    scale = p.per_expert("scale", None)[0] if p.experts else p.get("scale")
    if scale is None:
        return experts[0]
    return experts[0] * float(scale)
