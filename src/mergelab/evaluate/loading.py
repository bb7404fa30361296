"""Loading a model to evaluate: a local folder (decoder-only or T5), plus an optional PEFT adapter.

Weights are read from safetensors only, as ``merge`` does: a folder (or adapter) with pickle
weights only (``pytorch_model.bin``, ``adapter_model.bin``...) is refused with the command that
converts it, before transformers or PEFT could unpickle anything (``weights_only=True`` blocks a
payload, but its error then suggests ``weights_only=False``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mergelab.errors import AdapterError, CheckpointError
from mergelab.evaluate.options import EvalError
from mergelab.io.checkpoint import PICKLE_SUFFIXES, CheckpointReader
from mergelab.util import pick_device

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None``/``auto`` → float32 on CPU; bfloat16 on CUDA (float16 where bf16 is unsupported)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise EvalError(f"unknown dtype {dtype!r}", hint=f"use auto or one of {', '.join(_DTYPES)}") from None


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found",
                              hint="pass a local folder with config.json, tokenizer and safetensors weights")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; this is not a Hugging Face model folder")
    if not any(f.name != "adapter_model.safetensors" for f in path.glob("*.safetensors")):
        # no safetensors weights: the reader's own message (pickle only, with the conversion
        # command, or no weights at all), never transformers' pickle loader
        CheckpointReader(path).close()


def _check_adapter_weights(adapter: Path, base: Path | None) -> None:
    """Refuse an adapter whose weights are pickle only (PEFT would unpickle ``adapter_model.bin``)."""
    if (adapter / "adapter_model.safetensors").is_file():
        return
    pickles = sorted(p.name for p in adapter.glob("adapter_model.*") if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise AdapterError(f"{adapter}: no adapter_model.safetensors",
                           hint="the adapter folder needs its weights (adapter_model.safetensors)")
    model = f"M.from_pretrained('{base}')" if base is not None else "M.from_pretrained(BASE)"
    raise AdapterError(
        f"{adapter}: has only pickle weights ({', '.join(pickles)}); mergelab reads safetensors only and never "
        "unpickles a file (a pickle can run arbitrary code)",
        hint="convert it once, in an environment you trust: python -c \"from transformers import "
             f"AutoModelForCausalLM as M; from peft import PeftModel; PeftModel.from_pretrained({model}, "
             f"'{adapter}').save_pretrained('{adapter}-safetensors', safe_serialization=True)\" "
             "(AutoModelForSeq2SeqLM for T5)")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer ({exc})",
                              hint="the model folder needs its tokenizer files") from None


def load_model_and_tokenizer(path: str | Path, adapter: str | Path | None = None,
                             device: str = "auto", dtype: str | torch.dtype | None = None):
    """Load ``(model, tokenizer)`` from a local folder, in eval mode on ``device``.

    Decoder-only models load with ``AutoModelForCausalLM``, encoder–decoder models (T5) with
    ``AutoModelForSeq2SeqLM``. A PEFT ``adapter`` folder is applied on top of the base and merged
    into its weights (``merge_and_unload``), which gives the same outputs as the unmerged adapter
    and evaluates as fast as the base. ``dtype``: ``None``/``"auto"`` (see :func:`resolve_dtype`),
    a name (``"float32"``, ``"bfloat16"``, ``"float16"``) or a ``torch.dtype``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    path = Path(path)
    _check_model_dir(path)
    dev = pick_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read config.json ({exc})") from None
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(path), dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot load the model ({exc})",
                              hint="the folder needs safetensors weights that match config.json") from None
    tokenizer = load_tokenizer(path)
    model.to(dev)
    if adapter is not None:
        model = apply_adapter(model, adapter, base=path).merge_and_unload()
    model.eval()
    return model, tokenizer


def apply_adapter(model, adapter: str | Path, base: str | Path | None = None):
    """Wrap ``model`` with the PEFT adapter in ``adapter``; errors name the adapter folder.

    Pickle-only adapter weights are refused (``base``, the model's folder, goes into the
    conversion command of that message).

    The returned ``PeftModel`` shares (and modifies) ``model``'s modules; call ``unload()`` on it
    to get the original model back, or ``merge_and_unload()`` to fold the adapter in.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    if not cfg_file.is_file():
        raise AdapterError(f"{adapter}: no adapter_config.json; this is not a PEFT adapter folder")
    try:
        peft_type = json.loads(cfg_file.read_text()).get("peft_type", "?")
    except ValueError as exc:
        raise AdapterError(f"{adapter}/adapter_config.json: not valid JSON ({exc})") from None
    _check_adapter_weights(adapter, Path(base) if base is not None else None)
    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"{adapter}: the {peft_type} adapter does not fit this base model ({first})",
                           hint="evaluate the adapter on the base model it was trained on") from None
    peft_model.eval()
    return peft_model
