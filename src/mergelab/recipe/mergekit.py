"""mergekit YAML configs translated into mergelab recipes (``merge_method``, ``models``, ``slices``...)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from mergelab.errors import RecipeError
from mergelab.io.jsonfile import clip, read_json


MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp",
                    "karcher", "nuslerp", "multislerp", "sce", "nearswap", "passthrough")


_MERGEKIT_IGNORED = {"int8_mask"}
_HINT = "see docs/recipe.md (mergekit configs) for what mergelab accepts"
#: per-model parameters that mergekit 0.1.5 accepts and ignores for a method (dropped here)
_MERGEKIT_IGNORED_BY_METHOD = {"karcher": {"weight"}, "sce": {"weight"}}
#: methods whose base_model, if any, is one more averaged input (mergekit ignores the base role)
_BASE_IS_AN_INPUT = ("linear", "karcher")
#: methods that interpolate the models themselves when there is no base_model (`use_base: false`)
_BASE_OPTIONAL = ("nuslerp", "multislerp")


def from_mergekit(cfg: Mapping[str, Any], root: Path) -> dict:
    """Translate a mergekit YAML config (0.1.x) into a mergelab recipe dict.

    Supported: ``merge_method`` (the methods above), ``base_model``, ``models`` (each with
    ``parameters``), one full-depth ``slices`` entry (the usual SLERP form), layer stacking
    (``passthrough`` with one source per slice: :func:`_mergekit_stack`), global
    ``parameters`` (scalars, layer lists, filters), ``dtype``/``out_dtype`` (the output dtype;
    mergelab always computes in float32), ``tokenizer_source`` / ``tokenizer.source`` (``base``, ``union`` or a model). Anything else is refused
    with a RecipeError that says what is not supported.
    """
    def fail(key: str, why: str, hint: str | None = None):
        raise RecipeError(f"mergekit config: {key}: {why}", hint=hint or _HINT)

    method = cfg.get("merge_method")
    if not isinstance(method, str) or method not in MERGEKIT_METHODS:
        fail("merge_method", f"{clip(method)} is not supported by mergelab",
             hint=f"supported mergekit methods: {', '.join(MERGEKIT_METHODS)}")
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name", "seed"}
    for key in cfg:
        if key not in known:
            fail(clip(key) if not isinstance(key, str) else key[:60], "is not supported by mergelab's mergekit import",
                 hint="write a mergelab recipe instead (docs/recipe.md)" if key == "modules" else None)
    if cfg.get("chat_template") is not None:
        fail("chat_template", "is not supported; the base model's chat template is copied")

    if method == "passthrough":
        return _with_tokenizer(_mergekit_stack(cfg, root), cfg, root)
    models = cfg.get("models")
    if cfg.get("slices") is not None:
        if models is not None:
            fail("slices", "give either `models` or `slices`, not both")
        models = _mergekit_slices(cfg["slices"], root)
    if not isinstance(models, list) or not models:
        fail("models", "expected a list of models")
    entries = []
    for i, m in enumerate(models):
        if isinstance(m, (str, Mapping)) and not (isinstance(m, Mapping) and "model" in m):
            m = {"model": m}
        if not isinstance(m, Mapping):
            fail(f"models[{i}]", f"expected {{model: ..., parameters: ...}}, got {clip(m)}")
        extra = set(m) - {"model", "parameters"}
        if extra:
            fail(f"models[{i}]", f"unsupported key(s) {clip(sorted(map(str, extra)))}")
        entries.append((_mergekit_ref(m["model"], root, f"models[{i}].model"),
                        _params(m.get("parameters"), f"models[{i}].parameters")))

    base_ref = _mergekit_ref(cfg["base_model"], root, "base_model") if cfg.get("base_model") else None
    experts = [(ref, params) for ref, params in entries if ref != base_ref]
    global_params = {k: v for k, v in _params(cfg.get("parameters"), "parameters").items()
                     if k not in _MERGEKIT_IGNORED}
    if base_ref is None:
        if method not in _BASE_IS_AN_INPUT + _BASE_OPTIONAL:
            fail("base_model", f"{method} needs a base_model")
        base_ref = entries[0][0]  # mergekit takes config and tokenizer from the first model
        experts = entries
        if method in _BASE_OPTIONAL:
            global_params["use_base"] = False
    elif method in _BASE_IS_AN_INPUT and len(experts) == len(entries):
        # mergekit adds a base_model that is not among `models` to the average as one more input
        experts = entries + [(base_ref, {})]
    elif method in _BASE_IS_AN_INPUT:
        experts = entries  # the base is one of the averaged models, with its own weight

    ignored = _MERGEKIT_IGNORED | _MERGEKIT_IGNORED_BY_METHOD.get(method, set())
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    out: dict[str, Any] = {
        "base": base_ref,
        "experts": [{**ref, **{k: v for k, v in params.items() if k not in ignored}}
                    for ref, params in experts],
        "method": {"name": method, **global_params},
    }
    if dtype is not None:
        out["output"] = {"dtype": dtype}
    if cfg.get("seed") is not None:
        out["seed"] = cfg["seed"]
    return _with_tokenizer(out, cfg, root)


def _with_tokenizer(recipe: dict, cfg: Mapping[str, Any], root: Path) -> dict:
    """``tokenizer_source: X`` (or ``tokenizer: {source: X}``, whose default is ``union``) as the
    recipe's ``tokenizer: {source: ...}``: ``base``, ``union``, or the path / Hub id of the model X."""
    def fail(key: str, why: str, hint: str | None = None):
        raise RecipeError(f"mergekit config: {key}: {why}", hint=hint or _HINT)

    block, where = cfg.get("tokenizer"), "tokenizer_source"
    source = cfg.get("tokenizer_source")
    if block is not None:
        if source is not None:
            fail("tokenizer", "give either `tokenizer_source` or `tokenizer`, not both")
        if not isinstance(block, Mapping):
            fail("tokenizer", f"expected {{source: base | union | <model>}}, got {clip(block)}")
        extra = sorted(str(k) for k, v in block.items() if k != "source" and v is not None)
        if extra:
            fail("tokenizer", f"{clip(extra)} not supported: mergelab fills the rows a model lacks by its own rule "
                              "(docs/recipe.md, tokenizers)", hint="keep only tokenizer.source")
        source, where = block.get("source", "union"), "tokenizer.source"
    if source is None:
        return recipe
    if source not in ("base", "union"):
        ref = _mergekit_ref(source, root, where)
        source = ref.get("path") or (f"{ref['model']}@{ref['revision']}" if ref.get("revision") else ref["model"])
        if ref == recipe.get("base"):
            source = "base"
    return {**recipe, "tokenizer": {"source": source}}


