"""L3 — merging: opening inputs, data statistics, the streaming full-model path, the adapter path,
layer stacking, the in-place merger.

:func:`merge` is the one public entry: it reads the recipe and hands it to the path its output
format needs — :func:`mergelab.merge.full.merge_full` (a model folder, streamed tensor by tensor),
:func:`mergelab.merge.adapter.merge_to_adapter` (one PEFT adapter, merged in ΔW space) or, for a
recipe with ``slices``, :func:`mergelab.merge.slices.merge_slices` (layer ranges stacked).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from mergelab.merge.adapter import LoraMergeResult, merge_to_adapter
from mergelab.merge.full import BLOCK_BYTES, MergeResult, merge_full
from mergelab.merge.slices import merge_slices
from mergelab.recipe import Recipe, load_recipe
from mergelab.util import check_output_path

__all__ = ["merge", "MergeResult", "LoraMergeResult"]


def merge(recipe: Recipe | str | os.PathLike | Mapping[str, Any], out_dir: str | os.PathLike, *,
          device: str = "auto", force: bool = False, progress: bool = True,
          workers: int | None = None, exact_ties: bool = True,
          warn: Callable[[str], None] | None = None, card: bool = True,
          block_bytes: int | None = None) -> MergeResult | LoraMergeResult:
    """Merge the models of ``recipe`` (a :class:`Recipe`, a recipe file, or a dict) into ``out_dir``.

    ``output.format: full`` writes a Hugging Face model folder, ``lora`` one PEFT adapter. An
    existing ``out_dir`` is refused unless ``force``; ``device="auto"`` uses CUDA when present;
    ``workers`` (tensors or modules merged at once) never changes the output bytes.
    ``exact_ties=False`` lets the adapter path take TIES' magnitude cuts from a sample.
    The output never is, holds or lies inside an input (:func:`mergelab.util.check_output_path`),
    experts of another model are refused (:func:`mergelab.merge.inputs.check_identity`; ``warn``
    receives what cannot be checked, and the licence conflicts of the model card) and NaN/Inf are
    refused unless ``output.allow_nonfinite``. ``card`` writes the model card ``README.md``
    (:mod:`mergelab.merge.card`: Hub front matter, inputs, licence, method, recipe).
    ``block_bytes`` (full output, layer stacks): float32 bytes of the inputs read at once; larger
    tensors are merged (copied) in row blocks with the same bytes out (default
    :data:`mergelab.merge.full.BLOCK_BYTES`).
    """
    if isinstance(recipe, (str, os.PathLike)):   # the recipe file is an input too
        check_output_path(out_dir, [recipe])
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    if recipe.slices is not None:   # layer stacking (method passthrough)
        return merge_slices(recipe, out_dir, force=force, progress=progress, warn=warn, card=card,
                            block_bytes=block_bytes or BLOCK_BYTES)
    if recipe.output.format == "lora":
        return merge_to_adapter(recipe, out_dir, device=device, force=force, progress=progress,
                                workers=workers, exact_ties=exact_ties, warn=warn, card=card)
    return merge_full(recipe, out_dir, device=device, force=force, progress=progress, workers=workers, warn=warn,
                      card=card, block_bytes=block_bytes or BLOCK_BYTES)
