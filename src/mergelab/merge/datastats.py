"""The input statistics a recipe's data-aware method needs, for the merge paths: one entry.

RegMean's are measured on each expert's own model (:mod:`mergelab.merge.statistics`); a method
registered with ``merged_stats=True`` (RegMean++) has them measured in the merged model's forward
pass, layer by layer (:mod:`mergelab.merge.merged_stats`). Both are cached under
``$MERGELAB_CACHE/gram``; both give one :class:`~mergelab.merge.statistics.GramSet` per expert.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from mergelab.io.checkpoint import TensorSource
from mergelab.merge.merged_stats import merged_grams
from mergelab.merge.statistics import GramSet, changed_names, own_grams
from mergelab.methods import get_method
from mergelab.recipe import Recipe


def recipe_grams(recipe: Recipe, base: Path, experts: Sequence[Path], *, names: Iterable[str] | None,
                 device: torch.device | str = "cpu", say: Callable[[str], None] | None = None
                 ) -> list[GramSet] | None:
    """The experts' statistics when the recipe's method needs them (else None)."""
    spec = get_method(recipe.method.name)
    if not spec.needs_gram:
        return None
    if spec.merged_stats:
        return merged_grams(recipe, Path(base), [Path(e) for e in experts], names=names, device=device, say=say)
    return own_grams(recipe, Path(base), [Path(e) for e in experts], names=names, device=device, say=say)


def data_statistics(recipe: Recipe, base_path, expert_paths, experts: Sequence[TensorSource],
                    dev: torch.device, progress: bool) -> list | None:
    """The experts' input Gram matrices for a data-aware method, else None.

    Only the tensors the experts change are measured when every expert is a LoRA adapter."""

    say = None
    if progress:
        from rich.console import Console

        say = Console(stderr=True).print
    return recipe_grams(recipe, Path(base_path), [Path(p) for p in expert_paths],
                        names=changed_names(experts), device=dev, say=say)