def _mergekit_stack(cfg: Mapping[str, Any], root: Path) -> dict:
    """``merge_method: passthrough``: each slice's one source becomes a slice of the recipe, its
    ``parameters`` (over the slice's) the slice's own; ``base_model`` (else the first slice's
    model, as in mergekit) gives config and tokenizer."""
    def fail(where: str, why: str, hint: str | None = None):
        raise RecipeError(f"mergekit config: {where}: {why}", hint=hint or _HINT)

    if cfg.get("models") is not None:
        fail("models", "passthrough stacks layer ranges listed under `slices`, not `models`",
             hint="write slices: [{sources: [{model: ..., layer_range: [start, end]}]}, ...] (docs/recipe.md)")
    slices = cfg.get("slices")
    if not isinstance(slices, list) or not slices:
        fail("slices", f"expected a list of {{sources: [{{model: ..., layer_range: [start, end]}}]}}, got {clip(slices)}")
    out = []
    for i, s in enumerate(slices):
        if not isinstance(s, Mapping) or not isinstance(s.get("sources"), list) or not s["sources"]:
            fail(f"slices[{i}]", f"expected {{sources: [{{model: ..., layer_range: [start, end]}}]}}, got {clip(s)}")
        extra = set(s) - {"sources", "parameters"}
        if extra:
            fail(f"slices[{i}]", f"unsupported key(s) {clip(sorted(map(str, extra)))}")
        if len(s["sources"]) != 1:
            fail(f"slices[{i}].sources", f"passthrough copies the layers of one model per slice, got "
                 f"{len(s['sources'])} sources",
                 hint="give each slice one source (mergekit refuses several too); mergelab does not merge models "
                      "inside a slice")
        src = s["sources"][0]
        where = f"slices[{i}].sources[0]"
        if not isinstance(src, Mapping) or "model" not in src:
            fail(where, f"expected {{model: ..., layer_range: [start, end]}}, got {clip(src)}")
        extra = set(src) - {"model", "layer_range", "parameters"}
        if extra:
            fail(where, f"unsupported key(s) {clip(sorted(map(str, extra)))}")
        rng = src.get("layer_range")
        if not isinstance(rng, list) or len(rng) != 2 or not all(type(x) is int for x in rng):
            fail(f"{where}.layer_range", f"expected [start, end], two whole numbers, got {clip(rng)}")
        params = {**_params(s.get("parameters"), f"slices[{i}].parameters"),
                  **_params(src.get("parameters"), f"{where}.parameters")}
        out.append({**_mergekit_ref(src["model"], root, f"{where}.model"), "layer_range": list(rng), **params})
    global_params = {k: v for k, v in _params(cfg.get("parameters"), "parameters").items()
                     if k not in _MERGEKIT_IGNORED}
    recipe: dict[str, Any] = {"method": {"name": "passthrough", **global_params}, "slices": out}
    if cfg.get("base_model"):
        recipe["base"] = _mergekit_ref(cfg["base_model"], root, "base_model")
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype is not None:
        recipe["output"] = {"dtype": dtype}
    if cfg.get("seed") is not None:
        recipe["seed"] = cfg["seed"]
    return recipe


