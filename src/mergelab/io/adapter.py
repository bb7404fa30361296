"""PEFT LoRA adapters as low-rank factors: reading, ΔW, the LoRA expert source, writing.

A LoRA adapter changes a weight matrix ``W`` (as stored in the base checkpoint) by

    ΔW = scale · B @ A,    scale = alpha / r   (alpha / sqrt(r) with rsLoRA)

with ``A`` of shape (r, in) and ``B`` of shape (out, r) — transposed for GPT-2-style ``Conv1D``
layers (``fan_in_fan_out``) and for embeddings, whose weights are stored (in, out). Per-module
``r`` and ``alpha`` come from ``rank_pattern`` / ``alpha_pattern`` when the module matches one, as
PEFT does it.

This module turns an adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) into
:class:`~mergelab.methods.lowrank.LowRank` factors named by the *base checkpoint's* tensor names
(``model.layers.3.self_attn.q_proj.weight``, ``encoder.block.0.layer.0.SelfAttention.q.weight``),
with the scale folded in, so that ``ΔW = factors.B @ factors.A`` is exactly what PEFT's
``merge_and_unload`` adds to that tensor. On top of that:

* :func:`open_lora_expert` — a :class:`~mergelab.io.checkpoint.TensorSource` over the base's tensor
  names that yields ``base + ΔW``; this is how every engine method works on LoRA experts.
* :func:`write_adapter` — one PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

Variants whose effect is not ``base + ΔW`` with ``ΔW = scale · B @ A`` (DoRA, trained biases,
``modules_to_save``, PiSSA-style initialisations that change the base, convolutional LoRA, ...)
raise :class:`~mergelab.errors.AdapterError` saying what and what to do, never a wrong merge.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from mergelab.errors import AdapterError
from mergelab.methods.lowrank import LowRank
from mergelab.io.checkpoint import CheckpointReader
from mergelab.io.jsonfile import clip, read_json
from mergelab.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."

#: module kinds: how PEFT's A/B relate to the checkpoint tensor
LINEAR = "linear"          # W (out, in):  ΔW = s · B @ A
LINEAR_T = "linear_t"      # W (in, out), GPT-2 Conv1D with fan_in_fan_out: ΔW = (s · B @ A)ᵀ
EMBEDDING = "embedding"    # W (vocab, dim): ΔW = (s · B_e @ A_e)ᵀ, keys lora_embedding_A/B

_MAX_CONFIG = 16 * 1024 * 1024   # bytes of adapter_config.json (PEFT's are about 1 KB)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_FOLD_HINT = ("fold it into a full model with PEFT (PeftModel.from_pretrained(base, adapter)"
              ".merge_and_unload().save_pretrained(dir)) and use that folder as a full expert "
              "(output format full)")


def _rank(value: object) -> int | None:
    """A LoRA rank (a whole number ≥ 1; 8.0 counts), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 1 <= value < 2**31 else None


def _number(value: object) -> float | None:
    """A finite number as float (alpha), or None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:   # an int too large for a float
        return None
    return number if math.isfinite(number) else None


def is_adapter_dir(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a PEFT adapter (``adapter_config.json``)."""
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


# ------------------------------------------------------------------------------------ low rank


# ------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class AdapterModule:
    """One adapted module of an adapter, as stored."""

    path: str            # PEFT module path, e.g. "model.layers.0.self_attn.q_proj"
    kind: str            # LINEAR, LINEAR_T or EMBEDDING
    key_a: str           # safetensors key of A (lora_A / lora_embedding_A)
    key_b: str
    rank: int
    alpha: float
    scale: float
    shape: tuple[int, int]   # ΔW shape in the checkpoint's orientation


_KEY = re.compile(
    r"^(?P<path>.+?)\.(?:"
    r"lora_(?P<ab>[AB])(?:\.(?P<name1>[^.]+))?\.weight"
    r"|lora_embedding_(?P<eab>[AB])(?:\.(?P<name2>[^.]+))?"
    r")$")

