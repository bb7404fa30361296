"""The merge's inputs: opening the base and the experts (checkpoints, or LoRA adapters applied to the
base), and aligning their tensors by name, shape and dtype before anything is read or written."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from mergelab.errors import ModelMismatchError, NonFiniteError, RecipeError, ShapeMismatchError
from mergelab.io.adapter import is_adapter_dir, open_lora_expert
from mergelab.io.checkpoint import CheckpointReader, TensorSource
from mergelab.methods import MethodSpec, get_method
from mergelab.recipe import Recipe, layer_of
from mergelab.util import check_output_dir, check_output_path, natural_key, pick_device


class MissingTensorError(ShapeMismatchError):
    """An expert lacks a tensor that the base has (a different architecture or size)."""


# Tensors that are one and the same in Hugging Face models, whatever the config says.
_ALWAYS_TIED = (("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"),
                ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"))


# Input embeddings and output heads, aliases of each other when ``tie_word_embeddings`` holds.
_INPUT_EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight",
                     "model.shared.weight", "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight",
                     "model.decoder.embed_tokens.weight", "encoder.embed_tokens.weight",
                     "decoder.embed_tokens.weight")


_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")


def is_vocab_tensor(name: str) -> bool:
    """Whether tensor ``name`` holds one row per token (an input embedding or an output head)."""
    return name in _INPUT_EMBEDDINGS or name in _OUTPUT_EMBEDDINGS


def vocab_tensor(src: TensorSource) -> str | None:
    """The name of ``src``'s input embedding (else its output head), or None."""
    keys = set(src.keys())
    return next((n for n in _INPUT_EMBEDDINGS + _OUTPUT_EMBEDDINGS if n in keys), None)


# Buffers that older checkpoints saved and that are recomputed on load.
_IGNORED_EXTRA = re.compile(r"(rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


def _ties_embeddings(config: Mapping[str, Any] | None) -> bool:
    if not config:
        return True  # transformers' default
    for key in ("tie_word_embeddings", "tie_embeddings"):
        if key in config:
            return bool(config[key])
    text = config.get("text_config")
    return _ties_embeddings(text) if isinstance(text, Mapping) else True


def _aliases(name: str, tied: bool) -> list[str]:
    """Other names the same weights may be stored under."""
    out: list[str] = []
    for group in _ALWAYS_TIED:
        if name in group:
            out += [n for n in group if n != name]
    if tied:
        if name in _OUTPUT_EMBEDDINGS:
            out += list(_INPUT_EMBEDDINGS)
        elif name in _INPUT_EMBEDDINGS:
            out += list(_OUTPUT_EMBEDDINGS)
    return out


def open_expert(path: str | os.PathLike, base_reader: CheckpointReader) -> TensorSource:
    """An expert as a :class:`TensorSource`: a PEFT adapter folder (``adapter_config.json``) is
    applied to the base (``base + ΔW`` per adapted module); anything else is a checkpoint."""
    path = Path(path)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return open_lora_expert(path, base_reader)
    return CheckpointReader(path)


def open_inputs(base_path, expert_paths, opened: list, open_one=open_expert) -> tuple[CheckpointReader, list]:
    """``(base reader, one source per expert)``; each is appended to ``opened`` as soon as it is
    open, so the caller's ``finally`` closes what was opened before a failure."""
    base = CheckpointReader(base_path)
    opened.append(base)
    experts = []
    for p in expert_paths:
        experts.append(open_one(p, base))
        opened.append(experts[-1])
    return base, experts


@dataclass
class TensorTask:
    """One output tensor: where its inputs come from and how it is written."""

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: list[tuple[TensorSource, str]]  # base first, then one per expert
    floating: bool
    num_layers: int
    work_bytes: int = 0
    block_rows: int = 0   # rows per block when merged in row blocks (0: the whole tensor at once)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def describe_expert(i: int, src: TensorSource) -> str:
    return f"expert {i} ({getattr(src, 'path', src)})"


# config.json keys that say which model a checkpoint is: its family and its dimensions.
IDENTITY_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "head_dim", "intermediate_size", "vocab_size",
                 "d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads",   # T5
                 "n_embd", "n_layer", "n_head", "n_inner")                                     # GPT-2


