"""Layers of a checkpoint by tensor name, and the layout of a model stacked from layer ranges.

A tensor belongs to layer ``i`` of a stack when its name holds ``layers.i.`` (or ``layer``, ``h``,
``block``, ``blocks``): ``model.layers.3.mlp.up_proj.weight`` is layer 3 of the stack ``model``.
:func:`plan_stack` lays out the tensors of a layer-stacking (``passthrough``) merge from the
tensor shapes alone — what the merge writes, what the rule check counts and what the planner
sizes — so the three agree, and a wrong layer range is found before anything is read or written.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mergelab.errors import RecipeError, ShapeMismatchError
from mergelab.util import natural_key

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")
# Tensors outside the layers that sit before them (the input side); every other one sits after
# them (final norm, output head).
_INPUT_SIDE = re.compile(r"embed|(?:^|\.)(?:wte|wpe|shared)\.")


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


def layer_depths(names: Iterable[str]) -> dict[str, int]:
    """``{layer-stack prefix: number of layers}`` over tensor names (see :func:`layer_of`)."""
    depth: dict[str, int] = {}
    for n in names:
        loc = layer_of(n)
        if loc is not None:
            depth[loc[0]] = max(depth.get(loc[0], 0), loc[1] + 1)
    return depth


def renumber_layer(tensor_name: str, index: int) -> str:
    """``tensor_name`` moved to layer ``index`` of its stack (a layer tensor's name only)."""
    m = _LAYER_RE.search(tensor_name)
    if m is None:
        raise ValueError(f"{tensor_name!r} is not a layer tensor")
    return f"{tensor_name[: m.start(1)]}{index}{tensor_name[m.end(1):]}"


@dataclass(frozen=True)
class StackedTensor:
    """One tensor of a stacked model: its output name, and where it is copied from."""

    name: str                       # in the output
    part: int                       # the slice it comes from (index into the slices)
    source: str                     # its name in that slice's model
    shape: tuple[int, ...]
    t: float                        # its layer's place in the slice (0 … 1), for layer-list parameters


@dataclass(frozen=True)
class StackLayout:
    """The stacked model: its tensors (in writing order), and each output layer's origin."""

    tensors: list[StackedTensor]
    layers: list[tuple[int, int]]   # output layer j ← (slice, layer of that slice's model)
    prefix: str                     # the layer stack's prefix, e.g. "model"

    @property
    def parameters(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors)


def _layer_table(shapes: Mapping[str, Sequence[int]], prefix: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """``{layer: {name after the layer number: shape}}`` of one layer stack."""
    table: dict[int, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        m = _LAYER_RE.search(name)
        if m is not None and name[: m.start()] == prefix:
            table.setdefault(int(m.group(1)), {})[name[m.end(1):]] = tuple(int(d) for d in shape)
    return table


def _layer_names(shapes: Mapping[str, Sequence[int]], prefix: str, layer: int) -> dict[str, str]:
    """``{name after the layer number: full name}`` of one layer's tensors."""
    out = {}
    for name in shapes:
        m = _LAYER_RE.search(name)
        if m is not None and name[: m.start()] == prefix and int(m.group(1)) == layer:
            out[name[m.end(1):]] = name
    return out


def _difference(want: Mapping[str, tuple], got: Mapping[str, tuple]) -> str:
    missing = sorted(set(want) - set(got), key=natural_key)
    if missing:
        return f"it lacks {missing[0].lstrip('.')}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = sorted(set(got) - set(want), key=natural_key)
    if extra:
        return f"it has {extra[0].lstrip('.')}, which the first slice's layers lack"
    key = next(k for k in sorted(want, key=natural_key) if want[k] != got[k])
    return f"{key.lstrip('.')} has shape {list(got[key])} where the first slice's layers have {list(want[key])}"


_FIT_HINT = "every slice must come from a model of the same architecture and width (hidden size, heads, MLP size)"


def plan_stack(parts: Sequence[tuple[Mapping[str, Sequence[int]], int, int]],
               labels: Sequence[str]) -> StackLayout:
    """The tensors of a model stacked from ``parts``: ``(tensor shapes of a model, start, end)``,
    layers ``start … end − 1`` of that model each (the end is not included, as in mergekit).

    Output layer ``j`` is the ``j``-th layer copied, renamed; the tensors outside the layers come
    from the first part's model on the input side (embeddings) and from the last part's model
    after the layers (final norm, output head), as mergekit's ``passthrough`` takes them. Raises
    :class:`RecipeError` for a layer range the model does not have, and
    :class:`ShapeMismatchError` (naming the slice and the layer) when a layer does not have the
    tensors and shapes of the first slice's layers. ``labels[i]`` names part ``i`` in messages.
    """
    if not parts:
        raise RecipeError("slices: an empty list stacks nothing")
    prefix = None
    tables = []
    for i, ((shapes, start, end), label) in enumerate(zip(parts, labels)):
        depths = layer_depths(shapes)
        if not depths:
            raise RecipeError(f"{label}: the model has no numbered layers (…layers.N…) to stack")
        if len(depths) > 1:
            raise RecipeError(f"{label}: the model has {len(depths)} layer stacks ({', '.join(sorted(depths))}); "
                              "layer stacking takes a model with one stack of layers (a decoder)",
                              hint="encoder-decoder models such as T5 cannot be stacked")
        (own_prefix, depth), = depths.items()
        if prefix is None:
            prefix = own_prefix
        elif own_prefix != prefix:
            raise ShapeMismatchError(f"{label}: its layers are named {own_prefix}.layers.N…, those of the first "
                                     f"slice {prefix}.layers.N…", hint=_FIT_HINT)
        if not 0 <= start < end <= depth:
            raise RecipeError(f"{label}.layer_range: [{start}, {end}] is not a range of the model's {depth} layers "
                              f"(0 to {depth - 1}); the end is not included, so all of them is [0, {depth}]")
        table = _layer_table(shapes, prefix)
        missing = [k for k in range(start, end) if k not in table]
        if missing:
            raise ShapeMismatchError(f"{label}: the model has no tensors of layer {missing[0]} (its layers are "
                                     "not numbered 0, 1, 2, …)", hint="check that the checkpoint is complete")
        tables.append(table)

    reference = tables[0][parts[0][1]]
    tensors: list[StackedTensor] = []
    layers: list[tuple[int, int]] = []
    for i, ((shapes, start, end), table, label) in enumerate(zip(parts, tables, labels)):
        n = end - start
        for k in range(start, end):
            if table[k] != reference:
                raise ShapeMismatchError(f"layer {k} of {label} does not fit the stack: "
                                         f"{_difference(reference, table[k])}", hint=_FIT_HINT)
            j = len(layers)
            layers.append((i, k))
            t = (k - start) / (n - 1) if n > 1 else 1.0
            names = _layer_names(shapes, prefix, k)
            for rest, shape in table[k].items():
                tensors.append(StackedTensor(renumber_layer(names[rest], j), i, names[rest], shape, t))

    first, last = parts[0][0], parts[-1][0]
    for name in first:
        if layer_of(name) is not None:
            continue
        shape = tuple(int(d) for d in first[name])
        if _INPUT_SIDE.search(name) or len(parts) == 1:
            tensors.append(StackedTensor(name, 0, name, shape, 0.0))
            continue
        if name not in last:
            raise ShapeMismatchError(f"{labels[-1]}: the model has no {name}, which the stack takes from the last "
                                     f"slice's model (as mergekit does)", hint=_FIT_HINT)
        if tuple(int(d) for d in last[name]) != shape:
            raise ShapeMismatchError(f"{labels[-1]}: {name} has shape {list(last[name])}, the first slice's model "
                                     f"{list(shape)}", hint=_FIT_HINT)
        tensors.append(StackedTensor(name, len(parts) - 1, name, shape, 0.0))
    tensors.sort(key=lambda t: natural_key(t.name))
    return StackLayout(tensors, layers, prefix)
