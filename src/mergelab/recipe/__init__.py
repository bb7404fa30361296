"""The recipe file: what to merge, how, and where the result goes.

A recipe is YAML (or JSON) validated by the pydantic models below; see ``docs/recipe.md``::

    base: {path: ./base}                    # or {model: org/name, revision: <commit>}
    experts:
      - {path: ./expert_a, weight: 1.0, density: 0.5}
      - {path: ./expert_b, weight: 0.7}
    method: {name: ties, density: 0.2, lambda: 1.0}
    output: {dtype: bfloat16}
    seed: 0

A parameter is a scalar, a list spread across the layers (``[0, 0.5, 1]``: the first value at
the first layer, the last at the last, linear in between), or a list of ``{filter, value}``
entries whose first match (substring of the tensor name; no filter = any) applies. A mergekit
YAML config (it has ``merge_method``) is accepted as it is and translated.

A wrong recipe raises :class:`~mergelab.errors.RecipeError` naming the key path
(``experts[1].weight``), the value, and what is expected.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import RecipeError

DTYPES = ("float32", "float16", "bfloat16")
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
}
_MODEL_KEYS = ("path", "model", "revision")


def _fmt_loc(loc: tuple) -> str:
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
        """The local folder: ``path`` itself, or the Hub snapshot via :mod:`mergelab.sources`."""
        if self.path is not None:
            return Path(self.path)
        from mergelab.hub.sources import resolve_model

        return Path(resolve_model(self))

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.model}@{self.revision}" if self.revision else str(self.model)


class ExpertRef(ModelRef):
    """An expert: a :class:`ModelRef` plus its own method parameters (``weight``, ``density``, ...).

    ``data`` (data-aware methods such as ``regmean`` only): CSV file(s) of unlabelled inputs of the
    expert's task (competition format, only the ``input`` column is read), from which the input
    statistics of its linear layers are computed.
    """

    model_config = ConfigDict(frozen=True, extra="allow")

    data: list[Path] | None = None

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
        from mergelab.io.checkpoint import parse_size

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
        from mergelab.io.checkpoint import parse_size

        return parse_size(self.shard_size)

    @property
    def torch_dtype(self):
        import torch

        return None if self.dtype is None else getattr(torch, self.dtype)


class Recipe(BaseModel):
    """A whole recipe. Constructing one checks the method, its parameters and the expert count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: ModelRef
    experts: list[ExpertRef] = Field(min_length=1)
    method: MethodConfig
    output: OutputConfig = OutputConfig()
    seed: int = 0
    eval: dict | None = None

    @model_validator(mode="after")
    def _check_method(self):
        from mergelab.methods import get_method

        try:
            spec = get_method(self.method.name)
        except RecipeError as exc:
            raise RecipeError(f"method.name: {exc.message}", hint=exc.hint) from None
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
                problems.append(f"method.{key}: {spec.name} has no parameter {key!r} (got {value!r}); "
                                f"its parameters: {', '.join(sorted(method_keys)) or 'none'}")
            else:
                problems += check_param(f"method.{key}", key, value)
        for i, e in enumerate(self.experts):
            for key, value in e.params.items():
                if key not in spec.expert_params:
                    known = ", ".join(list(_MODEL_KEYS) + (["data"] if spec.needs_gram else [])
                                      + sorted(spec.expert_params))
                    problems.append(f"experts[{i}].{key}: not a per-expert parameter of {spec.name} "
                                    f"(got {value!r}); allowed keys: {known}")
                else:
                    problems += check_param(f"experts[{i}].{key}", key, value)
        if problems:
            raise RecipeError("; ".join(problems))
        return self


# ---------------------------------------------------------------------------------- parameters