_COPY = re.compile(r"^(?P<path>.+?)(?:\.base_layer)?\.weight$")

#: config fields of LoRA variants whose effect is not base + scale · B @ A
_VARIANTS = {
    "use_dora": ("DoRA (use_dora: true)", "its magnitude vector rescales every column of the "
                 "adapted weight, so the change is not a low-rank ΔW"),
    "lora_bias": ("a trained LoRA bias (lora_bias: true)", "the bias change is not part of ΔW"),
    "modules_to_save": ("modules_to_save", "those modules are stored as whole trained copies, "
                        "not as LoRA factors"),
    "trainable_token_indices": ("trainable tokens (trainable_token_indices)",
                                "those embedding rows are stored as trained copies"),
    "layer_replication": ("layer_replication", "it changes the model's layer structure"),
    "alora_invocation_tokens": ("activated LoRA (alora_invocation_tokens)",
                                "it applies only after its invocation tokens, so it cannot be "
                                "folded into the weights"),
    "use_qalora": ("QA-LoRA (use_qalora: true)", "its A acts on pooled input groups"),
    "target_parameters": ("LoRA on parameters (target_parameters)",
                          "mergelab merges LoRA on Linear and Embedding layers"),
    "megatron_config": ("Megatron-parallel LoRA (megatron_config)", "its layers are sharded"),
    "velora_config": ("VeLoRA (velora_config)", "it is not plain LoRA"),
    "kasa_config": ("KaSA (kasa_config)", "it is not plain LoRA"),
    "monteclora_config": ("MonteCLoRA (monteclora_config)", "it is not plain LoRA"),
    "use_bdlora": ("BD-LoRA (use_bdlora)", "it is not plain LoRA"),
    "arrow_config": ("Arrow routing (arrow_config)", "it routes between adapters at run time"),
}
#: init_lora_weights values that change the base weights while training (the adapter is relative
#: to a modified base unless converted with path_initial_model_for_weight_conversion)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