def config_differences(base: Mapping[str, Any] | None, other: Mapping[str, Any] | None,
                       ignore: tuple[str, ...] = ()) -> list[str]:
    """How ``other``'s config.json says another model than ``base``'s: ``["model_type 'mistral'
    (base 'llama')", ...]``; keys only one of them sets are not compared (nothing to compare), nor
    the keys in ``ignore``."""
    if not isinstance(base, Mapping) or not isinstance(other, Mapping):
        return []
    out = []
    for key in IDENTITY_KEYS:
        if key in ignore:
            continue
        a, b = base.get(key), other.get(key)
        if a is not None and b is not None and a != b:
            out.append(f"{key} {b!r} (base {a!r})")
    if base.get("model_type") is None or other.get("model_type") is None:
        a, b = base.get("architectures"), other.get("architectures")
        if a and b and a != b:
            out.append(f"architectures {b!r} (base {a!r})")
    a, b = base.get("text_config"), other.get("text_config")
    out += [f"text_config.{d}" for d in config_differences(a, b, ignore)]
    return out


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_HUB_CACHE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")


def _hub_id(ref, path: Path | None) -> str | None:
    """The Hub repo id of the base: the recipe's ``model``, or read off a Hub cache snapshot path."""
    if getattr(ref, "model", None):
        return str(ref.model)
    m = _HUB_CACHE.search(str(path).replace(os.sep, "/")) if path is not None else None
    return f"{m.group(1)}/{m.group(2)}" if m else None


def adapter_base_verdict(recorded: str | None, base_ref, base_path: Path, base_config) -> tuple[str, str] | None:
    """Whether an adapter's recorded ``base_model_name_or_path`` names the recipe's base.

    ``None``: it does (or records nothing); ``("warn", why)``: only a name that cannot be
    checked differs (a local path vs a Hub id, another owner of the same repo name, a folder not
    here, a copy of the base with the same config); ``("error", why)``: it names another model
    (another Hub repo, or a folder whose config.json differs from the base's).
    """
    rec = (recorded or "").strip().rstrip("/")
    if not rec:
        return None
    hub = _hub_id(base_ref, base_path)
    rec_path = Path(rec).expanduser()
    if rec_path.is_absolute() or rec.startswith((".", "~")) or rec_path.exists():
        if not rec_path.exists():
            return "warn", f"it was trained on {rec}, a folder that is not here, so this cannot be checked"
        if rec_path.resolve() == Path(base_path).resolve():
            return None
        rec_hub = _hub_id(None, rec_path.resolve())
        if hub and rec_hub and rec_hub.lower() == hub.lower():
            return None   # another snapshot of the same Hub repo
        cfg = rec_path / "config.json"
        try:
            diffs = config_differences(base_config, json.loads(cfg.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            return "warn", f"it was trained on {rec}, whose config.json cannot be read, so this cannot be checked"
        if diffs:
            return "error", f"it was trained on {rec}, another model: {', '.join(diffs)}"
        return "warn", f"it was trained on {rec}, another folder than the base {base_path} (their configs agree)"
    if not _HUB_ID.fullmatch(rec):
        return "warn", f"it records its base as {rec!r}, which is neither a folder here nor a Hub id"
    if hub is None:
        return "warn", (f"it was trained on the Hub model {rec}, the base is the local folder {base_path}, "
                        "so the two names cannot be compared")
    if rec.lower() == hub.lower():
        return None
    if rec.split("/")[-1].lower() == hub.split("/")[-1].lower():
        return "warn", f"it was trained on {rec}, the base is {hub}: the same name under another owner"
    return "error", f"it was trained on {rec}, but the recipe's base is {hub}"


def check_identity(recipe: Recipe, base: CheckpointReader, experts: Sequence[TensorSource],
                   warn: Callable[[str], None] | None = None) -> list[str]:
    """Refuse experts of another model than the base, before any tensor is read.

    A checkpoint expert's ``config.json`` must agree with the base's in family and dimensions
    (:data:`IDENTITY_KEYS`); a LoRA expert's recorded ``base_model_name_or_path`` must name the
    base (:func:`adapter_base_verdict`). Raises :class:`ModelMismatchError` naming both, unless
    the expert has ``accept_mismatch: true``; names that cannot be checked are warnings, passed
    to ``warn`` and returned.
    """
    warnings: list[str] = []
    base_path = Path(base.path)
    for i, (ref, src) in enumerate(zip(recipe.experts, experts)):
        who = describe_expert(i, src)
        adapter = getattr(src, "adapter", None)
        if adapter is not None:
            verdict = adapter_base_verdict(adapter.base_model_name_or_path, recipe.base, base_path, base.config)
            if verdict is None:
                continue
            kind, why = verdict
            what = f"{who} is a LoRA adapter of another base than {base_path}: {why}"
        else:
            # a vocabulary of another size is the embedding check's business (align_tensors), which
            # says how to merge it (a tokenizer section)
            diffs = config_differences(base.config, getattr(src, "config", None), ignore=("vocab_size",))
            if not diffs:
                continue
            kind, what = "error", f"{who} is another model than the base {base_path}: {', '.join(diffs)}"
        if kind == "error" and not ref.accept_mismatch:
            raise ModelMismatchError(what, hint=f"experts must be fine-tunes of the base; to merge it on purpose "
                                                f"(e.g. a re-upload of the same weights), set "
                                                f"experts[{i}].accept_mismatch: true")
        warnings.append(what + (" (accepted: accept_mismatch)" if kind == "error" else ""))
    for w in warnings:
        if warn is not None:
            warn(w)
    return warnings


NONFINITE_INPUT_HINT = ("the input is broken (a diverged fine-tune, or a bad conversion to float16?): fix or "
                        "drop it; to merge anyway, set output.allow_nonfinite: true in the recipe "
                        "(or pass --allow-nonfinite)")
NONFINITE_RESULT_HINT = ("the inputs are finite, so the method or the cast to the output dtype made them (a "
                         "value beyond float16's range? try output.dtype: bfloat16 or float32); to write it "
                         "anyway, set output.allow_nonfinite: true (or pass --allow-nonfinite)")


def check_finite(t: torch.Tensor, name: str, where: str) -> None:
    """Raise :class:`NonFiniteError` if ``t`` (tensor ``name`` of ``where``: ``"expert 1 (path)"``,
    ``"the base"``, ``"the merged result"``) holds NaN or ±Inf.

    Cheap: one float32 sum over the tensor already in memory (a NaN or Inf makes the sum
    non-finite; 25× faster than ``isfinite(t).all()``, which allocates a mask). Only when the sum
    is not finite — a NaN/Inf, or finite values too large to add up — is each value looked at.
    """
    if not t.is_floating_point() or math.isfinite(float(t.sum(dtype=torch.float32))):
        return
    if bool(torch.isfinite(t).all()):   # the sum overflowed, every value is finite
        return
    nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
    what = " and ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} infinite" if inf else "") if x)
    raise NonFiniteError(f"tensor {name!r} of {where} holds {what} value(s) (of {t.numel()})",
                         hint=NONFINITE_RESULT_HINT if where == RESULT else NONFINITE_INPUT_HINT)