def _params(value: Any, where: str) -> dict:
    """A ``parameters:`` mapping of parameter names (text) to values; nothing given is {}."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"mergekit config: {where}: expected a mapping of parameter names to values "
                          f"(e.g. {{weight: 0.5, density: 0.5}}), got {clip(value)}", hint=_HINT)
    bad = next((k for k in value if not isinstance(k, str)), None)
    if bad is not None:
        raise RecipeError(f"mergekit config: {where}: parameter names are text, got {clip(bad)}", hint=_HINT)
    return dict(value)


def _mergekit_ref(value: Any, root: Path, where: str) -> dict:
    if isinstance(value, Mapping):  # the long form {model: {path: ..., revision: ...}, lora: ...}
        if value.get("lora"):
            raise RecipeError(f"mergekit config: {where}: `model+lora` references are not supported",
                              hint="list the LoRA adapter folder itself as an expert")
        inner = value.get("model", value)
        if isinstance(inner, Mapping):
            value, revision = inner.get("path"), inner.get("revision")
            if revision is not None and not isinstance(revision, str):
                raise RecipeError(f"mergekit config: {where}.revision: expected a branch, tag or commit, "
                                  f"got {clip(revision)}", hint=_HINT)
            if revision and isinstance(value, str):
                value = f"{value}@{revision}"
    if not isinstance(value, str) or not value:
        raise RecipeError(f"mergekit config: {where}: expected a model path or Hub id, got {clip(value)}",
                          hint=_HINT)
    if "+" in value:
        raise RecipeError(f"mergekit config: {where}: `model+lora` references are not supported "
                          f"(got {clip(value)})", hint="list the LoRA adapter folder itself as an expert")
    local = Path(os.path.expanduser(value))
    if not local.is_absolute():
        local = root / local
    if local.exists():
        return {"path": os.path.normpath(local)}
    name, _, revision = value.partition("@")
    if value.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(f"mergekit config: {where}: {clip(value)} is neither an existing folder nor a "
                          "Hub repo id (org/name)")
    return {"model": name, "revision": revision or None}


def _mergekit_slices(slices: Any, root: Path) -> list:
    if not isinstance(slices, list) or len(slices) != 1:
        raise RecipeError("mergekit config: slices: only one slice spanning all layers is supported (mergelab "
                          "does not merge models slice by slice)",
                          hint="layer stacking is merge_method: passthrough with one source per slice")
    s = slices[0]
    if not isinstance(s, Mapping) or set(s) - {"sources"} or not isinstance(s.get("sources"), list) \
            or not s["sources"]:
        raise RecipeError("mergekit config: slices[0]: expected {sources: [...]} (slice-level "
                          "base_model/parameters are not supported)", hint=_HINT)
    for i, src in enumerate(s["sources"]):
        where = f"mergekit config: slices[0].sources[{i}]"
        if not isinstance(src, Mapping) or "model" not in src:
            raise RecipeError(f"{where}: expected {{model: ..., layer_range: [0, N], parameters: ...}}, "
                              f"got {clip(src)}", hint=_HINT)
        extra = set(src) - {"model", "layer_range", "parameters"}
        if extra:
            raise RecipeError(f"{where}: unsupported key(s) {clip(sorted(map(str, extra)))}", hint=_HINT)
        rng = src.get("layer_range")
        if rng is not None and (not isinstance(rng, list) or len(rng) != 2
                                or not all(type(x) is int for x in rng)):
            raise RecipeError(f"{where}.layer_range: expected [0, number of layers], got {clip(rng)}", hint=_HINT)
    ranges = {tuple(src.get("layer_range") or ()) for src in s["sources"]}
    if len(ranges) != 1:
        raise RecipeError(f"mergekit config: slices[0]: all sources must use the same layer_range, got {sorted(ranges)}")
    (rng,) = ranges
    if len(rng) != 2 or rng[0] != 0:
        raise RecipeError(f"mergekit config: slices[0].sources: layer_range must be [0, number of layers], got {list(rng)}")
    for i, src in enumerate(s["sources"]):
        ref = _mergekit_ref(src.get("model"), root, f"slices[0].sources[{i}].model")
        if "path" in ref:
            layers = _num_layers_of(Path(ref["path"]))
            if layers is not None and layers != rng[1]:
                raise RecipeError(f"mergekit config: slices[0].sources[{i}]: layer_range {list(rng)} does not "
                                  f"span the model's {layers} layers; partial slices are not supported")
    return [{"model": src["model"], "parameters": src.get("parameters")} for src in s["sources"]]


def _num_layers_of(folder: Path) -> int | None:
    try:
        cfg = read_json(folder / "config.json")
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(cfg, dict) and type(cfg.get(key)) is int:
            return cfg[key]
    return None
