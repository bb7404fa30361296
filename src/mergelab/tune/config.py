"""The ``tune:`` section of a recipe: what to search, on which data, with what budget.

::

    tune:
      params:
        lambda: {low: 0.2, high: 1.5}                      # one global value
        weight: {low: 0.0, high: 1.0}                      # one value per expert
        density: {low: 0.1, high: 1.0, per_expert: true}   # per expert although global is allowed
        lambda: {low: 0.5, high: 1.5, groups: [self_attn, mlp]}   # one value per module filter
        weight: {low: 0.0, high: 1.0, layers: 3}           # 3 anchors across the depth
      objective: score            # or entropy (unlabelled inputs)
      metric: rougeL              # generation rows in `score`: rougeL, exact_match, rouge1, rouge2
      data: [val/a.csv, val/b.csv]
      check_fraction: 0.5         # share of each file's rows held out as the check part
      trials: 30
      time_limit: 10m
      sampler: tpe                # or cmaes
      seed: 0

:func:`split_tune_section` takes the section out of a recipe mapping and validates it;
:class:`SearchSpace` turns it into named search dimensions and writes a sampled point back into a
plain recipe mapping, which :func:`mergelab.recipe.load_recipe` validates.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import RecipeError


class TuneError(RecipeError):
    """A tune section is wrong, or the search cannot run as asked."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h)?\s*$")
