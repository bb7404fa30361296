"""Run manifests: what a run read, what it wrote, and how, so that it can be reproduced.

A manifest records the normalised recipe, each model's resolved commit, the sha256 of every input
file read, package versions, the device, seeds, the sha256 of every output file and stage timings.
``mergelab reproduce`` runs the recipe again and compares the output hashes file by file.
"""
from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from mergelab.util import sha256_file
from mergelab.errors import ReproducibilityError

MANIFEST_NAME = "manifest.json"
_PACKAGES = ("mergelab", "torch", "transformers", "peft", "safetensors", "huggingface_hub",
             "accelerate", "tokenizers", "pydantic", "numpy")
# Files a run writes that are volatile by nature (timings), left out of the output hashes.
VOLATILE_FILES = ("timing.json", "report.html")


def hash_tree(root: str | Path, *, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``root`` (sorted, POSIX separators)."""
    root = Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.name not in skip and not any(rel == s or rel.startswith(s + "/") for s in skip):
            out[rel] = sha256_file(p)
    return out


def fingerprint(obj: Any) -> str:
    """A stable sha256 of a JSON-able object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"requested": device, "platform": platform.platform(),
                            "machine": platform.machine(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReproducibilityError(f"no manifest at {path}",
                                   hint="pass the manifest.json that `mergelab run` wrote") from None
    except json.JSONDecodeError as exc:
        raise ReproducibilityError(f"{path} is not valid JSON ({exc})") from None
    if "recipe" not in data or "outputs" not in data:
        raise ReproducibilityError(f"{path} is not a mergelab run manifest (no 'recipe'/'outputs')")
    return data


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