RESULT = "the merged result"


def align_tensors(recipe: Recipe, base: CheckpointReader, experts: Sequence[TensorSource],
               spec: MethodSpec, vocab_size: int | None = None) -> list[TensorTask]:
    """Align names, shapes and dtypes across base and experts; one task per base tensor.

    Raises :class:`MissingTensorError` / :class:`ShapeMismatchError` naming the tensor, the expert
    and both shapes. Reads headers only. ``vocab_size`` (a merge with a tokenizer section, whose
    rows :mod:`mergelab.merge.vocab` aligns by token afterwards): the embedding and output heads may
    have any number of rows, and their tasks get ``vocab_size`` rows.
    """
    names = sorted(base.keys(), key=natural_key)
    base_keys = set(names)
    depth: dict[str, int] = {}
    for n in names:
        loc = layer_of(n)
        if loc is not None:
            depth[loc[0]] = max(depth.get(loc[0], 0), loc[1] + 1)
    out_dtype = recipe.output.torch_dtype
    expert_keys = [set(e.keys()) for e in experts]
    expert_tied = [_ties_embeddings(getattr(e, "config", None)) for e in experts]
    base_tied = _ties_embeddings(base.config)

    # Tensors an expert has that the base lacks: aliases and stale buffers are fine, others not.
    for i, (src, keys) in enumerate(zip(experts, expert_keys)):
        extra = sorted(k for k in keys - base_keys if not _IGNORED_EXTRA.search(k)
                       and not any(a in base_keys for a in _aliases(k, expert_tied[i] or base_tied)))
        if extra:
            shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
            raise ShapeMismatchError(
                f"{describe_expert(i, src)} has {len(extra)} tensor(s) that the base lacks: {shown}",
                hint="experts must be fine-tunes of the base (same architecture and size)")
        if base_tied and not expert_tied[i]:
            own = [k for k in keys & set(_OUTPUT_EMBEDDINGS) if k not in base_keys]
            if own:
                raise ShapeMismatchError(
                    f"{describe_expert(i, src)} has its own (untied) {own[0]}, but the base ties it to the "
                    "input embeddings, so the merged model could not hold it",
                    hint="merge into a base with tie_word_embeddings: false, or use experts that keep the tie")

    tasks = []
    for name in names:
        shape, dtype = tuple(base.shape(name)), base.dtype(name)
        inputs: list[tuple[TensorSource, str]] = [(base, name)]
        for i, (src, keys) in enumerate(zip(experts, expert_keys)):
            src_name = name if name in keys else next(
                (a for a in _aliases(name, expert_tied[i]) if a in keys), None)
            if src_name is None:
                raise MissingTensorError(
                    f"{describe_expert(i, src)} has no tensor {name!r}, which the base has",
                    hint="experts must be fine-tunes of the base (same architecture and size)")
            e_shape, e_dtype = tuple(src.shape(src_name)), src.dtype(src_name)
            by_token = vocab_size is not None and is_vocab_tensor(name) and len(shape) == 2
            if e_shape != shape and not (by_token and e_shape[1:] == shape[1:]):
                vocab = ""
                if is_vocab_tensor(name) and len(shape) == 2 and e_shape[1:] == shape[1:]:
                    vocab = (f" — vocabulary sizes differ (base {shape[0]} rows, expert {e_shape[0]});"
                             " mergelab never truncates or pads a vocabulary by index")
                hint = "experts must be fine-tunes of the base (same architecture and size)"
                if vocab and recipe.tokenizer is None:
                    hint = ("to align the rows by token, set `tokenizer: {source: union}` in the recipe (the "
                            "base's vocabulary plus the experts' added tokens) or `tokenizer: {source: base}` "
                            "(the base's vocabulary; tokens only an expert has are dropped)")
                elif vocab:
                    hint = ("tuning in place and the merged-model statistics of data-aware methods merge rows "
                            "by index; there, resize the expert's embeddings to the base's tokenizer")
                raise ShapeMismatchError(
                    f"tensor {name!r}: base has shape {list(shape)}, {describe_expert(i, src)} has "
                    f"{list(e_shape)}{vocab}", hint=hint)
            if e_dtype.is_floating_point != dtype.is_floating_point or (
                    not dtype.is_floating_point and e_dtype != dtype):
                raise ShapeMismatchError(
                    f"tensor {name!r}: base stores {dtype}, {describe_expert(i, src)} stores {e_dtype}",
                    hint="floating-point tensors may differ in precision; other types must match")
            inputs.append((src, src_name))
        floating = dtype.is_floating_point
        loc = layer_of(name)
        if vocab_size is not None and is_vocab_tensor(name) and len(shape) == 2:
            shape = (vocab_size, *shape[1:])
        task = TensorTask(name, shape, (out_dtype or dtype) if floating else dtype, inputs, floating,
                          depth.get(loc[0], 0) if loc else max(depth.values(), default=0))
        set_work_bytes(task)
        tasks.append(task)
    return tasks


