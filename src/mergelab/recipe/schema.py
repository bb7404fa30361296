"""The recipe's merge schema (pydantic): models, method, output, seed — and the value rules of
the methods' parameters.

A parameter is a scalar, a list spread across the layers (``[0, 0.5, 1]``: the first value at
the first layer, the last at the last, linear in between), or a list of ``{filter, value}``
entries whose first match (substring of the tensor name; no filter = any) applies. A wrong recipe
raises :class:`~mergelab.errors.RecipeError` naming the key path (``experts[1].weight``), the
value, and what is expected. The example recipe is in :mod:`mergelab.recipe`.
"""
from __future__ import annotations

import difflib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergelab.errors import RecipeError
from mergelab.hub.sources import resolve_model
from mergelab.io.checkpoint import parse_size
from mergelab.io.jsonfile import clip
from mergelab.methods import get_method

_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "f32": "float32", "fp16": "float16",
                  "half": "float16", "f16": "float16", "bf16": "bfloat16"}

# Value rules of the parameters the built-in methods know; other parameters (of methods
# registered elsewhere) get the structural check only.
_NUMBER, _BOOL, _INT = "a number", "true or false", "a whole number"
PARAM_RULES: dict[str, tuple[str, float | None, float | None]] = {
    "weight": (_NUMBER, None, None), "lambda": (_NUMBER, None, None), "t": (_NUMBER, None, None),
    "density": (_NUMBER, 0.0, 1.0), "gamma": (_NUMBER, 0.0, 1.0), "epsilon": (_NUMBER, 0.0, 0.5),
    "eps": (_NUMBER, 0.0, None), "tol": (_NUMBER, 0.0, None), "max_iter": (_INT, 1, None),
    "normalize": (_BOOL, None, None), "rescale": (_BOOL, None, None),
    "filter_wise": (_BOOL, None, None), "int8_mask": (_BOOL, None, None),
    "alpha": (_NUMBER, 0.0, 1.0), "ridge": (_NUMBER, 0.0, None), "rows": (_INT, 1, None),
    "steps": (_INT, 0, None), "lr": (_NUMBER, 0.0, None), "select_topk": (_NUMBER, 0.0, 1.0),
    "common_space_fraction": (_NUMBER, 0.0, 1.0), "use_base": (_BOOL, None, None),
    "normalize_weights": (_BOOL, None, None), "nuslerp_flatten": (_BOOL, None, None),
    "nuslerp_row_wise": (_BOOL, None, None), "scale": (_NUMBER, None, None),
}
_MODEL_KEYS = ("path", "model", "revision")


def fmt_loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", str(part)) and part not in (
                "str", "int", "float", "bool", "list", "dict", "none"):
            out += ("." if out else "") + str(part)
    return out or "(top level)"


# ------------------------------------------------------------------------------------------- models