_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(value: Any) -> float:
    """Seconds from a number or text such as ``90``, ``"90s"``, ``"10m"``, ``"1.5h"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 600, 90s, 10m or 1h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration such as 600, 90s, 10m or 1h, got {value!r}")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


class ParamRange(BaseModel):
    """The range searched for one method parameter and how it is spread.

    ``per_expert`` gives each expert its own value (default: yes for per-expert-only parameters
    such as ``weight``, no for parameters the method also takes globally); ``groups`` gives each
    module filter its own value (tensors matching none keep the recipe's value); ``layers: n``
    gives ``n`` anchors across the depth (the recipe's layer lists: linear in between).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False
    per_expert: bool | None = None
    groups: list[str] | None = Field(None, min_length=1)
    layers: int | None = Field(None, ge=2, le=64)

    @model_validator(mode="after")
    def _range(self):
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("low and high must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low:g})")
        if self.groups is not None:
            if any(not isinstance(g, str) or not g.strip() or g == "*" for g in self.groups):
                raise ValueError("groups are parts of tensor names such as self_attn or mlp (non-empty, not '*')")
            if len(set(self.groups)) != len(self.groups):
                raise ValueError(f"groups repeat a filter: {self.groups}")
        return self


class TuneSection(BaseModel):
    """The validated ``tune:`` section (data paths are absolute)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params: dict[str, ParamRange] = Field(min_length=1)
    objective: Literal["score", "entropy"] = "score"
    metric: Literal["rougeL", "exact_match", "rouge1", "rouge2"] = "rougeL"
    data: list[Path] = Field(min_length=1)
    check_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    rows_per_task: int | None = Field(None, ge=2)
    split_seed: int = 0
    trials: int | None = Field(20, ge=1)
    time_limit: float | None = None
    sampler: Literal["tpe", "cmaes"] = "tpe"
    seed: int = 0
    start_from_recipe: bool = True
    divergence: float = Field(0.10, ge=0.0)
    storage: str | None = None
    study: str | None = None
    eval: dict[str, Any] | None = None

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("a study name must not be empty")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.trials is None and self.time_limit is None:
            raise ValueError("give a budget: trials, time_limit, or both")
        return self


def _fmt_loc(loc: tuple) -> str:
    out = "tune"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue  # pydantic's names of union members, not keys
        else:
            out += f".{part}"
    return out


def _parse_section(raw: Any, root: Path) -> TuneSection:
    if not isinstance(raw, Mapping):
        raise TuneError(f"tune: expected a mapping (params, objective, data, trials, ...), got {raw!r}",
                        hint="see docs/tune.md")
    data = dict(raw)
    files = data.get("data")
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if isinstance(files, list):
        data["data"] = [Path(os.path.expanduser(str(f))) if isinstance(f, (str, os.PathLike)) else f
                        for f in files]
        data["data"] = [root / f if isinstance(f, Path) and not f.is_absolute() else f for f in data["data"]]
    try:
        section = TuneSection.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            loc = err["loc"]
            if err["type"] == "extra_forbidden":
                parent = TuneSection if len(loc) == 1 else ParamRange
                msg = f"unknown key; allowed here: {', '.join(parent.model_fields)}"
            value = err.get("input")
            shown = "" if isinstance(value, Mapping) or err["type"] == "missing" else f" (got {value!r})"
            lines.append(f"{_fmt_loc(loc)}: {msg}{shown}")
        raise TuneError("; ".join(lines), hint="see docs/tune.md for the tune section") from None
    names: dict[str, int] = {}
    for i, f in enumerate(section.data):
        if not f.is_file():
            raise TuneError(f"tune.data[{i}]: file {f} does not exist")
        if f.name in names:
            raise TuneError(f"tune.data[{i}]: {f} has the same file name as tune.data[{names[f.name]}]; "
                            "the task files are told apart by name", hint="rename one of them")
        names[f.name] = i
    return section


def split_tune_section(data: Mapping[str, Any], root: Path) -> tuple[dict, TuneSection]:
    """``(recipe mapping without tune, validated tune section)``; a mergekit config is translated.

    Raises :class:`TuneError` naming the key path (``tune.params.weight.low``) of a wrong value.
    """
    from mergelab.recipe import from_mergekit

    data = dict(data)
    if "tune" not in data:
        raise TuneError("the recipe has no `tune:` section, so there is nothing to search",
                        hint="add tune: {params: {...}, data: [...], trials: N}; see docs/tune.md")
    raw = data.pop("tune")
    if "merge_method" in data:
        data = from_mergekit(data, root)
    return data, _parse_section(raw, root)


# ----------------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Dimension:
    """One searched number: where it goes in the recipe and its range."""

    name: str            # e.g. "weight[1]@self_attn#0"
    key: str             # the method parameter
    expert: int | None   # None: the method's global value
    group: str | None    # module filter, or None
    layer: int | None    # anchor index across depth, or None
    low: float
    high: float
    log: bool


def round_value(v: float) -> float:
    """Four significant digits: what a trial uses and what the tuned recipe says."""
    return float(f"{float(v):.4g}")


class SearchSpace:
    """The search dimensions of a tune section for one recipe (method and experts known)."""

    def __init__(self, recipe_data: Mapping[str, Any], section: TuneSection):
        from mergelab.methods import get_method
        from mergelab.recipe import check_param

        method = recipe_data.get("method")
        name = method if isinstance(method, str) else (method or {}).get("name")
        try:
            spec = get_method(name)
        except RecipeError as exc:
            raise TuneError(f"method.name: {exc.message}", hint=exc.hint) from None
        experts = recipe_data.get("experts") or []
        self.recipe_data = dict(recipe_data)
        if isinstance(method, str):
            self.recipe_data["method"] = {"name": method}
        self.n_experts = len(experts)
        self.method = spec.name
        self.dims: list[Dimension] = []
        for key, rng in section.params.items():
            where = f"tune.params.{key}"
            known = set(spec.expert_params) | set(spec.global_params)
            if key not in known:
                raise TuneError(f"{where}: {spec.name} has no parameter {key!r}; its parameters: "
                                f"{', '.join(sorted(known)) or 'none'}")
            if key == "rows":
                raise TuneError(f"{where}: rows sets how much data the statistics pass reads, once per "
                                "search; it is not searched", hint="set method.rows in the recipe")
            problems = check_param(f"{where}.low", key, rng.low) + check_param(f"{where}.high", key, rng.high)
            if problems:
                raise TuneError("; ".join(problems))
            per_expert = rng.per_expert
            if per_expert is None:
                per_expert = key in spec.expert_params and key not in spec.global_params
            if per_expert and key not in spec.expert_params:
                raise TuneError(f"{where}.per_expert: {spec.name} takes {key!r} only as a global value")
            if not per_expert and key not in spec.global_params:
                raise TuneError(f"{where}.per_expert: {spec.name} takes {key!r} only per expert "
                                "(set per_expert: true or leave it out)")
            for expert in (range(self.n_experts) if per_expert else [None]):
                for group in (rng.groups or [None]):
                    for layer in (range(rng.layers) if rng.layers else [None]):
                        label = key if expert is None else f"{key}[{expert}]"
                        label += f"@{group}" if group else ""
                        label += f"#{layer}" if layer is not None else ""
                        self.dims.append(Dimension(label, key, expert, group, layer, rng.low, rng.high, rng.log))
        self.section = section

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def recipe_dict(self, values: Mapping[str, float]) -> dict:
        """The recipe mapping with the searched values written in (rounded by :func:`round_value`)."""
        data = copy.deepcopy(self.recipe_data)
        data["method"] = dict(data["method"])
        data["experts"] = [dict(e) for e in data["experts"]]
        slots: dict[tuple[str, int | None], list[Dimension]] = {}
        for d in self.dims:
            slots.setdefault((d.key, d.expert), []).append(d)
        for (key, expert), dims in slots.items():
            target = data["method"] if expert is None else data["experts"][expert]
            rng = self.section.params[key]
            v = lambda d: round_value(values[d.name])  # noqa: E731
            if rng.groups:
                entries = []
                for g in rng.groups:
                    gd = [d for d in dims if d.group == g]
                    entries.append({"filter": g, "value": [v(d) for d in gd] if rng.layers else v(gd[0])})
                fixed = target.get(key)
                if isinstance(fixed, list) and fixed and all(isinstance(e, Mapping) for e in fixed):
                    entries += [dict(e) for e in fixed]
                elif fixed is not None:
                    entries.append({"value": fixed})
                target[key] = entries
            elif rng.layers:
                target[key] = [v(d) for d in dims]
            else:
                target[key] = v(dims[0])
        return data

    def start_point(self) -> dict[str, float]:
        """The recipe's own values of the searched dimensions, where it sets a plain number in range."""
        out = {}
        for d in self.dims:
            src = self.recipe_data["method"] if d.expert is None else self.recipe_data["experts"][d.expert]
            value = src.get(d.key)
            if isinstance(value, str):  # YAML reads 1e-3 as text
                try:
                    value = float(value)
                except ValueError:
                    value = None
            if isinstance(value, (int, float)) and not isinstance(value, bool) and d.low <= value <= d.high:
                out[d.name] = value
        return out


def fingerprint(recipe_data: Mapping[str, Any], section: TuneSection) -> str:
    """What a study's trials depend on: the recipe, the search space, the objective and data,
    the split and the evaluation options (not the budget, sampler or storage)."""
    from mergelab.util import sha256_file

    payload = {
        "recipe": json.loads(json.dumps(recipe_data, sort_keys=True, default=str)),
        "params": {k: v.model_dump() for k, v in section.params.items()},
        "objective": section.objective,
        "metric": section.metric,
        "data": [sha256_file(f) for f in section.data],
        "split": [section.check_fraction, section.rows_per_task, section.split_seed],
        "eval": section.eval,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
