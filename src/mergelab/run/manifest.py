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
from mergelab.errors import ReproducibilityError
from mergelab.io.jsonfile import clip, read_json
from mergelab.util import sha256_file

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
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read a run manifest and check its shape before anything uses it.

    Raises :class:`ReproducibilityError` naming the file and the key that is wrong: a manifest
    that is not a JSON object, whose ``recipe`` is not a mapping, whose ``outputs`` or a model's
    ``files`` are not ``{path: sha256}``, whose models lack a ``role``, ...
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise ReproducibilityError(f"no manifest at {path}",
                                   hint="pass the manifest.json that `mergelab run` wrote") from None
    except OSError as exc:
        raise ReproducibilityError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ReproducibilityError(f"{path}: not a mergelab run manifest ({exc})",
                                   hint="pass the manifest.json that `mergelab run` wrote") from None
    problem = manifest_problem(data)
    if problem is not None:
        raise ReproducibilityError(f"{path}: not a mergelab run manifest: {problem}",
                                   hint="pass the manifest.json that `mergelab run` wrote, unedited")
    return data


def _hashes(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def manifest_problem(data: Any) -> str | None:
    """What is wrong with the shape of a parsed manifest, or None (the keys a rerun and
    ``reproduce`` use: recipe, outputs, models, stages, finished)."""
    if not isinstance(data, dict):
        return f"it is a JSON {type(data).__name__}, not an object"
    if "recipe" not in data or "outputs" not in data:
        return "no 'recipe'/'outputs'"
    if not isinstance(data["recipe"], dict):
        return f"'recipe' must be the recipe as a mapping, got {clip(data['recipe'])}"
    if not _hashes(data["outputs"]):
        return "'outputs' must map each output file to its sha256"
    models = data.get("models", [])
    if not isinstance(models, list):
        return f"'models' must be a list, got {clip(models)}"
    roles: set[str] = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            return f"models[{i}] has no 'role' (base, expert 1, ...)"
        if m["role"] in roles:
            return f"models[{i}]: the role {clip(m['role'])} appears twice"
        roles.add(m["role"])
        if not _hashes(m.get("files")):
            return f"models[{i}] ({clip(m['role'])}): 'files' must map each input file to its sha256"
    stages = data.get("stages", {})
    if not isinstance(stages, dict):
        return f"'stages' must be a mapping, got {clip(stages)}"
    for name, stage in stages.items():
        if not isinstance(stage, dict) or not _hashes(stage.get("outputs", {})):
            return f"stages.{clip(name)} must be a mapping with 'outputs' {{file: sha256}}"
        if not isinstance(stage.get("key", ""), str) or not isinstance(stage.get("complete", True), bool):
            return f"stages.{clip(name)}: 'key' must be text and 'complete' true or false"
    if not isinstance(data.get("finished", True), bool):
        return f"'finished' must be true or false, got {clip(data['finished'])}"
    return None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------ publishing a run

#: Where `mergelab push` puts a run's own records in the Hub repo (the model itself goes at the root).
PUSH_RUN_PREFIX = "mergelab-run/"
#: The files and folders of a run folder that `mergelab push` uploads under PUSH_RUN_PREFIX.
PUSH_RUN_ITEMS = (MANIFEST_NAME, "timing.json", "report.html", "eval", "finetune")


def is_run_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a mergelab run manifest (``mergelab run``'s output)."""
    try:
        read_manifest(Path(folder) / MANIFEST_NAME)
    except ReproducibilityError:
        return False
    return True


def run_push_files(run_dir: str | Path) -> dict[str, Path]:
    """``{path in repo: local file}`` for pushing a run: ``model/`` at the repository root (a loadable
    model with its card), and the manifest, timings, report and ``eval/`` (submissions, scores,
    predictions) and ``finetune/`` under :data:`PUSH_RUN_PREFIX`. ``merged/`` (the model before
    ``finetune: after_merge``) stays local."""
    run_dir = Path(run_dir)

    def files(folder: Path, prefix: str) -> dict[str, Path]:
        return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}

    if not (run_dir / "model").is_dir():
        raise ReproducibilityError(f"{run_dir} is a run folder without model/: the run did not get to the merge",
                                   hint="run `mergelab run` into it again to finish it, then push")
    out = files(run_dir / "model", "")
    for item in PUSH_RUN_ITEMS:
        path = run_dir / item
        if path.is_file():
            out[PUSH_RUN_PREFIX + item] = path
        elif path.is_dir():
            out |= files(path, f"{PUSH_RUN_PREFIX}{item}/")
    return out


def record_push(run_dir: str | Path, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` (``{repo, revision, commit_url}``) as the manifest's ``push`` entry; return the manifest.

    ``reproduce`` ignores the entry; a later ``mergelab run`` into the folder keeps it while the
    outputs are the bytes that were pushed.
    """
    path = Path(run_dir) / MANIFEST_NAME
    manifest = read_manifest(path)
    manifest["push"] = dict(record)
    write_manifest(path, manifest)
    return manifest
