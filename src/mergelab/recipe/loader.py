"""The one recipe loader: a YAML/JSON file or a mapping → a validated :class:`RecipeFile` with every
section (merge, ``eval:``, ``finetune:``, ``tune:``) and every relative path resolved against the
recipe's folder, by one path resolver."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml
from pydantic import BaseModel, ValidationError

from mergelab.errors import RecipeError
from mergelab.io.jsonfile import clip
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
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = str(path)
        data = _read_file(path)
        root = Path(base_dir) if base_dir is not None else path.parent
    else:
        raise RecipeError(f"a recipe is a file or a mapping, got {clip(source)}")
    root = root.absolute()
    _check_size(data, label)
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise RecipeError(f"{label}: top-level keys are names (base, experts, method, ...), got {clip(bad)}",
                          hint="see docs/recipe.md for the recipe format")
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
    if tune is not None and recipe.slices is not None:
        raise RecipeError(f"{label}: tune: a layer stack (slices) has no merge of experts whose parameters "
                          "could be searched", hint="remove the tune: section; mergelab tune searches the weights, "
                                                    "densities and λ of a merge of experts")
    if finetune is not None and finetune.when == "before_merge" and recipe.slices is not None:
        raise RecipeError(f"{label}: finetune.when: before_merge adds the trained adapter to the merge as an "
                          "expert, and a layer stack (slices) has no experts",
                          hint="use when: after_merge (the adapter is trained on the stacked model)")
    return RecipeFile(recipe=recipe, data=data, root=root, label=label, eval=eval_section,
                      finetune=finetune, tune=tune)


def load_recipe(source: str | os.PathLike | Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> Recipe:
    """The merge part (:class:`Recipe`) of :func:`read_recipe`."""
    return read_recipe(source, base_dir=base_dir).recipe


_MAX_RECIPE_BYTES = 1024 * 1024        # a recipe with per-layer lists is a few KB; YAML reads ~1 MB/s
_MAX_NODES = 100_000                    # values in a recipe, counting each alias use again
_MAX_DEPTH = 40


def _read_file(path: Path) -> dict:
    """The recipe file as a mapping; every problem is one RecipeError that quotes nothing of the file.

    A file that is not a recipe (a wrong path, or a manifest naming another file) must not have
    its content echoed into a message or a log, so the YAML error gives the line, the column and
    the parser's complaint with any quoted text of the file left out.
    """
    try:
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        size = path.stat().st_size
        if size > _MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: is {size:,} bytes; a recipe is at most {_MAX_RECIPE_BYTES:,}",
                              hint="check that this is the recipe file you meant")
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}, line {line})",
                          hint="save the recipe as UTF-8, or check that this is the recipe file you meant") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        pos = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise RecipeError(f"{path}: not valid YAML{pos}: {_unquoted(problem)}",
                          hint="check that this is the recipe file you meant; see docs/recipe.md") from None
    except RecursionError:
        raise RecipeError(f"{path}: nested too deeply to be a recipe") from None
    except Exception:   # noqa: BLE001 — PyYAML's constructors raise ValueError, AttributeError, ... on
        raise RecipeError(f"{path}: not valid YAML: a value cannot be read as the type it is written as "
                          "(an impossible date such as 2024-13-45, or a !!int / !!float / !!timestamp tag on text)",
                          hint="quote the value to keep it as text; see docs/recipe.md") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe is a mapping (base, experts, method, ...), got "
                          f"{'nothing' if data is None else type(data).__name__}",
                          hint="check that this is the recipe file you meant; see docs/recipe.md")
    return dict(data)


def _unquoted(problem: str) -> str:
    """A YAML parser complaint with quoted text of the file (tags, aliases, keys) left out."""
    def keep(m: re.Match) -> str:   # a character ('\\t', ':') or a token name ('<scalar>') is kept
        inner = m.group(0)[1:-1]
        return m.group(0) if len(inner) <= 2 or re.fullmatch(r"<[a-z ]+>", inner) else "'…'"
    return re.sub(r"'[^']*'|\"[^\"]*\"", keep, str(problem))[:200]


def _check_size(data: Any, label: str) -> None:
    """Refuse a recipe whose values, counted as a tree, exceed ``_MAX_NODES`` or nest deeper than
    ``_MAX_DEPTH``: YAML aliases can make a small file name the same list a billion times (or make
    a list contain itself), and every later step walks the tree."""
    count, stack = 0, [(data, 0)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > _MAX_NODES or depth > _MAX_DEPTH:
            what = f"more than {_MAX_NODES:,} values" if count > _MAX_NODES else f"nesting deeper than {_MAX_DEPTH}"
            raise RecipeError(f"{label}: has {what}, counting each use of a YAML alias; "
                              "this is not a recipe mergelab can read", hint="see docs/recipe.md")
        if isinstance(value, Mapping):
            stack.extend((v, depth + 1) for kv in value.items() for v in kv)
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def _validate(data: Mapping[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            value = err.get("input")
            shown = "" if isinstance(value, Mapping) else f" (got {clip(value)})"
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
    (``~`` expanded): ``base.path``, ``experts[].path``, ``experts[].data``, ``slices[].path``,
    ``tokenizer.source`` (when it is an existing path, not ``base``, ``union`` or a Hub id), ``eval.data``,
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
    if isinstance(data.get("slices"), list):
        data["slices"] = [fix_key(s, "path") for s in data["slices"]]
    tok = data.get("tokenizer")
    tok = {"source": tok} if isinstance(tok, str) else tok
    if isinstance(tok, Mapping) and isinstance(tok.get("source"), str) and tok["source"] not in ("base", "union"):
        experts = data.get("experts") if isinstance(data.get("experts"), list) else []
        hub = {str(m["model"]) for m in [data.get("base"), *experts] if isinstance(m, Mapping) and m.get("model")}
        fixed = fix_key(tok, "source")   # a path, relative to the recipe like the experts' (else kept for the error)
        if tok["source"].partition("@")[0] not in hub and Path(fixed["source"]).exists():
            data["tokenizer"] = fixed
    if isinstance(data.get("eval"), Mapping):
        data["eval"] = fix_key(fix_key(data["eval"], "data"), "shots")
    if isinstance(data.get("tune"), Mapping):
        data["tune"] = fix_key(data["tune"], "data")
    ft = data.get("finetune")
    if isinstance(ft, Mapping) and isinstance(ft.get("data"), list):
        data["finetune"] = {**ft, "data": [fix_item(d) for d in ft["data"]]}
    return data
