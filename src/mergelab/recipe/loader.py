"""The one recipe loader: a YAML/JSON file or a mapping → a validated :class:`RecipeFile` with every
section (merge, ``eval:``, ``finetune:``, ``tune:``) and every relative path resolved against the
recipe's folder, by one path resolver."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from mergelab.errors import RecipeError
from mergelab.recipe.mergekit import from_mergekit
from mergelab.recipe.schema import Recipe, fmt_loc
from mergelab.recipe.sections import (EvalSection, FinetuneSection, TuneSection, parse_finetune_section,
                                      parse_tune_section)


@dataclass(frozen=True)
class RecipeFile:
    """A loaded recipe: the merge it describes and its pipeline sections, paths absolute.

    ``data`` is the merge part as a plain mapping (mergekit configs translated, no ``finetune:`` or
    ``tune:``), for callers that write changed recipes back (``mergelab tune``).
    """

    recipe: Recipe
    data: dict
    root: Path
    label: str
    eval: EvalSection | None = None
    finetune: FinetuneSection | None = None
    tune: TuneSection | None = None


def read_recipe(source: str | os.PathLike | Mapping[str, Any], *,
                base_dir: str | os.PathLike | None = None) -> RecipeFile:
    """Read and validate a recipe with all its sections from a YAML/JSON file or a mapping.

    Accepts mergelab recipes and mergekit YAML configs (detected by ``merge_method``). Relative
    paths resolve against the recipe file's folder (or ``base_dir``; for a mapping without it,
    the current folder). Every error is one :class:`RecipeError` naming the file and key path.
    """
    if isinstance(source, Mapping):
        data, label = dict(source), "recipe"
        root = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(source)
        label = str(path)
        data = _read_file(path)
        root = Path(base_dir) if base_dir is not None else path.parent
    root = root.absolute()
    try:
        finetune_raw, tune_raw = data.pop("finetune", None), data.pop("tune", None)
        if "merge_method" in data:
            data = from_mergekit(data, root)
        data = absolute_paths(data, root)
        recipe = _validate(data)
        # eval: without data only sets prompt options (of RegMean's statistics pass); `run` needs data
        has_data = isinstance(data.get("eval"), Mapping) and data["eval"].get("data") is not None
        eval_section = EvalSection.parse(data["eval"], root) if has_data else None
        finetune = None if finetune_raw is None else parse_finetune_section(finetune_raw, root)
        tune = None if tune_raw is None else parse_tune_section(absolute_paths({"tune": tune_raw}, root)["tune"], root)
    except RecipeError as exc:
        raise type(exc)(f"{label}: {exc.message}", hint=exc.hint) from None
    if finetune is not None and finetune.when == "after_merge" and recipe.output.format == "lora":
        raise RecipeError(f"{label}: finetune.when: after_merge trains on the merged model, which needs "
                          "output.format: full (got lora)",
                          hint="use when: before_merge (the adapter joins the merge as an expert), or format: full")
    return RecipeFile(recipe=recipe, data=data, root=root, label=label, eval=eval_section,
                      finetune=finetune, tune=tune)


def load_recipe(source: str | os.PathLike | Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> Recipe:
    """The merge part (:class:`Recipe`) of :func:`read_recipe`."""
    return read_recipe(source, base_dir=base_dir).recipe


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        pos = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        raise RecipeError(f"{path}: not valid YAML{pos}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe is a mapping (base, experts, method, ...), got {type(data).__name__}")
    return dict(data)


def _validate(data: Mapping[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            value = err.get("input")
            shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; allowed here: {', '.join(_allowed_keys(err['loc']))}"
            lines.append(f"{fmt_loc(err['loc'])}: {msg}{shown}")
        raise RecipeError("; ".join(lines), hint="see docs/recipe.md for the recipe format") from None


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        nested = next((a for a in getattr(ann, "__args__", (ann,))
                       if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            break
        model = nested
    keys = list(model.model_fields)
    return keys + ["finetune", "tune"] if model is Recipe else keys


def absolute_paths(data: Mapping[str, Any], root: Path) -> dict:
    """The one path resolver: every file or folder a recipe names, made absolute against ``root``
    (``~`` expanded): ``base.path``, ``experts[].path``, ``experts[].data``, ``eval.data``,
    ``eval.shots``, ``finetune.data[]`` (a path or ``{path, licence}``) and ``tune.data``."""
    def fix(p: Any) -> Any:
        if not isinstance(p, (str, os.PathLike)):
            return p
        q = Path(os.path.expanduser(str(p)))
        return str(q if q.is_absolute() else root / q)

    def fix_key(section: Any, key: str) -> Any:
        if not isinstance(section, Mapping) or key not in section:
            return section
        value = section[key]
        return {**section, key: [fix(v) for v in value] if isinstance(value, list) else fix(value)}

    def fix_item(item: Any) -> Any:
        return fix_key(item, "path") if isinstance(item, Mapping) else fix(item)

    data = dict(data)
    data["base"] = fix_key(data.get("base"), "path") if "base" in data else None
    if data["base"] is None:
        del data["base"]
    if isinstance(data.get("experts"), list):
        data["experts"] = [fix_key(fix_key(e, "path"), "data") for e in data["experts"]]
    if isinstance(data.get("eval"), Mapping):
        data["eval"] = fix_key(fix_key(data["eval"], "data"), "shots")
    if isinstance(data.get("tune"), Mapping):
        data["tune"] = fix_key(data["tune"], "data")
    ft = data.get("finetune")
    if isinstance(ft, Mapping) and isinstance(ft.get("data"), list):
        data["finetune"] = {**ft, "data": [fix_item(d) for d in ft["data"]]}
    return data
