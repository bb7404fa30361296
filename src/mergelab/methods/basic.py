"""Linear merges: the weighted average of the experts, and task arithmetic.

Notation used by every method module: ``θ_0`` is the base tensor, ``θ_i`` the i-th expert,
``δ_i = θ_i − θ_0`` its task vector, ``w_i`` its weight and ``λ`` the global scale ``lambda``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mergelab.errors import RecipeError
from mergelab.methods import MethodParams, register


@register("linear", linear_in_delta=True, needs_base=False, elementwise=True,
          expert_params=("weight",), global_params=("normalize",))
def linear(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Weighted average of the experts ("model soup"); the base takes no part.

    ``θ = Σ_i w_i θ_i / Σ_i w_i``; with ``normalize: false``, ``θ = Σ_i w_i θ_i``.
    Defaults: ``weight`` 1, ``normalize`` true. With normalized weights this equals
    ``θ_0 + Σ_i ŵ_i δ_i`` for any base, which is what the LoRA path relies on.

    Paper: Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models
    improves accuracy without increasing inference time", ICML 2022 (arXiv:2203.05482).
    """
    weights = [float(w) for w in p.per_expert("weight", 1.0)]
    out = torch.zeros_like(experts[0])
    for w, e in zip(weights, experts):
        out.add_(e, alpha=w)
    if p.get("normalize", True):
        total = sum(weights)
        if abs(total) < 1e-12:
            raise RecipeError(f"linear: the expert weights {weights} sum to zero, so they cannot be "
                              "normalized", hint="change the weights, or set normalize: false")
        out.div_(total)
    return out


@register("task_arithmetic", linear_in_delta=True, elementwise=True,
          expert_params=("weight",), global_params=("lambda", "normalize"))
def task_arithmetic(base: torch.Tensor, experts: Sequence[torch.Tensor], p: MethodParams) -> torch.Tensor:
    """Add the weighted task vectors to the base.

    ``θ = θ_0 + λ Σ_i w_i δ_i``; with ``normalize: true`` the sum is divided by ``Σ_i w_i``
    (left as is when that is 0). Defaults: ``weight`` 1, ``lambda`` 1, ``normalize`` false.

    Paper: Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023 (arXiv:2212.04089).
    """
    weights = [float(w) for w in p.per_expert("weight", 1.0)]
    mixed = torch.zeros_like(base)
    for w, e in zip(weights, experts):
        mixed.add_(e - base, alpha=w)
    if p.get("normalize", False) and abs(sum(weights)) >= 1e-8:
        mixed.div_(sum(weights))
    return mixed.mul_(float(p.get("lambda", 1.0))).add_(base)
