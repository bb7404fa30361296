"""L0 — small shared helpers: natural sort key, device choice, free memory, cache root, sha256, atomic outputs."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch

from mergelab.errors import MergelabError, OutputExistsError


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU; ``cuda`` without a GPU is a clear error."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MergelabError(f"unknown device {name!r}", hint="use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergelabError("device cuda was asked for, but torch sees no CUDA GPU",
                            hint="use --device cpu (or auto), or install a CUDA build of torch")
    if dev.type not in ("cpu", "cuda"):
        raise MergelabError(f"device {name!r} is not supported", hint="use auto, cpu or cuda")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free for holding tensors on ``device`` (CPU: available RAM)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def cache_root() -> Path:
    """``$MERGELAB_CACHE`` if set, else ``~/.cache/mergelab``."""
    env = os.environ.get("MERGELAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mergelab"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; rename it to ``out_dir`` on success.

    On any error (including Ctrl-C) the temporary folder is deleted and ``out_dir`` is left as it
    was. An existing ``out_dir`` is refused with :class:`OutputExistsError` unless ``force``
    (then it is replaced only once the new output is complete); an existing *empty* folder is
    simply replaced, as nothing is lost.
    """
    out = Path(out_dir).absolute()
    check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.mergelab-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            old = out.parent / f".{out.name}.mergelab-old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_dir(out_dir: str | os.PathLike, force: bool) -> None:
    """Raise :class:`OutputExistsError` if ``out_dir`` exists (and is not empty) and not ``force``."""
    out = Path(out_dir)
    if force or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    raise OutputExistsError(f"output folder {out} already exists",
                            hint="choose another --out, or pass --force to replace it")


def atomic_write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
