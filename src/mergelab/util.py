"""L0 — small shared helpers: natural sort key, device choice, free memory, cache root, sha256, atomic
outputs, the output-path guard, OS write errors as messages."""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import sys
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mergelab.errors import MergelabError, OutputExistsError, OutputPathError, OutputWriteError


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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this process counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True   # someone else's process (or a number we cannot ask about): keep its files
    return True


def remove_stale_temps(folder: Path, pattern: str) -> list[Path]:
    """Remove the entries of ``folder`` matching the glob ``pattern`` whose name ends in ``-PID``
    or ``-PID-XXXXXXXX`` of a process that is gone (killed, power cut); return those removed."""
    removed = []
    for tmp in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        m = re.search(r"-(\d+)(?:-[0-9a-f]{8})?$", tmp.name)
        if m is None or pid_alive(int(m.group(1))):
            continue
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        removed.append(tmp)
    return removed


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an output path that would destroy or change an input, with or without ``--force``.

    An output is never an input file or folder, never a folder holding an input (a model folder,
    an adapter, a data or recipe file) and never a path inside an input folder. Symbolic links
    are followed on both sides. Raises :class:`OutputPathError`.
    """
    o = Path(out).expanduser().resolve()
    for p in inputs:
        if p is None:
            continue
        q = Path(p).expanduser().resolve()
        if not q.exists():   # nothing there to destroy (a Hub id, or a path reported elsewhere)
            continue
        if o == q:
            where = f"is the input {p}"
        elif o in q.parents:
            where = f"holds the input {p}"
        elif q in o.parents and q.is_dir():
            where = f"lies inside the input folder {p}"
        else:
            continue
        raise OutputPathError(f"the output {out} {where}; writing there would destroy or change it",
                              hint="choose an output outside every input (models, adapters, data and recipe "
                                   "files); --force never overrides this")


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``out_dir``; rename it to ``out_dir`` on success.

    On any error (including Ctrl-C) the temporary folder is deleted and ``out_dir`` is left as it
    was. An existing ``out_dir`` is refused with :class:`OutputExistsError` unless ``force``
    (then it is replaced only once the new output is complete); an existing *empty* folder is
    simply replaced, as nothing is lost. An OS error of writing (disk full, read-only, ...) is
    raised as :class:`OutputWriteError`. The temporary folder ``.NAME.mergelab-tmp-PID-XXXX``
    carries this process's id: one left by a killed process (its pid gone) is removed here.
    """
    out = Path(out_dir).absolute()
    check_output_dir(out, force)
    tmp = out.parent / f".{out.name}.mergelab-tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent, f".{glob.escape(out.name)}.mergelab-tmp-*")
        if out.exists():   # a stale -old- is the previous output only while `out` is missing
            remove_stale_temps(out.parent, f".{glob.escape(out.name)}.mergelab-old-*")
        tmp.mkdir()
    except OSError as exc:
        mapped = OutputWriteError.from_os_error(exc, out, tmp, cleaned=True)
        if mapped is None:
            raise
        raise mapped from exc
    try:
        yield tmp
        old = None
        if out.is_symlink() or out.is_file():
            out.unlink()
        elif out.exists():
            old = out.parent / f".{out.name}.mergelab-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        mapped = OutputWriteError.from_os_error(exc, out, tmp, cleaned=True)
        if mapped is not None:
            raise mapped from exc
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
    """Write a file through a temporary beside it (``.NAME.tmp-PID``) and rename it into place;
    an OS error of writing is raised as :class:`OutputWriteError` and the temporary removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if isinstance(text, bytes):
            tmp.write_bytes(text)
        else:
            tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        mapped = OutputWriteError.from_os_error(exc, path, tmp, cleaned=True)
        if mapped is None:
            raise
        raise mapped from exc


def single_torch_thread() -> None:
    """Run torch single-threaded in the calling thread (a worker's initializer).

    ``torch.set_num_threads`` only reaches the OpenMP team of the thread that calls it: a worker
    thread started later would open a full team of its own, and workers × cores threads fight
    for the cores (matrix products and SVDs 20–1000× slower on a busy machine)."""
    torch.set_num_threads(1)


_M_MMAP_THRESHOLD = -3


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(param, int(value)))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def fixed_mmap_threshold(nbytes: int = 4 << 20):
    """Within the block, serve every heap allocation of ``nbytes`` or more from its own memory map
    (glibc only; elsewhere nothing changes).

    glibc raises its map threshold each time a large block is freed, after which blocks of many
    sizes (a method's masks and selections) come from the heap and fragment it: with transparent
    huge pages, a merge whose working set is ~100 MB was measured at 600–700 MB of peak RSS.
    A fixed threshold returns each large block to the system when it is freed. On exit the
    threshold is set to 32 MiB, the most glibc's own adjustment reaches.
    """
    applied = _mallopt(_M_MMAP_THRESHOLD, nbytes)
    try:
        yield applied
    finally:
        if applied:
            _mallopt(_M_MMAP_THRESHOLD, 32 << 20)