class ModelRef(BaseModel):
    """A model: a local ``path``, or a Hub repo ``model`` pinned to a ``revision``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    path: Path | None = None
    model: str | None = None
    revision: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.path is None) == (self.model is None):
            raise ValueError("give exactly one of `path` (a local folder) or `model` (a Hub repo id)")
        if self.revision is not None and self.model is None:
            raise ValueError("`revision` goes with `model` (a Hub repo), not with `path`")
        return self

    def resolve(self) -> Path:
        """The local folder: ``path`` itself, or the Hub snapshot via :mod:`mergelab.hub.sources`."""
        if self.path is not None:
            return Path(self.path)

        return Path(resolve_model(self))

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.model}@{self.revision}" if self.revision else str(self.model)


class ExpertRef(ModelRef):
    """An expert: a :class:`ModelRef` plus its own method parameters (``weight``, ``density``, ...).

    ``data`` (data-aware methods such as ``regmean`` only): CSV file(s) of unlabelled inputs of the
    expert's task (competition format, only the ``input`` column is read), from which the input
    statistics of its linear layers are computed. ``accept_mismatch: true`` merges the expert
    although its ``config.json`` (architecture, dimensions) or its adapter's recorded base names
    another model than the base — on purpose; a warning is shown instead of the error.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    data: list[Path] | None = None
    accept_mismatch: bool = False   # merge although its config or recorded base says another model (a warning)

    @field_validator("data", mode="before")
    @classmethod
    def _one_or_more(cls, v: Any) -> Any:
        if isinstance(v, (str, os.PathLike)):
            return [v]
        if isinstance(v, list) and not v:
            raise ValueError("an empty list names no data file")
        return v

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SliceRef(ModelRef):
    """One slice of a layer stack (``method: passthrough``): layers ``start … end − 1`` of one model.

    ``layer_range: [start, end]`` counts from 0 and leaves out ``end``, as mergekit does
    (``[0, 16]`` is the first 16 layers). Other keys are the slice's parameters (``scale``).
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    layer_range: tuple[int, int]

    @field_validator("layer_range", mode="before")
    @classmethod
    def _range(cls, v: Any) -> Any:
        if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(type(x) is int for x in v)):
            raise ValueError("expected [start, end], two whole numbers")
        if not 0 <= v[0] < v[1]:
            raise ValueError("expected [start, end] with 0 ≤ start < end (the end is not included, as in "
                             "mergekit: [0, 16] is the first 16 layers)")
        return tuple(v)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


PASSTHROUGH = "passthrough"


class MethodConfig(BaseModel):
    """The merge method: ``name`` plus its parameters, written inline (``{name: ties, density: 0.2}``)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str

    @model_validator(mode="before")
    @classmethod
    def _flatten_params(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"name": data}
        if isinstance(data, Mapping) and isinstance(data.get("params"), Mapping):
            data = dict(data)
            nested = data.pop("params")
            clash = set(nested) & set(data)
            if clash:
                raise ValueError(f"parameter(s) {sorted(clash)} given both inline and under `params`")
            data.update(nested)
        return data

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OutputConfig(BaseModel):
    """Where and how the result is written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None: each tensor keeps the base's dtype
    shard_size: int | str = "5GB"
    format: Literal["full", "lora"] = "full"
    rank: int | None = Field(default=None, ge=1)
    energy: float | None = Field(default=None, gt=0.0, le=1.0)
    ties_cuts: Literal["exact", "sampled"] = "exact"   # TIES → LoRA: magnitude cuts from every entry or a sample
    allow_nonfinite: bool = False   # merge although an input or the result holds NaN/Inf (else refused)

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype_alias(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.strip().lower().removeprefix("torch.")
            return _DTYPE_ALIASES.get(v, v)
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: int | str) -> int | str:
        parse_size(v)  # ValueError with a readable message
        return v

    @model_validator(mode="after")
    def _lora_only(self):
        if self.format == "full" and (self.rank is not None or self.energy is not None):
            raise ValueError("`rank` and `energy` apply to `format: lora` only")
        if self.format == "full" and self.ties_cuts != "exact":
            raise ValueError("`ties_cuts: sampled` applies to `format: lora` only (a full merge always "
                             "cuts exactly)")
        return self

    @property
    def shard_size_bytes(self) -> int:
        return parse_size(self.shard_size)

    @property
    def torch_dtype(self):
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)


TOKENIZER_SOURCES = ("base", "union")


class TokenizerConfig(BaseModel):
    """The output tokenizer (``tokenizer: {source: ...}``, mergekit's ``tokenizer_source``).

    ``base`` (the default): the base's tokenizer; ``union``: the base's vocabulary plus the tokens
    the experts add; or one expert's tokenizer, named by its ``path`` (relative to the recipe, as
    under ``experts``) or its Hub ``model`` id. With this section the embedding and output rows of
    every model are aligned by token text before they are merged (:mod:`mergelab.merge.vocab`);
    without it, models must share the base's vocabulary and rows are merged by index.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = "base"

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @field_validator("source", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"expected base, union, or an expert's path or Hub id, got {clip(v)}")
        return v


