"""Layer stacking (mergekit's ``slices`` with ``merge_method: passthrough``): a model whose layers
are copied, in order, from layer ranges of one or more models.

1. **Plan** from the headers alone (:func:`~mergelab.io.layers.plan_stack`), before anything is
   written: every layer range exists in its model, every copied layer has the tensors and shapes
   of the first slice's layers, the slices' models are of the base's family and width. Output
   layer ``j`` is the ``j``-th layer copied, renamed; embeddings come from the first slice's model,
   the final norm and the output head from the last slice's model (as mergekit takes them);
   config, tokenizer and chat template from ``base`` (by default the first slice's model).
2. **Stream**: one tensor at a time — read it, scale it when the slice (or the method) says
   ``scale`` (:func:`mergelab.methods.passthrough.passthrough`), cast it to ``output.dtype``, and
   write its bytes into the planned place of its shard (:class:`~mergelab.io.checkpoint.ShardedWriter`).
   A tensor larger than the block budget (``block_bytes`` of float32, as the merge engine's) is
   copied in row blocks (read by rows, written by rows: the same bytes), so peak memory is one
   block, not the largest tensor (an embedding of a large vocabulary); NaN/Inf are refused as in
   every merge.
3. **Finish**: the base's non-weight files, ``config.json`` with the new layer count (and
   ``layer_types`` rebuilt layer by layer), the model card; the temporary folder is renamed into
   place, so a failure leaves nothing behind.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import ModelMismatchError, RecipeError
from mergelab.io.adapter import is_adapter_dir
from mergelab.io.checkpoint import CheckpointReader, ShardedWriter, copy_model_files
from mergelab.io.layers import StackedTensor, StackLayout, plan_stack
from mergelab.merge.card import write_merge_card
from mergelab.merge.full import BLOCK_BYTES, MergeResult
from mergelab.merge.inputs import RESULT, check_finite, config_differences
from mergelab.methods import MethodParams, get_method
from mergelab.progress import ProgressBar
from mergelab.recipe import Recipe
from mergelab.recipe.params import evaluate_param
from mergelab.util import atomic_output_dir, check_output_dir, check_output_path

__all__ = ["merge_slices", "stack_layout"]

#: config.json keys that hold a model's number of layers (the first one present is set)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def _key(ref) -> tuple:
    return (ref.path, ref.model, ref.revision)


def _label(i: int, ref) -> str:
    return f"slices[{i}] ({ref})"


def stack_layout(recipe: Recipe, readers: Mapping[tuple, CheckpointReader]) -> StackLayout:
    """The stacked model of ``recipe`` from its slices' opened models (``{(path, model, revision):
    reader}``): headers only. Raises what :func:`~mergelab.io.layers.plan_stack` raises."""
    parts = []
    for s in recipe.slices:
        src = readers[_key(s)]
        names = src.keys()
        parts.append(({n: src.shape(n) for n in names}, *s.layer_range))
    return plan_stack(parts, [_label(i, s) for i, s in enumerate(recipe.slices)])


def _without_depth(cfg: Mapping[str, Any] | None) -> dict | None:
    if not isinstance(cfg, Mapping):
        return None
    out = {k: v for k, v in cfg.items() if k not in LAYER_COUNT_KEYS + ("num_decoder_layers", "layer_types")}
    if isinstance(out.get("text_config"), Mapping):
        out["text_config"] = _without_depth(out["text_config"])
    return out


def _check_family(recipe: Recipe, base_cfg: Mapping | None, readers: Mapping[tuple, CheckpointReader]) -> None:
    """Each slice's model must be of the base's family and width (its depth may differ)."""
    for i, s in enumerate(recipe.slices):
        diffs = config_differences(_without_depth(base_cfg), _without_depth(readers[_key(s)].config))
        if diffs:
            raise ModelMismatchError(f"{_label(i, s)} is another model than the base {recipe.base}: {', '.join(diffs)}",
                                     hint="every slice must come from a model of the base's family and width")


def _scale_params(recipe: Recipe, t: StackedTensor) -> MethodParams:
    """The passthrough parameters of one output tensor: its slice's, else the method's."""
    def resolve(params: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in params.items():
            v = evaluate_param(value, t.name, t.t)
            if v is not None:
                out[key] = v
        return out

    return MethodParams(globals=resolve(recipe.method.params), experts=[resolve(recipe.slices[t.part].params)])


def _stack_columns() -> tuple:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    return (TextColumn("[bold]stacking[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"),
            TimeElapsedColumn())


def _write_config(config_file: Path, layout: StackLayout, configs: list[Mapping | None], dtype: str | None) -> None:
    """Set the layer count (and ``layer_types``, layer by layer from each slice's model) and the dtype."""
    if not config_file.is_file():
        return
    cfg = json.loads(config_file.read_text(encoding="utf-8"))
    n = len(layout.layers)
    for section in (cfg, cfg.get("text_config")):
        if not isinstance(section, dict):
            continue
        key = next((k for k in LAYER_COUNT_KEYS if k in section), None)
        if key is not None or section is cfg:
            section[key or LAYER_COUNT_KEYS[0]] = n
        if isinstance(section.get("layer_types"), list):
            kinds = []
            for part, k in layout.layers:
                own = configs[part] if section is cfg else (configs[part] or {}).get("text_config")
                own_types = own.get("layer_types") if isinstance(own, Mapping) else None
                kinds.append(own_types[k] if isinstance(own_types, list) and k < len(own_types) else None)
            if None in kinds:
                del section["layer_types"]   # transformers derives the default pattern
            else:
                section["layer_types"] = kinds
    if dtype is not None:
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[k] = dtype
    config_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def merge_slices(recipe: Recipe, out_dir: str | os.PathLike, *, force: bool = False, progress: bool = True,
                 warn: Callable[[str], None] | None = None, card: bool = True,
                 block_bytes: int = BLOCK_BYTES) -> MergeResult:
    """Write the layer stack of ``recipe`` (``slices`` with ``method: passthrough``) into ``out_dir``.

    Everything is checked from headers and configs before the first byte is written (see the
    module's docstring); the output is a Hugging Face model folder. Callers go through
    :func:`mergelab.merge.merge`. The copy runs on the CPU: it reads and writes bytes, scaling at most,
    in row blocks of at most ``block_bytes`` (as float32) per tensor.
    """
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    local = [r.path for r in (recipe.base, *recipe.slices) if r.path is not None]
    check_output_path(out_dir, local)   # before the Hub is asked
    check_output_dir(out_dir, force)
    base_path = Path(recipe.base.resolve())
    paths = {_key(ref): Path(ref.resolve()) for _, ref in recipe.stack_models()}
    check_output_path(out_dir, [base_path, *paths.values()])
    if is_adapter_dir(base_path):
        raise RecipeError(f"base ({recipe.base}): is a LoRA adapter; a layer stack takes its config and tokenizer "
                          "from a full model", hint="name a full model as `base`, or leave `base` out (the first "
                                                    "slice's model is used)")
    for i, s in enumerate(recipe.slices):
        if is_adapter_dir(paths[_key(s)]):
            raise RecipeError(f"{_label(i, s)}: is a LoRA adapter; a slice copies the layers of a full model",
                              hint="merge the adapter into its base first (mergelab merge with task_arithmetic), "
                                   "then stack the merged model")
    readers: dict[tuple, CheckpointReader] = {}
    warnings: list[str] = []
    try:
        for key, path in paths.items():
            readers[key] = CheckpointReader(path)
        base_file = base_path / "config.json"
        base_cfg = json.loads(base_file.read_text(encoding="utf-8")) if base_file.is_file() else None
        _check_family(recipe, base_cfg, readers)
        layout = stack_layout(recipe, readers)
        spec = get_method("passthrough")
        out_dtype = recipe.output.torch_dtype
        sources = [readers[_key(s)] for s in recipe.slices]
        planned = [(t.name, t.shape, sources[t.part].dtype(t.source) if out_dtype is None
                    or not sources[t.part].dtype(t.source).is_floating_point else out_dtype) for t in layout.tensors]
        t_plan = time.perf_counter()
        with atomic_output_dir(out_dir, force) as tmp:
            writer = ShardedWriter(tmp, recipe.output.shard_size_bytes, layout=planned)
            try:
                with ProgressBar(progress, _stack_columns, len(planned)) as bar:
                    for t, (_, _, dtype) in zip(layout.tensors, planned):
                        _copy_one(recipe, spec, t, sources[t.part], dtype, writer, block_bytes)
                        bar.update(advance=1)
            except BaseException:
                writer.abort()
                raise
            index = writer.close()
            copied = copy_model_files(base_path, tmp) if base_path.is_dir() else []
            _write_config(tmp / "config.json", layout, [src.config for src in sources], recipe.output.dtype)
            if card:
                warnings += write_merge_card(tmp, recipe, base_path, list(paths.values()), warn)
    finally:
        for r in readers.values():
            r.close()
    t_end = time.perf_counter()
    return MergeResult(out_dir=out_dir, tensors=len(planned), bytes_written=index["metadata"]["total_size"],
                       device="cpu", method=spec.name, workers=1, copied_files=copied, warnings=warnings,
                       seconds={"plan": t_plan - t_start, "merge": t_end - t_plan, "total": t_end - t_start})


def _copy_one(recipe: Recipe, spec, t: StackedTensor, src: CheckpointReader, dtype: torch.dtype,
              writer: ShardedWriter, block_bytes: int = BLOCK_BYTES) -> None:
    """Copy one tensor into the stack: scaled when asked, cast to ``dtype``, checked for NaN/Inf;
    in row blocks when its float32 size exceeds ``block_bytes``."""
    if not src.dtype(t.source).is_floating_point:   # integer/bool buffers: as they are
        writer.add(t.name, src.get(t.source))
        return
    params = _scale_params(recipe, t)
    step = max(1, block_bytes // (4 * math.prod(t.shape[1:]))) if t.shape else 1
    if not t.shape or t.shape[0] <= step:
        writer.add(t.name, _copied(recipe, spec, t, src.get(t.source), dtype, params))
        return
    for r0 in range(0, t.shape[0], step):
        rows = src.get_rows(t.source, r0, min(t.shape[0], r0 + step))
        writer.add_rows(t.name, r0, _copied(recipe, spec, t, rows, dtype, params))


def _copied(recipe: Recipe, spec, t: StackedTensor, x: torch.Tensor, dtype: torch.dtype,
            params: MethodParams) -> torch.Tensor:
    """``x`` (the tensor, or rows of it) as it goes into the stack: scaled, cast, checked."""
    finite = not recipe.output.allow_nonfinite
    if finite:
        check_finite(x, t.source, _label(t.part, recipe.slices[t.part]))
    if params.get("scale") is not None or params.experts[0].get("scale") is not None:
        x = spec.fn(torch.zeros((), dtype=torch.float32).expand(x.shape), [x.float()], params).to(dtype)
        if finite:   # after the cast: an overflow to float16 counts too
            check_finite(x, t.name, RESULT)
    elif x.dtype != dtype:
        x = x.to(dtype)
        if finite:
            check_finite(x, t.name, RESULT)
    return x
