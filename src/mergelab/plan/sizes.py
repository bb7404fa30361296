"""Sizes of a model or adapter: parameters, bytes and shapes from safetensors headers and config.json."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mergelab.errors import CheckpointError
from mergelab.io.checkpoint import read_safetensors_header
from mergelab.io.layers import plan_stack


@dataclass
class ModelInfo:
    """Sizes of one model or adapter folder, from its safetensors headers and config.json."""

    path: str
    params: int
    bytes: int
    tensors: int
    largest: int                    # elements of the largest tensor
    embedding_params: int = 0       # input embedding (no matmul) when a separate lm_head exists
    adapter: bool = False
    layers: int = 0
    hidden: int = 0
    intermediate: int = 0
    vocab: int = 0
    kv_dim: int = 0                 # key/value width per layer (kv heads × head dim)
    encoder_decoder: bool = False   # T5-like: an encoder stack and a decoder stack (layers counts both)

    @property
    def matmul_params(self) -> int:
        return self.params - self.embedding_params


def _headers(folder: Path) -> list:
    """``[(tensor name, header info)]`` of a folder's safetensors files (in file order)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files to size the model from",
                              hint="the planner reads safetensors headers; convert pickled weights first")
    out = []
    for f in files:
        out += read_safetensors_header(f)[0].items()
    return out


def _sized(path: str, tensors: list[tuple[str, tuple[int, ...], int]], adapter: bool = False) -> ModelInfo:
    """A :class:`ModelInfo` (sizes only) from ``(name, shape, bytes)`` of each tensor."""
    params = nbytes = largest = embed = 0
    lm_head = False
    for name, shape, size in tensors:
        n = math.prod(shape)
        params += n
        nbytes += size
        largest = max(largest, n)
        if name.endswith("embed_tokens.weight") or name.endswith("shared.weight"):
            embed = max(embed, n)
        if name.endswith("lm_head.weight"):
            lm_head = True
    return ModelInfo(path, params, nbytes, len(tensors), largest, embed if lm_head else 0, adapter=adapter)


def inspect_model(folder: str | os.PathLike) -> ModelInfo:
    """Parameter count, bytes and shapes of a model or adapter folder, from headers only."""
    folder = Path(folder)
    info = _sized(str(folder), [(name, tuple(i.shape), i.nbytes) for name, i in _headers(folder)],
                  adapter=(folder / "adapter_config.json").is_file())
    _read_config(info, folder)
    return info


def inspect_stack(parts: list[tuple[str | os.PathLike, int, int]], config_folder: str | os.PathLike) -> ModelInfo:
    """Sizes of the model stacked from ``parts`` (``(model folder, start, end)`` per slice, see
    :func:`~mergelab.io.layers.plan_stack`), from headers only; widths from ``config_folder``'s
    config.json, the layer count the stack's."""
    headers: dict[str, dict] = {}
    for folder, _, _ in parts:
        headers.setdefault(str(folder), dict(_headers(Path(folder))))
    layout = plan_stack([({n: i.shape for n, i in headers[str(f)].items()}, start, end) for f, start, end in parts],
                        [f"slices[{i}] ({f})" for i, (f, _, _) in enumerate(parts)])
    info = _sized("(the stacked model)", [(t.name, t.shape, headers[str(parts[t.part][0])][t.source].nbytes)
                                          for t in layout.tensors])
    _read_config(info, Path(config_folder))
    info.layers = len(layout.layers)
    return info


def _read_config(info: ModelInfo, folder: Path) -> None:
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        cfg = json.loads(cfg_file.read_text())
        cfg = cfg.get("text_config", cfg)
        info.hidden = int(cfg.get("hidden_size") or cfg.get("d_model") or 0)
        info.layers = int(cfg.get("num_hidden_layers") or cfg.get("num_layers") or 0)
        info.encoder_decoder = bool(cfg.get("is_encoder_decoder", False))
        if cfg.get("num_decoder_layers"):
            info.layers += int(cfg["num_decoder_layers"])
        info.intermediate = int(cfg.get("intermediate_size") or cfg.get("d_ff") or 4 * info.hidden)
        info.vocab = int(cfg.get("vocab_size") or 0)
        heads = int(cfg.get("num_attention_heads") or cfg.get("num_heads") or 1)
        head_dim = int(cfg.get("head_dim") or cfg.get("d_kv") or (info.hidden // max(heads, 1)))
        info.kv_dim = int(cfg.get("num_key_value_heads") or heads) * head_dim


def model_info_from_config(cfg: Mapping[str, Any], dtype_bytes: int = 2, name: str = "(from config)") -> ModelInfo:
    """Sizes of a Llama/Mistral-style decoder from its ``config.json`` alone (no weights at hand).

    Per layer: q and o (h×h), k and v (h×kv), gate/up/down (h×inter), two norms; plus the
    embedding, the final norm and an untied ``lm_head``. Used to plan models not downloaded yet.
    """
    h, inter, layers = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"])
    vocab = int(cfg["vocab_size"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads) * int(cfg.get("head_dim") or h // heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    tied = bool(cfg.get("tie_word_embeddings", False))
    embed = vocab * h
    params = layers * per_layer + embed + h + (0 if tied else embed)
    return ModelInfo(name, params, params * dtype_bytes, layers * 9 + 2 + (0 if tied else 1),
                     max(embed, h * inter), 0 if tied else embed, layers=layers, hidden=h,
                     intermediate=inter, vocab=vocab, kv_dim=kv)