class Recipe(BaseModel):
    """A whole recipe. Constructing one checks the method, its parameters and the expert count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: ModelRef
    experts: list[ExpertRef] = Field(default_factory=list)
    method: MethodConfig
    output: OutputConfig = OutputConfig()
    seed: int = 0
    eval: dict | None = None
    slices: list[SliceRef] | None = None   # layer stacking (method passthrough) instead of experts
    tokenizer: TokenizerConfig | None = None   # None: the base's, rows merged by index (vocabularies must agree)

    @model_validator(mode="before")
    @classmethod
    def _base_of_a_stack(cls, data: Any) -> Any:
        """A layer stack without ``base`` takes config and tokenizer from its first slice's model."""
        if isinstance(data, Mapping) and data.get("slices") == []:
            raise RecipeError("slices: an empty list stacks nothing")
        if isinstance(data, Mapping) and data.get("base") is None and isinstance(data.get("slices"), list) \
                and data["slices"] and isinstance(data["slices"][0], Mapping):
            first = data["slices"][0]
            keys = ("path",) if first.get("path") is not None else ("model", "revision")
            data = {**data, "base": {k: first[k] for k in keys if first.get(k) is not None}}
        return data

    def tokenizer_expert(self) -> int | None:
        """The index of the expert that ``tokenizer.source`` names (None: ``base`` or ``union``)."""
        src = self.tokenizer.source if self.tokenizer is not None else "base"
        if src in TOKENIZER_SOURCES:
            return None
        for i, e in enumerate(self.experts):
            if _names(e, src):
                return i
        return None

    @model_validator(mode="after")
    def _check_tokenizer(self):
        if self.tokenizer is None or self.tokenizer.source == "base":
            return self
        src = self.tokenizer.source
        if self.slices is not None:
            raise RecipeError(f"tokenizer.source: a layer stack (slices) keeps the base's tokenizer, got {clip(src)}",
                              hint="remove the tokenizer section (or write source: base)")
        if self.output.format == "lora":
            raise RecipeError(f"tokenizer.source: a LoRA adapter output keeps the base's tokenizer, got {clip(src)}",
                              hint="use output.format: full to merge models whose vocabularies differ")
        if src in TOKENIZER_SOURCES or _names(self.base, src) or self.tokenizer_expert() is not None:
            return self
        named = [str(e) for e in self.experts]
        close = difflib.get_close_matches(src.strip().lower(), TOKENIZER_SOURCES, n=1)
        raise RecipeError(f"tokenizer.source: {clip(src)} names none of the recipe's models",
                          hint=(f"did you mean {close[0]}? " if close else "")
                          + "write base, union, or one expert's path (as under experts) or Hub id: "
                          + (", ".join(named[:6]) + (" ..." if len(named) > 6 else "") or "no experts"))

    @model_validator(mode="after")
    def _check_method(self):
        try:
            spec = get_method(self.method.name)
        except RecipeError as exc:
            raise RecipeError(f"method.name: {exc.message}", hint=exc.hint) from None
        if spec.name == PASSTHROUGH or self.slices is not None:
            return self._check_stack(spec)
        lo, hi = spec.n_experts
        n = len(self.experts)
        if n < lo or (hi is not None and n > hi):
            want = f"exactly {lo}" if lo == hi else f"at least {lo}" if hi is None else f"{lo} to {hi}"
            raise RecipeError(f"experts: {spec.name} takes {want} expert(s), got {n}")
        problems: list[str] = []
        for i, e in enumerate(self.experts):
            if spec.needs_gram and not e.data:
                problems.append(f"experts[{i}].data: {spec.name} needs unlabelled inputs of each expert's "
                                "task (a CSV with an `input` column, e.g. its validation file) to compute "
                                "the input statistics of the linear layers")
            elif not spec.needs_gram and e.data:
                problems.append(f"experts[{i}].data: {spec.name} does not use data (only data-aware "
                                "methods such as regmean do); remove the key")
            for j, f in enumerate(e.data or []):
                if not Path(f).is_file():
                    problems.append(f"experts[{i}].data[{j}]: file {f} does not exist")
        method_keys = set(spec.global_params) | set(spec.expert_params)
        for key, value in self.method.params.items():
            if key not in method_keys:
                problems.append(f"method.{key}: {spec.name} has no parameter {key!r} (got {clip(value)}); "
                                f"its parameters: {', '.join(sorted(method_keys)) or 'none'}")
            else:
                problems += check_param(f"method.{key}", key, value)
        for i, e in enumerate(self.experts):
            for key, value in e.params.items():
                if key not in spec.expert_params:
                    known = ", ".join(list(_MODEL_KEYS) + (["data"] if spec.needs_gram else [])
                                      + sorted(spec.expert_params))
                    problems.append(f"experts[{i}].{key}: not a per-expert parameter of {spec.name} "
                                    f"(got {clip(value)}); allowed keys: {known}")
                else:
                    problems += check_param(f"experts[{i}].{key}", key, value)
        if problems:
            raise RecipeError("; ".join(problems))
        return self

    def _check_stack(self, spec):
        """A layer stack: ``method: passthrough`` with ``slices``, no experts, a full output."""
        if spec.name != PASSTHROUGH:
            raise RecipeError(f"slices: layer stacking takes method passthrough, got {spec.name}",
                              hint="mergelab does not merge models inside a slice; for a layer-wise merge give "
                                   "`experts` and per-layer parameter lists (docs/recipe.md)")
        if self.slices is None:
            raise RecipeError("method.name: passthrough stacks layers of models: give `slices`, a list of "
                              "{path: ... or model: ..., layer_range: [start, end]}",
                              hint="see docs/recipe.md (layer stacking)")
        if self.experts:
            raise RecipeError(f"experts: a layer stack names its models in `slices`, not in `experts` "
                              f"(got {len(self.experts)} expert(s))", hint="remove `experts`")
        if self.output.format != "full":
            raise RecipeError("output.format: a layer stack is written as a full model, not as a LoRA adapter",
                              hint="remove `output.format` (or write `format: full`)")
        problems: list[str] = []
        for key, value in self.method.params.items():
            if key not in spec.global_params:
                problems.append(f"method.{key}: passthrough has no parameter {key!r} (got {clip(value)}); "
                                f"its parameters: {', '.join(spec.global_params)}")
            else:
                problems += check_param(f"method.{key}", key, value)
        for i, s in enumerate(self.slices):
            for key, value in s.params.items():
                if key not in spec.expert_params:
                    problems.append(f"slices[{i}].{key}: not a key of a slice (got {clip(value)}); allowed keys: "
                                    f"{', '.join(list(_MODEL_KEYS) + ['layer_range', *spec.expert_params])}")
                else:
                    problems += check_param(f"slices[{i}].{key}", key, value)
        if problems:
            raise RecipeError("; ".join(problems))
        return self

    def stack_models(self) -> list[tuple[str, ModelRef]]:
        """``[(role, model)]`` of a layer stack's slices, each model once (its first slice's role)."""
        out, seen = [], set()
        for i, s in enumerate(self.slices or [], 1):
            key = (s.path, s.model, s.revision)
            if key not in seen:
                seen.add(key)
                out.append((f"slice {i}", s))
        return out


