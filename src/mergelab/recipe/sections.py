"""The recipe's pipeline sections, each with its schema and parser: ``eval:`` (the data files and the
options of ``mergelab eval``), ``finetune:`` (a LoRA trained in the run) and ``tune:`` (a search
over the method's parameters). Relative paths arrive already resolved by the loader."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import RecipeError
from mergelab.io.jsonfile import clip
from mergelab.evaluate.options import EvalOptions


class EvalSection(BaseModel):
    """The ``eval:`` section of a recipe: the data files plus the options of ``mergelab eval``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: list[Path] = Field(min_length=1, description="competition CSV files to evaluate on")
    options: dict[str, Any] = Field(default_factory=dict)
    compare_base: bool = Field(False, description="`mergelab run` also scores the base on the same files "
                                                  "and flags each task the merge leaves below it")

    @classmethod
    def parse(cls, section: Mapping[str, Any], root: Path) -> "EvalSection":
        """Split ``{data: [...], compare_base: bool, <EvalOptions fields>}``, checking each against its
        schema."""

        section = dict(section)
        compare_base = section.pop("compare_base", False)
        if not isinstance(compare_base, bool):
            raise RecipeError(f"eval.compare_base: expected true or false, got {clip(compare_base)}",
                              hint="compare_base: true scores the base on the same files too (see docs/recipe.md)")
        data = section.pop("data", None)
        if isinstance(data, (str, Path)):
            data = [data]
        if not data:
            raise RecipeError("eval.data: list the competition CSV files to evaluate on (got nothing)",
                              hint="e.g. eval: {data: [test.csv], batch_size: 16}")
        if not isinstance(data, list) or not all(isinstance(p, (str, Path)) for p in data):
            raise RecipeError(f"eval.data: expected a CSV file or a list of them, got {clip(data)}",
                              hint="e.g. eval: {data: [test.csv], batch_size: 16}")
        paths = [Path(p) if Path(p).is_absolute() else (root / p) for p in data]
        for i, p in enumerate(paths):
            if not p.is_file():
                raise RecipeError(f"eval.data[{i}]: file {p} does not exist")
        shots = section.get("shots")
        if shots is not None and not isinstance(shots, (str, Path)):
            raise RecipeError(f"eval.shots: expected a CSV file of examples, got {clip(shots)}")
        options = parse_eval_options(section, "eval", root,
                                     hint="eval: takes `data` plus the options of `mergelab eval` (see docs/eval.md)")
        return cls(data=[p.resolve() for p in paths], options=options.model_dump(mode="json", exclude_defaults=True),
                   compare_base=compare_base)

    def eval_options(self, device: str):
        opts = dict(self.options)
        if device != "auto":
            opts["device"] = device
        return EvalOptions(**opts)


def parse_eval_options(opts: Mapping[str, Any], where: str, root: Path, *, error: type[RecipeError] = RecipeError,
                       hint: str = "the options of `mergelab eval` (see docs/eval.md)") -> EvalOptions:
    """The options of ``mergelab eval`` given in the recipe section ``where`` (a relative ``shots``
    file counts from ``root``), or one ``error`` naming the key."""
    opts = dict(opts)
    if opts.get("shots") and not Path(opts["shots"]).is_absolute():
        opts["shots"] = str(root / opts["shots"])
    try:
        return EvalOptions.model_validate(opts)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise error(f"{where}.{key}: {msg} (got {clip(err.get('input'))})", hint=hint) from None


class DataFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path
    licence: str = Field(description="SPDX-style id of the data's licence, e.g. cc-by-4.0")

    @field_validator("licence")
    @classmethod
    def _lower(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("declare the data's licence, e.g. cc-by-4.0")
        return v.strip().lower()


class FinetuneSection(BaseModel):
    """The ``finetune:`` section (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    when: Literal["before_merge", "after_merge"] = "after_merge"
    data: list[DataFile] = Field(min_length=1)
    steps: int = Field(100, ge=1)
    lr: float = Field(2e-4, gt=0)
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=8)
    warmup: int = Field(0, ge=0)
    seed: int = 0
    expert: dict[str, Any] = Field(default_factory=lambda: {"weight": 1.0})


def parse_finetune_section(raw: Any, root: Path) -> FinetuneSection:
    """Validate a ``finetune:`` mapping; relative data paths count from ``root``.

    Raises :class:`RecipeError` naming the key path (``finetune.data[0].licence``).
    """
    if not isinstance(raw, Mapping):
        raise RecipeError(f"finetune: expected a mapping (when, data, steps, ...), got {clip(raw)}",
                          hint="see docs/budget.md for the finetune section")
    raw = dict(raw)
    if isinstance(raw.get("data"), list):
        fixed = []
        for item in raw["data"]:
            if isinstance(item, (str, Path)):
                item = {"path": item}   # licence missing: reported below
            if isinstance(item, Mapping) and "license" in item and "licence" not in item:
                item = {**{k: v for k, v in item.items() if k != "license"}, "licence": item["license"]}
            if isinstance(item, Mapping) and isinstance(item.get("path"), (str, Path)):
                p = Path(item["path"])
                item = {**item, "path": p if p.is_absolute() else root / p}
            fixed.append(item)
        raw["data"] = fixed
    try:
        section = FinetuneSection.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; allowed: {', '.join(FinetuneSection.model_fields)}"
            elif err["type"] == "missing" and err["loc"][-1] == "licence":
                msg = "declare the data's licence (e.g. licence: cc-by-4.0): a competition run uses open data only"
            else:
                msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            problems.append(f"finetune{where}: {msg}" + ("" if isinstance(got, Mapping) or got is None
                                                         else f" (got {clip(got)})"))
        raise RecipeError("; ".join(problems), hint="see docs/budget.md for the finetune section") from None
    for i, d in enumerate(section.data):
        if not d.path.is_file():
            raise RecipeError(f"finetune.data[{i}].path: file {d.path} does not exist")
    if "weight" not in section.expert:
        raise RecipeError("finetune.expert: give the adapter's `weight` as an expert (e.g. {weight: 1.0})")
    return section


class TuneError(RecipeError):
    """A tune section is wrong, or the search cannot run as asked."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h)?\s*$")


_UNIT = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(value: Any) -> float:
    """Seconds from a number or text such as ``90``, ``"90s"``, ``"10m"``, ``"1.5h"``."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 600, 90s, 10m or 1h, got {clip(value)}")
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:   # an int too large for a float
            seconds = math.inf
    else:
        m = _DURATION.match(str(value)) if isinstance(value, str) and len(value) <= 40 else None
        if not m:
            raise ValueError(f"expected a duration such as 600, 90s, 10m or 1h, got {clip(value)}")
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"a duration must be positive and finite, got {clip(value)}")
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

    params: dict[str, ParamRange] | None = Field(None, min_length=1)
    optimizer: Literal["optuna", "gradient"] = "optuna"
    objective: Literal["score", "entropy"] = "score"
    metric: Literal["rougeL", "exact_match", "rouge1", "rouge2"] = "rougeL"
    below_base_penalty: float = Field(0.0, ge=0.0, allow_inf_nan=False)
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
    steps: int | None = Field(None, ge=1)                          # optimizer: gradient only
    learning_rate: float | None = Field(None, gt=0.0, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _gradient_defaults(cls, data: Any) -> Any:
        # the gradient optimizer learns on unlabelled inputs: its objective is entropy unless given
        if isinstance(data, Mapping) and data.get("optimizer") == "gradient" and "objective" not in data:
            data = {**data, "objective": "entropy"}
        return data

    @field_validator("time_limit", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("below_base_penalty")
    @classmethod
    def _penalty_needs_scores(cls, v: float, info) -> float:
        if v > 0 and info.data.get("objective") == "entropy":
            raise ValueError("a penalty below the base needs scores to compare with the base's: it works with "
                             "objective: score (entropy is no score a merge can fall below)")
        return v

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
        if self.optimizer == "gradient":
            if self.objective != "entropy":
                raise ValueError("optimizer: gradient descends the prediction entropy of unlabelled inputs; "
                                 f"objective {self.objective!r} has no gradient (use objective: entropy, or "
                                 "optimizer: optuna)")
        else:
            if self.params is None:
                raise ValueError("params: give the parameters to search (only optimizer: gradient has a "
                                 "default: one weight per expert per layer)")
            given = [k for k in ("steps", "learning_rate") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: only for optimizer: gradient (optuna counts trials)")
        return self


def _tune_loc(loc: tuple) -> str:
    out = "tune"
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part) or part in ("str", "int", "float", "bool", "list", "dict", "none"):
            continue  # pydantic's names of union members, not keys
        else:
            out += f".{part}"
    return out


def parse_tune_section(raw: Any, root: Path) -> TuneSection:
    if not isinstance(raw, Mapping):
        raise TuneError(f"tune: expected a mapping (params, objective, data, trials, ...), got {clip(raw)}",
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
            shown = "" if isinstance(value, Mapping) or err["type"] == "missing" else f" (got {clip(value)})"
            lines.append(f"{_tune_loc(loc)}: {msg}{shown}")
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