def check_param(where: str, key: str, value: Any) -> list[str]:
    """Problems of one parameter value: a scalar, a list of scalars, or a list of {filter, value}."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        out = []
        for j, entry in enumerate(value):
            extra = set(entry) - {"filter", "value"}
            if extra or "value" not in entry:
                out.append(f"{where}[{j}]: a filtered value is {{filter: <text>, value: <value>}} "
                           f"(got {dict(entry)!r})")
                continue
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                out.append(f"{where}[{j}].filter: expected text (part of a tensor name), got {entry['filter']!r}")
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
                out.append(f"{where}[{j}]: expected a scalar inside a layer list, got {v!r}")
            else:
                out += check_param(f"{where}[{j}]", key, v)
        return out
    if isinstance(value, Mapping):
        return [f"{where}: expected a value, a list across layers, or a list of {{filter, value}} "
                f"(got {dict(value)!r})"]
    kind, lo, hi = PARAM_RULES.get(key, (None, None, None))
    if kind is None:
        return [] if isinstance(value, (bool, int, float, str)) else [f"{where}: unsupported value {value!r}"]
    if kind == _BOOL:
        return [] if isinstance(value, bool) else [f"{where}: expected true or false, got {value!r}"]
    number = _as_number(value)
    if number is None or (kind == _INT and not float(number).is_integer()):
        return [f"{where}: expected {kind}, got {value!r}"]
    if (lo is not None and number < lo) or (hi is not None and number > hi):
        rng = f"between {lo:g} and {hi:g}" if lo is not None and hi is not None else \
            f"at least {lo:g}" if lo is not None else f"at most {hi:g}"
        return [f"{where}: expected {kind} {rng}, got {value!r}"]
    return []


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):  # YAML reads 1e-3 as text; mergekit accepts it, so do we
        try:
            v = float(value)
        except ValueError:
            return None
        return v if math.isfinite(v) else None
    return None


def evaluate_param(value: Any, tensor_name: str, t: float) -> Any:
    """Resolve one parameter for one tensor at layer position ``t`` ∈ [0, 1] (None: no filter matched).

    A list of numbers is interpolated linearly at ``t``; a list of other scalars picks
    ``value[int(t·(n−1))]``; a list of ``{filter, value}`` takes the first entry whose filter is
    absent, ``"*"``, or a substring of ``tensor_name``.
    """
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for entry in value:
            f = entry.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate_param(entry["value"], tensor_name, t)
        return None
    if isinstance(value, list):
        nums = [_as_number(v) for v in value]
        if any(n is None for n in nums):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(nums) - 1)
        i0 = int(scaled)
        i1 = min(len(nums) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * nums[i0] + frac * nums[i1]
    if isinstance(value, str) and _as_number(value) is not None:
        return _as_number(value)
    return value


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|block|blocks)\.(\d+)\.")


def layer_of(tensor_name: str) -> tuple[str, int] | None:
    """``("model", 3)`` for ``model.layers.3.mlp.up_proj.weight``; None for a non-layer tensor.

    The first part is the layer stack's prefix (``encoder``/``decoder`` for T5), so stacks of
    different depth are told apart.
    """
    m = _LAYER_RE.search(tensor_name)
    if m is None:
        return None
    return tensor_name[: m.start()], int(m.group(1))


def layer_depths(names) -> dict[str, int]:
    """``{layer-stack prefix: number of layers}`` over tensor names (see :func:`layer_of`)."""
    depth: dict[str, int] = {}
    for n in names:
        loc = layer_of(n)
        if loc is not None:
            depth[loc[0]] = max(depth.get(loc[0], 0), loc[1] + 1)
    return depth


def layer_position(tensor_name: str, num_layers: int) -> float:
    """``t`` for layer-list interpolation: layer ``i`` of ``L`` → ``i/(L−1)`` (1 if ``L`` = 1).

    Tensors outside the layer stack (embeddings, final norm, head) get ``t = 0``, as in mergekit.
    """
    loc = layer_of(tensor_name)
    if loc is None:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return min(1.0, max(0.0, loc[1] / (num_layers - 1)))


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A 63-bit seed from (recipe seed, tensor name), stable across runs, machines and orders."""
    digest = hashlib.sha256(f"{int(seed)}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_params(recipe: Recipe, tensor_name: str, num_layers: int):
    """The :class:`~mergelab.methods.MethodParams` of one tensor.

    Layer lists are evaluated at the tensor's layer position, filters against its name; the
    generator (CPU) is seeded from ``(recipe.seed, tensor_name)``, so random methods give the
    same bytes whatever the order, thread or device. Parameters that resolve to nothing (no
    filter matched) are left out, so the method's default applies.
    """
    import torch

    from mergelab.methods import MethodParams

    t = layer_position(tensor_name, num_layers)

    def resolve(params: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in params.items():
            v = evaluate_param(value, tensor_name, t)
            if v is not None:
                out[key] = v
        return out

    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(recipe.seed, tensor_name))
    return MethodParams(globals=resolve(recipe.method.params),
                        experts=[resolve(e.params) for e in recipe.experts], generator=gen)


# ------------------------------------------------------------------------------------- loading


def load_recipe(source: str | os.PathLike | Mapping[str, Any], *, base_dir: str | os.PathLike | None = None) -> Recipe:
    """Read and validate a recipe from a YAML/JSON file or a dict.

    Accepts mergelab recipes and mergekit YAML configs (detected by ``merge_method``). Relative
    model paths resolve against the recipe file's folder (or ``base_dir`` for a dict, else the
    current folder).
    """
    import yaml

    label = "recipe"
    if isinstance(source, Mapping):
        data = dict(source)
        root = Path(base_dir) if base_dir is not None else Path.cwd()
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            pos = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
            raise RecipeError(f"{path}: not valid YAML{pos}: {getattr(exc, 'problem', exc)}") from None
        root = Path(base_dir) if base_dir is not None else path.parent
        if not isinstance(data, Mapping):
            raise RecipeError(f"{path}: a recipe is a mapping (base, experts, method, ...), got {type(data).__name__}")
    try:
        if "merge_method" in data:
            data = from_mergekit(data, root)
        data = _absolute_paths(data, root)
        return Recipe.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            value = err.get("input")
            shown = "" if isinstance(value, Mapping) else f" (got {value!r})"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key; allowed here: {', '.join(_allowed_keys(err['loc']))}"
            lines.append(f"{_fmt_loc(err['loc'])}: {msg}{shown}")
        raise RecipeError(f"{label}: " + "; ".join(lines),
                          hint="see docs/recipe.md for the recipe format") from None
    except RecipeError as exc:
        raise RecipeError(f"{label}: {exc.message}", hint=exc.hint) from None


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
    return list(model.model_fields)


def _absolute_paths(data: Mapping[str, Any], root: Path) -> dict:
    data = dict(data)

    def fix(ref: Any) -> Any:
        if isinstance(ref, Mapping) and isinstance(ref.get("path"), (str, os.PathLike)):
            p = Path(os.path.expanduser(str(ref["path"])))
            return {**ref, "path": p if p.is_absolute() else (root / p)}
        return ref

    def fix_data(ref: Any) -> Any:
        files = ref.get("data") if isinstance(ref, Mapping) else None
        if isinstance(files, (str, os.PathLike)):
            files = [files]
        if not isinstance(files, list):
            return ref
        out = [Path(os.path.expanduser(str(f))) if isinstance(f, (str, os.PathLike)) else f for f in files]
        return {**ref, "data": [f if not isinstance(f, Path) or f.is_absolute() else root / f for f in out]}

    if isinstance(data.get("eval"), Mapping) and isinstance(data["eval"].get("shots"), (str, os.PathLike)):
        shots = Path(os.path.expanduser(str(data["eval"]["shots"])))
        data["eval"] = {**data["eval"], "shots": str(shots if shots.is_absolute() else root / shots)}
    if "base" in data:
        data["base"] = fix(data["base"])
    if isinstance(data.get("experts"), list):
        data["experts"] = [fix_data(fix(e)) for e in data["experts"]]
    return data


# ------------------------------------------------------------------------------------ mergekit

MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear", "model_stock", "slerp")
_MERGEKIT_IGNORED = {"int8_mask"}


def from_mergekit(cfg: Mapping[str, Any], root: Path) -> dict:
    """Translate a mergekit YAML config (0.1.x) into a mergelab recipe dict.

    Supported: ``merge_method`` (the methods above), ``base_model``, ``models`` (each with
    ``parameters``), one full-depth ``slices`` entry (the usual SLERP form), global
    ``parameters`` (scalars, layer lists, filters), ``dtype``/``out_dtype`` (the output dtype;
    mergelab always computes in float32), ``tokenizer_source: base``. Anything else is refused
    with a RecipeError that says what is not supported.
    """
    def fail(key: str, why: str, hint: str | None = None):
        raise RecipeError(f"mergekit config: {key}: {why}", hint=hint)

    method = cfg.get("merge_method")
    if method not in MERGEKIT_METHODS:
        fail("merge_method", f"{method!r} is not supported by mergelab",
             hint=f"supported mergekit methods: {', '.join(MERGEKIT_METHODS)}")
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name", "seed"}
    for key in cfg:
        if key not in known:
            fail(key, "is not supported by mergelab's mergekit import",
                 hint="write a mergelab recipe instead (docs/recipe.md)" if key == "modules" else None)
    tok = cfg.get("tokenizer_source")
    if tok not in (None, "base") or cfg.get("tokenizer") is not None:
        fail("tokenizer_source", "only the base model's tokenizer is supported (tokenizer_source: base)")
    if cfg.get("chat_template") is not None:
        fail("chat_template", "is not supported; the base model's chat template is copied")

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
            fail(f"models[{i}]", f"expected {{model: ..., parameters: ...}}, got {m!r}")
        extra = set(m) - {"model", "parameters"}
        if extra:
            fail(f"models[{i}]", f"unsupported key(s) {sorted(extra)}")
        entries.append((_mergekit_ref(m["model"], root, f"models[{i}].model"), dict(m.get("parameters") or {})))

    base_ref = _mergekit_ref(cfg["base_model"], root, "base_model") if cfg.get("base_model") else None
    experts = [(ref, params) for ref, params in entries if ref != base_ref]
    if base_ref is None:
        if method != "linear":
            fail("base_model", f"{method} needs a base_model")
        base_ref = entries[0][0]  # mergekit takes config and tokenizer from the first model
        experts = entries
    elif method == "linear" and len(experts) == len(entries):
        # mergekit adds a base_model that is not among `models` to the average as one more input
        experts = entries + [(base_ref, {})]
    elif method == "linear":
        experts = entries  # the base is one of the averaged models, with its own weight

    global_params = {k: v for k, v in (cfg.get("parameters") or {}).items() if k not in _MERGEKIT_IGNORED}
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    out: dict[str, Any] = {
        "base": base_ref,
        "experts": [{**ref, **{k: v for k, v in params.items() if k not in _MERGEKIT_IGNORED}}
                    for ref, params in experts],
        "method": {"name": method, **global_params},
    }
    if dtype is not None:
        out["output"] = {"dtype": dtype}
    if cfg.get("seed") is not None:
        out["seed"] = cfg["seed"]
    return out


def _mergekit_ref(value: Any, root: Path, where: str) -> dict:
    if isinstance(value, Mapping):  # the long form {model: {path: ..., revision: ...}, lora: ...}
        if value.get("lora"):
            raise RecipeError(f"mergekit config: {where}: `model+lora` references are not supported",
                              hint="list the LoRA adapter folder itself as an expert")
        inner = value.get("model", value)
        if isinstance(inner, Mapping):
            value = inner.get("path")
            if inner.get("revision"):
                value = f"{value}@{inner['revision']}"
    if not isinstance(value, str) or not value:
        raise RecipeError(f"mergekit config: {where}: expected a model path or Hub id, got {value!r}")
    if "+" in value:
        raise RecipeError(f"mergekit config: {where}: `model+lora` references are not supported "
                          f"(got {value!r})", hint="list the LoRA adapter folder itself as an expert")
    local = Path(os.path.expanduser(value))
    if not local.is_absolute():
        local = root / local
    if local.exists():
        return {"path": os.path.normpath(local)}
    name, _, revision = value.partition("@")
    if value.startswith((".", "/", "~")) or name.count("/") != 1:
        raise RecipeError(f"mergekit config: {where}: {value!r} is neither an existing folder nor a "
                          "Hub repo id (org/name)")
    return {"model": name, "revision": revision or None}


def _mergekit_slices(slices: Any, root: Path) -> list:
    if not isinstance(slices, list) or len(slices) != 1:
        raise RecipeError("mergekit config: slices: only one slice spanning all layers is supported",
                          hint="layer stacking (frankenmerges) is not a merge mergelab does")
    s = slices[0]
    if not isinstance(s, Mapping) or set(s) - {"sources"} or not isinstance(s.get("sources"), list):
        raise RecipeError("mergekit config: slices[0]: expected {sources: [...]} (slice-level "
                          "base_model/parameters are not supported)")
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
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("num_hidden_layers", "num_layers", "n_layer"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None