def _names(ref: ModelRef, text: str) -> bool:
    """Whether ``text`` (a tokenizer source) names ``ref``: its path, or its Hub id (with or without
    ``@revision``)."""
    if ref.path is not None:
        return os.path.normpath(os.path.expanduser(text)) == os.path.normpath(str(ref.path))
    return text in (ref.model, f"{ref.model}@{ref.revision}")


# ---------------------------------------------------------------------------------- parameters


def check_param(where: str, key: str, value: Any) -> list[str]:
    """Problems of one parameter value: a scalar, a list of scalars, or a list of {filter, value}."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out = []
        for j, entry in enumerate(value):
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry:
                out.append(f"{where}[{j}]: a filtered value is {{filter: <text>, value: <value>}} "
                           f"(got {clip(dict(entry))})")
                continue
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                out.append(f"{where}[{j}].filter: expected text (part of a tensor name), got {clip(entry['filter'])}")
            if isinstance(entry["value"], list) and any(isinstance(v, Mapping) for v in entry["value"]):
                out.append(f"{where}[{j}].value: filters do not nest")
            else:
                out += check_param(f"{where}[{j}].value", key, entry["value"])
        return out
    if isinstance(value, list):
        if not value:
            return [f"{where}: an empty list has no value"]
        out = []
        for j, v in enumerate(value):
            if isinstance(v, (list, Mapping)):
                out.append(f"{where}[{j}]: expected a scalar inside a layer list, got {clip(v)}")
            else:
                out += check_param(f"{where}[{j}]", key, v)
        return out
    if isinstance(value, Mapping):
        return [f"{where}: expected a value, a list across layers, or a list of {{filter, value}} "
                f"(got {clip(dict(value))})"]
    kind, lo, hi = PARAM_RULES.get(key, (None, None, None))
    if isinstance(value, (int, float)) and not isinstance(value, bool) and as_number(value) is None:
        what = "too large to compute with" if isinstance(value, int) else "not a finite number"
        return [f"{where}: {clip(value)} is {what}; expected {kind or 'a finite number'}"]
    if kind is None:
        return [] if isinstance(value, (bool, int, float, str)) else [f"{where}: unsupported value {clip(value)}"]
    if kind == _BOOL:
        return [] if isinstance(value, bool) else [f"{where}: expected true or false, got {clip(value)}"]
    number = as_number(value)
    if number is None or (kind == _INT and not float(number).is_integer()):
        return [f"{where}: expected {kind}, got {clip(value)}"]
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        rng = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else \
            f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
        return [f"{where}: expected {kind} {rng}, got {clip(value)}"]
    return []


def as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:   # an int too large for a float (a 400-digit weight)
            return None
        return number if math.isfinite(number) else None
    if isinstance(value, str) and len(value) <= 100:  # YAML reads 1e-3 as text; mergekit accepts it
        try:
            v = float(value)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None