def _pattern_value(patterns: list[tuple[re.Pattern, object]], module_path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the path."""
    for pattern, value in patterns:
        if pattern.match(module_path):
            return value
    return default


_MAX_PATTERN = 200
_MAX_QUANTIFIERS = 3


def _pattern_problem(key: str) -> str | None:
    """Why a rank_pattern / alpha_pattern key cannot be used, or None.

    PEFT treats each key as a regular expression matched against the end of a module path. A key
    is refused when it does not compile, or when matching it could take exponential or high
    polynomial time (a repeated group such as ``(a+)+``, or more than three repetitions): the
    keys PEFT writes are plain module paths, and people write ``q_proj`` or ``layers.*.q_proj``.
    """
    if len(key) > _MAX_PATTERN:
        return f"is longer than {_MAX_PATTERN} characters"
    try:
        re.compile(key)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        return f"is not a regular expression ({exc})"
    i, n, quantifiers, after_group = 0, len(key), 0, False
    while i < n:
        c = key[i]
        if c == "\\":
            i, after_group = i + 2, False
        elif c == "[":   # a character class: skip to its end
            j = i + 1 + (key[i + 1:i + 2] == "^")
            j += key[j:j + 1] == "]"
            while j < n and key[j] != "]":
                j += 2 if key[j] == "\\" else 1
            i, after_group = j + 1, False
        elif c == "(":
            i, after_group = i + (2 if key[i + 1:i + 2] == "?" else 1), False
        elif c == ")":
            i, after_group = i + 1, True
        elif c in "*+" or (c == "{" and re.match(r"\{\d*(,\d*)?\}", key[i:])):
            if after_group:
                return "repeats a group, which can take exponential time to match"
            quantifiers += 1
            if quantifiers > _MAX_QUANTIFIERS:
                return f"has more than {_MAX_QUANTIFIERS} repetitions (*, +, {{m,n}})"
            i = key.index("}", i) + 1 if c == "{" else i + 1
            i += key[i:i + 1] in ("?", "+")   # lazy or possessive
        else:
            i, after_group = i + 1, False
    return None


class LoraAdapter:
    """A PEFT LoRA adapter folder, validated; tensors are read lazily per module.

    ``modules`` maps each PEFT module path (``model.layers.0.self_attn.q_proj``) to its
    :class:`AdapterModule`. :meth:`factors` / :meth:`delta` read one module's A and B.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config = self._read_config()
        self.base_model_name_or_path: str | None = self.config.get("base_model_name_or_path")
        self.task_type: str | None = self.config.get("task_type")
        self._check_variants()
        self.weights_file = self._weights_file()

        try:
            self._reader = CheckpointReader(self.weights_file)
        except CheckpointError as exc:  # re-labelled as an adapter problem
            raise AdapterError(exc.message, hint="re-download or re-save the adapter") from None
        self.modules: dict[str, AdapterModule] = self._parse_modules(self._reader)

    # --- config
    def _read_config(self) -> dict:
        f = self.path / ADAPTER_CONFIG
        if not f.is_file():
            raise AdapterError(f"{self.path}: no {ADAPTER_CONFIG}; not a PEFT adapter folder",
                               hint="point the expert at a folder saved by PeftModel.save_pretrained")
        try:
            cfg = read_json(f, max_bytes=_MAX_CONFIG)
        except (OSError, ValueError) as exc:
            raise AdapterError(f"{f}: cannot be read as an adapter config ({exc})",
                               hint="re-save the adapter with PEFT (save_pretrained)") from None
        if not isinstance(cfg, dict):
            raise AdapterError(f"{f}: an adapter config is a JSON object, got a JSON {type(cfg).__name__}",
                               hint="re-save the adapter with PEFT (save_pretrained)")
        return cfg

    def _fail(self, what: str, why: str, hint: str | None = None) -> AdapterError:
        return AdapterError(f"{self.path}: {what} is not supported: {why}", hint=hint or _FOLD_HINT)

    def _check_variants(self) -> None:
        cfg = self.config
        peft_type = cfg.get("peft_type", "LORA")
        if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
            raise AdapterError(
                f"{self.path}: is a {peft_type[:60] if isinstance(peft_type, str) else clip(peft_type)} adapter; mergelab merges LoRA adapters only",
                hint=_FOLD_HINT)
        for key, (what, why) in _VARIANTS.items():
            value = cfg.get(key)
            if value not in (None, False, [], {}, ""):
                raise self._fail(what, why)
        bias = cfg.get("bias", "none")
        if bias not in (None, "none"):
            raise self._fail(f"bias training (bias: {clip(bias)})",
                             "the trained biases are stored beside the LoRA factors and are not part of ΔW")
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise self._fail(
                f"init_lora_weights: {clip(init)}",
                "this initialisation changes the base weights during training, so the adapter is "
                "relative to a modified base",
                hint="re-save it with PEFT's save_pretrained(..., "
                     "path_initial_model_for_weight_conversion=...) to get a plain LoRA adapter")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """r, lora_alpha, the patterns and the switches: their types and ranges, before any use."""
        cfg, where = self.config, self.path / ADAPTER_CONFIG
        hint = "adapter_config.json is damaged or hand-edited; re-save the adapter with PEFT"

        def bad(key: str, why: str) -> AdapterError:
            return AdapterError(f"{where}: {key} {why}", hint=hint)

        if "r" in cfg and _rank(cfg["r"]) is None:
            raise bad("r", f"must be a whole number ≥ 1 (the LoRA rank), got {clip(cfg['r'])}")
        if "lora_alpha" in cfg and _number(cfg["lora_alpha"]) is None:
            raise bad("lora_alpha", f"must be a finite number, got {clip(cfg['lora_alpha'])}")
        for key in ("use_rslora", "fan_in_fan_out", "inference_mode"):
            if cfg.get(key) is not None and not isinstance(cfg[key], bool):
                raise bad(key, f"must be true or false, got {clip(cfg[key])}")
        for key in ("base_model_name_or_path", "task_type", "revision"):
            if cfg.get(key) is not None and not isinstance(cfg[key], str):
                raise bad(key, f"must be text, got {clip(cfg[key])}")
        self._patterns: dict[str, list[tuple[re.Pattern, object]]] = {}
        for key, check, what in (("rank_pattern", _rank, "a whole number ≥ 1"),
                                 ("alpha_pattern", _number, "a finite number")):
            patterns = cfg.get(key) or {}
            if not isinstance(patterns, dict):
                raise bad(key, f"must be an object {{module name or regex: value}}, got {clip(patterns)}")
            compiled = []
            for k, v in patterns.items():
                problem = _pattern_problem(k)
                if problem is not None:
                    raise bad(f"{key} key {clip(k)}", problem + "; keys are module names (q_proj, "
                              "model.layers.0.self_attn.q_proj) or simple regular expressions")
                value = check(v)
                if value is None:
                    raise bad(f"{key}[{clip(k)}]", f"must be {what}, got {clip(v)}")
                compiled.append((re.compile(rf"(.*\.)?({k})$"), value))
            self._patterns[key] = compiled

    def _weights_file(self) -> Path:
        f = self.path / ADAPTER_WEIGHTS
        if f.is_file():
            return f
        pickles = sorted(p.name for p in self.path.glob("adapter_model.*") if p.suffix in (".bin", ".pt", ".pth"))
        if pickles:
            raise AdapterError(
                f"{self.path}: has only pickle weights ({', '.join(pickles)}); mergelab never "
                "unpickles a file (a pickle can run arbitrary code)",
                hint="convert it once, in an environment you trust: load it with "
                     "PeftModel.from_pretrained and save_pretrained(dir, safe_serialization=True)")
        raise AdapterError(f"{self.path}: no {ADAPTER_WEIGHTS}",
                           hint="the download is incomplete; fetch the adapter weights")

    # --- tensors
    def _parse_modules(self, reader) -> dict[str, AdapterModule]:
        cfg = self.config
        r_default = _rank(cfg.get("r", 8))
        alpha_default = _number(cfg.get("lora_alpha", r_default))
        rank_pattern, alpha_pattern = self._patterns["rank_pattern"], self._patterns["alpha_pattern"]
        rslora = bool(cfg.get("use_rslora", False))
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        found: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        self.stored_copies: dict[str, str] = {}
        for key in sorted(reader.keys()):
            m = _KEY.match(key)
            if m is None:
                copy = _COPY.match(key)
                if copy is None or ".lora_" in key or "modules_to_save" in key:
                    raise self._unexpected_key(key)
                # a full tensor saved beside the factors (PEFT saves embeddings when they are
                # targeted or resized); checked against the base in bind()
                path = copy.group("path")
                self.stored_copies[path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path] = key
                continue
            path = m.group("path")
            if path.startswith(PEFT_PREFIX):
                path = path[len(PEFT_PREFIX):]
            kind = EMBEDDING if m.group("eab") else (LINEAR_T if fan_in_fan_out else LINEAR)
            ab = m.group("ab") or m.group("eab")
            if kinds.setdefault(path, kind) != kind or ab in found.setdefault(path, {}):
                raise AdapterError(f"{self.weights_file}: module {path!r} has conflicting LoRA tensors",
                                   hint="re-save the adapter with PEFT")
            found[path][ab] = key
        modules = {}
        for path, keys in sorted(found.items()):
            if set(keys) != {"A", "B"}:
                missing = "B" if "A" in keys else "A"
                raise AdapterError(f"{self.weights_file}: module {path!r} has no lora_{missing} tensor",
                                   hint="the adapter file is incomplete; re-save it with PEFT")
            sa, sb = reader.shape(keys["A"]), reader.shape(keys["B"])
            for key in keys.values():
                if reader.dtype(key) not in _FLOAT_DTYPES:
                    raise AdapterError(f"{self.weights_file}: tensor {key!r} has dtype {reader.dtype(key)}; "
                                       "LoRA factors must be floating point",
                                       hint="quantised adapters are not supported; use a float16/bfloat16/float32 adapter")
            if len(sa) != 2 or len(sb) != 2:
                raise self._fail(f"a LoRA on a convolution ({path}: lora_A has shape {list(sa)})",
                                 "mergelab merges LoRA on Linear and Embedding layers")
            kind = kinds[path]
            if kind == EMBEDDING:   # lora_embedding_A (r, vocab), lora_embedding_B (dim, r)
                shape = (sa[1], sb[0])
            else:                   # lora_A (r, in), lora_B (out, r)
                shape = (sb[0], sa[1]) if kind == LINEAR else (sa[1], sb[0])
            r = sa[0]
            if sb[1] != r:
                raise AdapterError(f"{self.weights_file}: module {path!r}: lora_A {list(sa)} and "
                                   f"lora_B {list(sb)} do not share a rank",
                                   hint="the adapter file is corrupt; re-save it with PEFT")
            r_cfg = _pattern_value(rank_pattern, path, r_default)
            alpha = _pattern_value(alpha_pattern, path, alpha_default)
            if r_cfg != r:
                raise AdapterError(
                    f"{self.path}: module {path!r} has rank {r} in {ADAPTER_WEIGHTS} but "
                    f"{ADAPTER_CONFIG} gives r = {r_cfg} for it (r / rank_pattern)",
                    hint="the config does not belong to these weights; PEFT could not load it either")
            if r == 0:
                continue
            scale = float(alpha) / (math.sqrt(r) if rslora else r)
            modules[path] = AdapterModule(path, kind, keys["A"], keys["B"], r, float(alpha), scale, shape)
        if not modules:
            raise AdapterError(f"{self.weights_file}: holds no LoRA factors",
                               hint="check that this is the adapter you meant")
        return modules

    def _unexpected_key(self, key: str) -> AdapterError:
        if "lora_magnitude_vector" in key:
            return self._fail("DoRA (lora_magnitude_vector tensors)",
                              "its magnitude vector rescales every column of the adapted weight")
        if re.search(r"lora_[AB](\.[^.]+)?\.bias$", key):
            return self._fail("a trained LoRA bias", "the bias change is not part of ΔW")
        if "modules_to_save" in key or key.endswith(".bias") or ".lora_" not in key:
            return self._fail(f"a full trained tensor in the adapter ({key})",
                              "only LoRA factors can be merged in ΔW space")
        return self._fail(f"the tensor {key!r}", "it is not a LoRA factor mergelab knows")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the stored factors (float32 if they differ)."""
        dtypes = {self._reader.dtype(k) for m in self.modules.values() for k in (m.key_a, m.key_b)}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def raw(self, path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored ``(A, B)`` of one module, float32 on CPU."""
        mod = self.modules[path]
        return self._reader.get(mod.key_a).float(), self._reader.get(mod.key_b).float()

    def factors(self, path: str) -> LowRank:
        """ΔW of one module as :class:`LowRank` in the checkpoint's orientation, scale folded in."""
        mod = self.modules[path]
        a, b = self.raw(path)
        if mod.kind == LINEAR:              # ΔW = s·B @ A
            return LowRank(b * mod.scale, a)
        return LowRank(a.T * mod.scale, b.T)  # ΔW = (s·B @ A)ᵀ = (s·Aᵀ) @ Bᵀ

    def delta(self, path: str) -> torch.Tensor:
        """ΔW of one module, float32, computed as PEFT's get_delta_weight does: (B @ A) · s."""
        mod = self.modules[path]
        a, b = self.raw(path)
        d = (b @ a) * mod.scale
        return d if mod.kind == LINEAR else d.T

    def delta_rows(self, path: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of :meth:`delta`, from those rows of the factors (the same numbers)."""
        mod = self.modules[path]
        a, b = self.raw(path)
        if mod.kind == LINEAR:
            return (b[r0:r1] @ a) * mod.scale
        return ((b @ a[:, r0:r1]) * mod.scale).T

    def close(self) -> None:
        self._reader.close()

    # --- binding to a base checkpoint
    def bind(self, base) -> dict[str, AdapterModule]:
        """Map every module to the base tensor it changes: ``{tensor_name: AdapterModule}``.

        ``base`` is a :class:`~mergelab.io.checkpoint.TensorSource`. The name is the module path +
        ``.weight``; when the base stores names with a different prefix (an adapter trained on
        ``MistralModel`` rather than ``MistralForCausalLM``, or the reverse) the unique base name
        that ends the same way is used. The shape must match exactly.
        """
        base_keys = list(base.keys())
        key_set = set(base_keys)
        by_suffix: dict[str, list[str]] = {}
        bound: dict[str, AdapterModule] = {}
        for path, mod in self.modules.items():
            name = _match_name(path + ".weight", key_set, base_keys, by_suffix)
            if name is None:
                if path.rsplit(".", 1)[-1] == "lm_head" and any(k.endswith("embed_tokens.weight") for k in base_keys):
                    raise AdapterError(
                        f"{self.path}: adapts {path!r}, but the base has no lm_head.weight: its output "
                        "layer is tied to the input embeddings",
                        hint="a LoRA on a tied lm_head cannot be merged into separate weights; "
                             + _FOLD_HINT)
                near = _nearby(path, base_keys)
                raise AdapterError(
                    f"{self.path}: module {path!r} has no weight in the base model "
                    f"(looked for {path + '.weight'!r}{'; similar: ' + ', '.join(near) if near else ''})",
                    hint="this adapter was trained on another base model "
                         f"(its base_model_name_or_path is {self.base_model_name_or_path!r}); "
                         "use the base it was trained on")
            if name in bound:
                raise AdapterError(f"{self.path}: modules {bound[name].path!r} and {path!r} both map to "
                                   f"base tensor {name!r}")
            bshape = tuple(base.shape(name))
            if bshape != mod.shape:
                hint = "use the base model this adapter was trained on"
                if mod.kind == LINEAR and bshape == mod.shape[::-1]:
                    hint = ("the base stores this weight transposed (in × out, a GPT-2 style Conv1D): "
                            "set \"fan_in_fan_out\": true in adapter_config.json")
                elif mod.kind == LINEAR_T and bshape == mod.shape[::-1]:
                    hint = ("adapter_config.json says fan_in_fan_out: true but the base stores this "
                            "weight as out × in (nn.Linear): set \"fan_in_fan_out\": false")
                raise AdapterError(
                    f"{self.path}: module {path!r} changes a {list(mod.shape)} matrix but the base "
                    f"tensor {name!r} is {list(bshape)}", hint=hint)
            bound[name] = mod
        for path, key in sorted(self.stored_copies.items()):
            self._check_stored_copy(path, key, base, key_set, base_keys, by_suffix)
        return bound

    def _check_stored_copy(self, path, key, base, key_set, base_keys, cache) -> None:
        """A full tensor stored in the adapter must be the base's own (else it is a trained change)."""
        name = _match_name(path + ".weight", key_set, base_keys, cache)
        if name is None:
            raise AdapterError(f"{self.path}: stores a full tensor {key!r} that the base model does not have",
                               hint=_FOLD_HINT)
        saved = self._reader.get(key)
        if tuple(saved.shape) != tuple(base.shape(name)):
            raise AdapterError(
                f"{self.path}: stores its own {name!r} of shape {list(saved.shape)}, but the base's is "
                f"{list(base.shape(name))} (a resized vocabulary)",
                hint="merging needs every expert on the same vocabulary; " + _FOLD_HINT)
        if not torch.equal(saved, base.get(name).to(saved.dtype)):
            raise AdapterError(
                f"{self.path}: stores its own copy of {name!r} that differs from the base's "
                "(a trained or resized embedding), so the adapter is not base + ΔW",
                hint=_FOLD_HINT)

    def __repr__(self) -> str:
        return f"LoraAdapter({str(self.path)!r}, {len(self.modules)} modules)"


def _match_name(want: str, key_set: set[str], keys: list[str], cache: dict[str, list[str]]) -> str | None:
    if want in key_set:
        return want
    parts = want.split(".")
    # the adapter path has an extra leading prefix (e.g. "model." of a *ForCausalLM)
    for i in range(1, len(parts) - 1):
        cand = ".".join(parts[i:])
        if cand in key_set:
            return cand
    # the base has an extra leading prefix (e.g. "transformer.")
    hits = [k for k in keys if k.endswith("." + want)]
    return hits[0] if len(hits) == 1 else None


def _nearby(path: str, keys: Iterable[str], n: int = 3) -> list[str]:
    leaf = path.rsplit(".", 1)[-1]
    return [k for k in keys if f".{leaf}." in f".{k}"][:n]


def load_adapter(path: str | Path) -> LoraAdapter:
    """Open and validate a PEFT LoRA adapter folder (raises :class:`AdapterError`)."""
    return LoraAdapter(path)


# ------------------------------------------------------------------------- the LoRA expert source


class LoraExpertSource:
    """``base + ΔW`` of one LoRA adapter, tensor by tensor (a :class:`TensorSource`).

    ``keys``, ``shape`` and ``dtype`` are the base's. ``get(name)`` reads the base tensor and, for
    an adapted module, adds ``ΔW = (B @ A) · scale`` in float32 and casts back to the base dtype
    (the same arithmetic as PEFT's ``merge_and_unload``, with one rounding instead of two for
    half-precision bases). :meth:`factors` gives the module's :class:`LowRank` for code that
    merges in ΔW space; ``modules`` maps tensor names to :class:`AdapterModule`.
    """

    is_lora = True

    def __init__(self, adapter: LoraAdapter, base):
        self.adapter = adapter
        self.base = base
        self.path = adapter.path
        self.modules: dict[str, AdapterModule] = adapter.bind(base)

    def keys(self) -> list[str]:
        return list(self.base.keys())

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.base.shape(name))

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        w = self.base.get(name)
        mod = self.modules.get(name)
        if mod is None:
            return w
        delta = self.adapter.delta(mod.path)
        return (w.float() + delta).to(w.dtype)

    def delta(self, name: str) -> torch.Tensor | None:
        """ΔW (float32) of tensor ``name``, or None when the adapter leaves it unchanged."""
        mod = self.modules.get(name)
        return None if mod is None else self.adapter.delta(mod.path)

    def changes(self, name: str) -> bool:
        """Whether the adapter changes tensor ``name`` (else every row is the base's)."""
        return name in self.modules

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of :meth:`get`, built from those rows of the base and of ΔW only."""
        w = self.base.get_rows(name, r0, r1) if hasattr(self.base, "get_rows") else self.base.get(name)[r0:r1]
        mod = self.modules.get(name)
        if mod is None:
            return w
        return (w.float() + self.adapter.delta_rows(mod.path, r0, r1)).to(w.dtype)

    def factors(self, name: str) -> LowRank | None:
        """ΔW of tensor ``name`` as :class:`LowRank`, or None when the adapter leaves it unchanged."""
        mod = self.modules.get(name)
        return None if mod is None else self.adapter.factors(mod.path)

    def close(self) -> None:
        self.adapter.close()

    def __repr__(self) -> str:
        return f"LoraExpertSource({str(self.path)!r}, {len(self.modules)} adapted tensors)"


def open_lora_expert(path: str | Path, base_reader) -> LoraExpertSource:
    """The LoRA adapter at ``path`` applied to ``base_reader``: a TensorSource of base + ΔW."""
    return LoraExpertSource(load_adapter(path), base_reader)


# ------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutputModule:
    """One module of an adapter to write: its ΔW factors (checkpoint orientation) and kind."""

    factors: LowRank
    kind: str = LINEAR


def _module_path(tensor_name: str) -> str:
    if not tensor_name.endswith(".weight"):
        raise ValueError(f"LoRA modules change '.weight' tensors, not {tensor_name!r}")
    return tensor_name[: -len(".weight")]


def _target_modules(paths: list[str], base_keys: Iterable[str] | None) -> list[str]:
    """Short names (``q_proj``) where every such module of the base is written, else full paths."""
    if base_keys is None:
        return sorted(paths)
    by_leaf: dict[str, set[str]] = {}
    for k in base_keys:
        if k.endswith(".weight"):
            p = k[: -len(".weight")]
            by_leaf.setdefault(p.rsplit(".", 1)[-1], set()).add(p)
    written: dict[str, set[str]] = {}
    for p in paths:
        written.setdefault(p.rsplit(".", 1)[-1], set()).add(p)
    out = []
    for leaf, ps in sorted(written.items()):
        out.extend([leaf] if by_leaf.get(leaf) == ps else sorted(ps))
    return out


def write_adapter(out_dir: str | Path, modules: Mapping[str, OutputModule], *,
                  base_model_name_or_path: str | None = None, task_type: str | None = None,
                  dtype: torch.dtype = torch.float32, base_keys: Iterable[str] | None = None,
                  revision: str | None = None) -> dict:
    """Write ``modules`` (``{base tensor name: OutputModule}``) as one PEFT LoRA adapter.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out_dir`` (which
    must exist) and returns the config. Every module gets scale 1 (``lora_alpha = r`` per module,
    through ``rank_pattern``/``alpha_pattern`` where its rank differs from the most common one);
    for a half-precision ``dtype`` the factors are first balanced (equal column/row norms).
    Modules of rank 0 are left out. ``base_keys`` (the base checkpoint's tensor names) lets ``target_modules`` use
    short names such as ``q_proj`` where that is exact; otherwise full module paths are listed.
    ``revision`` is the base's Hub revision, if any. The bytes depend only on the inputs.
    """
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    kinds = set()
    for name in sorted(modules):
        om = modules[name]
        lr = om.factors
        if lr.rank == 0:
            continue
        path = _module_path(name)
        lr = lr.to("cpu")
        if dtype != torch.float32:  # equal column/row norms keep both factors in half-precision range
            lr = lr.balanced()
        b, a = lr.B.float(), lr.A.float()
        prefix = PEFT_PREFIX + path
        if om.kind == LINEAR:
            tensors[prefix + ".lora_A.weight"] = a
            tensors[prefix + ".lora_B.weight"] = b
        elif om.kind == LINEAR_T:   # PEFT: ΔW = (B_p A_p)ᵀ  ⇒  B_p = Aᵀ, A_p = Bᵀ
            tensors[prefix + ".lora_A.weight"] = b.T
            tensors[prefix + ".lora_B.weight"] = a.T
        elif om.kind == EMBEDDING:  # ΔW = (B_e A_e)ᵀ  ⇒  A_e = Bᵀ (r × vocab), B_e = Aᵀ (dim × r)
            tensors[prefix + ".lora_embedding_A"] = b.T
            tensors[prefix + ".lora_embedding_B"] = a.T
        else:
            raise ValueError(f"unknown module kind {om.kind!r}")
        ranks[path] = lr.rank
        kinds.add(om.kind)
    if not ranks:
        raise AdapterError("the merged adapter would be empty: every merged ΔW is zero",
                           hint="check the expert weights (all zero?) and the method's parameters")
    if LINEAR in kinds and LINEAR_T in kinds:
        raise AdapterError("cannot write one adapter with both Linear and Conv1D (fan_in_fan_out) modules")
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(sorted(counts), key=lambda r: counts[r])
    pattern = {p: r for p, r in sorted(ranks.items()) if r != r_main}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "r": r_main,
        "lora_alpha": r_main,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "use_rslora": False,
        "target_modules": _target_modules(list(ranks), base_keys),
        "fan_in_fan_out": LINEAR_T in kinds,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out_dir = Path(out_dir)
    save_file({k: v.to(dtype).contiguous() for k, v in sorted(tensors.items())},
              str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out_dir / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config
