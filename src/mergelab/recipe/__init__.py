"""L2 — the recipe: one schema with every section, one loader, one path resolver, per-tensor
parameter resolution, and the mergekit translator.

A recipe is YAML (or JSON)::

    base: {path: ./base}                    # or {model: org/name, revision: <commit>}
    experts:
      - {path: ./expert_a, weight: 1.0, density: 0.5}
      - {path: ./expert_b, weight: 0.7}
    method: {name: ties, density: 0.2, lambda: 1.0}
    output: {dtype: bfloat16}
    seed: 0
    eval: {data: [test.csv]}                # mergelab run: evaluation (mergelab.recipe.sections)
    finetune: {...}                         # mergelab run: a LoRA trained in the run
    tune: {...}                             # mergelab tune: the search

:func:`read_recipe` reads all of it (:class:`RecipeFile`); :func:`load_recipe` returns the merge
part (:class:`Recipe`). See ``docs/recipe.md``.
"""
from mergelab.recipe.loader import RecipeFile, absolute_paths, load_recipe, read_recipe
from mergelab.io.layers import layer_depths, layer_module, layer_of
from mergelab.recipe.params import layer_position, resolve_params, tensor_seed
from mergelab.recipe.schema import ExpertRef, MethodConfig, ModelRef, OutputConfig, Recipe, check_param

__all__ = ["Recipe", "RecipeFile", "ModelRef", "ExpertRef", "MethodConfig", "OutputConfig", "read_recipe",
           "load_recipe", "absolute_paths", "resolve_params", "layer_of", "layer_module", "layer_depths", "layer_position",
           "tensor_seed", "check_param"]