def set_work_bytes(task: TensorTask) -> None:
    """The bytes merging ``task`` at once takes: its inputs as read and in float32, the result."""
    n_in = len(task.inputs)
    task.work_bytes = task.numel * (sum(s.dtype(n).itemsize for s, n in task.inputs) + 4 * n_in + 4
                                    + task.out_dtype.itemsize + n_in) if task.floating else \
        task.numel * task.out_dtype.itemsize * 2


def input_paths(recipe: Recipe, base_path=None, expert_paths: Sequence = ()) -> list[Path]:
    """Every file or folder the merge reads: base, experts (local, or resolved when given) and the
    experts' data files — what the output must never be, hold or lie inside."""
    paths = [Path(p) for p in (base_path, *expert_paths) if p is not None]
    paths += [Path(r.path) for r in (recipe.base, *recipe.experts) if r.path is not None]
    paths += [Path(f) for e in recipe.experts for f in (e.data or [])]
    return paths


@dataclass
class MergeInputs:
    """What both merge paths settle before opening anything: the device, the method, and every
    input resolved to a local folder (Hub references fetched), the output checked against them."""

    out_dir: Path
    device: torch.device
    spec: MethodSpec
    base_path: Path
    expert_paths: list[Path]


def prepare_inputs(recipe: Recipe, out_dir, *, force: bool, device: str, adapters_only: bool = False) -> MergeInputs:
    """Check the output (never an input, nor holding or inside one; existing only with ``force``)
    before and after the Hub is asked, choose the device and the method, resolve the models.
    ``adapters_only`` (the adapter output) refuses an expert that is not a LoRA adapter."""
    out_dir = Path(out_dir)
    check_output_path(out_dir, input_paths(recipe))   # before the Hub is asked
    check_output_dir(out_dir, force)
    dev = pick_device(device)
    spec = get_method(recipe.method.name)
    base_path = Path(recipe.base.resolve())
    expert_paths = [Path(e.resolve()) for e in recipe.experts]
    for i, path in enumerate(expert_paths if adapters_only else ()):
        if not is_adapter_dir(path):
            raise RecipeError(
                f"experts[{i}] ({path}): output format lora needs every expert to be a LoRA adapter, "
                "and this is not one (no adapter_config.json)",
                hint="use output format full to merge full fine-tunes, alone or mixed with LoRA adapters")
    check_output_path(out_dir, input_paths(recipe, base_path, expert_paths))
    return MergeInputs(out_dir, dev, spec, base_path, expert_paths)
