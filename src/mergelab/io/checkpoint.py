"""Checkpoints on disk: a lazy safetensors reader, a streaming sharded writer, atomic output folders.

Reading. :class:`CheckpointReader` opens a Hugging Face model folder (sharded safetensors with
``model.safetensors.index.json``, or one ``model.safetensors``) or a single ``.safetensors`` file.
It parses only the safetensors headers up front (the format is an 8-byte little-endian header
length, a JSON header giving each tensor's dtype, shape and byte range, then the raw bytes) and
reads one tensor's bytes when asked, with ``pread`` into a tensor it owns. Unlike a memory map
this keeps the file's pages out of the process' resident set, so peak memory follows the tensors
in flight, not the model size, and :meth:`CheckpointReader.read_into` can refill a buffer the
caller reuses. Pickle weights (``pytorch_model.bin``, ``*.pt``) are refused, never unpickled.

Writing. :class:`ShardedWriter` writes safetensors shards plus ``model.safetensors.index.json``
(or one ``model.safetensors`` when everything fits in one shard). Given the ``layout`` (names,
shapes, dtypes) up front, it writes every shard header at once and each tensor's bytes straight to
its place as it arrives, holding nothing; without a layout it keeps the current shard in memory,
as ``save_pretrained`` does. Both give the same bytes for the same tensors in the same order.

:func:`atomic_output_dir` gives a temporary folder that is renamed into place on success and
deleted on any error, so a failed merge never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import struct
import threading
from pathlib import Path, PurePosixPath
from typing import Iterable, Protocol, Sequence, runtime_checkable

import torch

from mergelab.errors import CheckpointError
from mergelab.io.jsonfile import clip, parse_json, read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_SIZE = 5 * 1000**3  # bytes, as transformers' save_pretrained

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", ".npz") + PICKLE_SUFFIXES
_MAX_HEADER = 100_000_000  # bytes, as the safetensors library
_MAX_DIMS = 32


@runtime_checkable
class TensorSource(Protocol):
    """Anything that yields named tensors one at a time: a checkpoint, a LoRA-adapted base, ..."""

    def keys(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a CPU tensor in its stored dtype."""
        ...


# ----------------------------------------------------------------------------------------- reading


class _TensorInfo:
    __slots__ = ("file", "dtype", "shape", "start", "nbytes")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, nbytes: int):
        self.file, self.dtype, self.shape, self.start, self.nbytes = file, dtype, shape, start, nbytes


def read_safetensors_header(file: Path) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Parse one safetensors header: ``({name: info}, metadata)``; a broken file is a CheckpointError.

    Everything is checked before use, in time and memory bounded by the header length (at most
    100 MB, as the safetensors library allows): the JSON (no duplicate keys, no NaN, bounded
    nesting), each tensor's dtype, shape (at most 32 whole numbers ≥ 0) and byte range (inside the
    data, exactly dtype size × number of elements, no two tensors overlapping), and the metadata
    (text to text).
    """
    try:
        st = file.stat()
        if not stat.S_ISREG(st.st_mode):   # a pipe or device would block or never end
            raise ValueError("not a regular file")
        size = st.st_size
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise ValueError(f"header length {n:,} bytes is more than the {_MAX_HEADER:,} the format allows")
            if n > size - 8:
                raise ValueError(f"header length {n:,} bytes does not fit the file ({size:,} bytes)")
            raw = fh.read(n)
        if len(raw) != n:
            raise ValueError("the file ends inside its header")
        header = parse_json(raw, allow_nan=False, unique_keys=True)
        infos, meta = _parse_header(header, file, data_start=8 + n, data_len=size - 8 - n)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc.strerror or exc})",
                              hint="check that the file exists and is readable") from None
    except ValueError as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})",
                              hint="re-download or re-save this file") from None
    return infos, meta


def _parse_header(header: object, file: Path, *, data_start: int, data_len: int
                  ) -> tuple[dict[str, _TensorInfo], dict[str, str]]:
    """Validate a parsed header (raises ValueError saying which tensor and what is wrong)."""
    if not isinstance(header, dict):
        raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ValueError(f"__metadata__ must map names to text, got {clip(meta)}")
    infos: dict[str, _TensorInfo] = {}
    for name, h in header.items():
        where = f"tensor {clip(name)}"
        if not isinstance(h, dict):
            raise ValueError(f"{where}: expected {{dtype, shape, data_offsets}}, got {clip(h)}")
        dt, shape, offsets = h.get("dtype"), h.get("shape"), h.get("data_offsets")
        if not isinstance(dt, str) or dt not in _ST_DTYPES:
            raise ValueError(f"{where}: unsupported dtype {clip(dt)} (known: {', '.join(_ST_DTYPES)})")
        if (not isinstance(shape, list) or len(shape) > _MAX_DIMS
                or not all(type(d) is int and 0 <= d < 2**63 for d in shape)):
            raise ValueError(f"{where}: shape must be a list of at most {_MAX_DIMS} whole numbers "
                             f"≥ 0, got {clip(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(x) is int for x in offsets):
            raise ValueError(f"{where}: data_offsets must be [begin, end] (two whole numbers), got {clip(offsets)}")
        dtype, (begin, end) = _ST_DTYPES[dt], offsets
        expect = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end <= data_len:
            raise ValueError(f"{where}: byte range [{begin}, {end}) lies outside the {data_len:,} bytes "
                             "of tensor data in the file")
        if end - begin != expect:
            raise ValueError(f"{where}: byte range [{begin}, {end}) holds {end - begin:,} bytes, but "
                             f"{dt} × shape {shape} needs {expect:,}")
        infos[name] = _TensorInfo(file, dtype, tuple(shape), data_start + begin, end - begin)
    spans = sorted((i.start, i.start + i.nbytes, name) for name, i in infos.items() if i.nbytes)
    for (_, end0, name0), (begin1, _, name1) in zip(spans, spans[1:]):
        if begin1 < end0:
            raise ValueError(f"tensors {clip(name0)} and {clip(name1)} overlap in the file")
    return infos, meta


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"unexpected end of file at offset {offset + done}")
        done += got


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pickle_error(path: Path, found: Sequence[Path]) -> CheckpointError:
    names = ", ".join(sorted(p.name for p in found)[:3])
    return CheckpointError(
        f"{path}: has only pickle weights ({names}); mergelab reads safetensors only and never "
        "unpickles a file (a pickle can run arbitrary code)",
        hint="convert it once, in an environment you trust: python -c \"from transformers import "
             f"AutoModelForCausalLM as M; M.from_pretrained('{path}').save_pretrained("
             f"'{path}-safetensors', safe_serialization=True)\" (AutoModelForSeq2SeqLM for T5), "
             "or use the safetensors version of the model on the Hub (a 'refs/pr' or "
             "'safetensors' revision)")


class CheckpointReader:
    """Lazy reader of a safetensors checkpoint (folder or file); implements :class:`TensorSource`.

    Accepts a folder with ``model.safetensors.index.json`` (sharded), a folder with
    ``model.safetensors``, a folder with other ``*.safetensors`` files (their union), or one
    ``.safetensors`` file. Only headers are read on open; ``get`` reads one tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        p = self.path
        if not p.exists():
            raise CheckpointError(f"{p}: no such file or folder",
                                  hint="check the path in the recipe (relative paths are relative to the recipe file)")
        files = self._weight_files(p)
        self._infos: dict[str, _TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        index = p / INDEX_NAME if p.is_dir() else None
        if index is not None and index.is_file():
            self._open_index(index)
        else:
            for f in files:
                infos, meta = read_safetensors_header(f)
                self.metadata.update(meta)
                for name, info in infos.items():
                    if name in self._infos:
                        raise CheckpointError(f"{p}: tensor {name!r} is stored twice "
                                              f"({self._infos[name].file.name} and {f.name})")
                    self._infos[name] = info
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()  # reads may come from several threads (pread itself is safe)
        self.config: dict | None = None
        cfg = p / "config.json" if p.is_dir() else None
        if cfg is not None and cfg.is_file():
            try:
                config = read_json(cfg)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"{cfg}: cannot be read as a model config ({exc})",
                                      hint="re-download or re-save the model's config.json") from None
            if not isinstance(config, dict):
                raise CheckpointError(f"{cfg}: a model config is a JSON object, got {type(config).__name__}",
                                      hint="re-download or re-save the model's config.json")
            self.config = config

    @staticmethod
    def _weight_files(p: Path) -> list[Path]:
        if p.is_file():
            if p.suffix == ".safetensors":
                return [p]
            if p.suffix in PICKLE_SUFFIXES:
                raise _pickle_error(p, [p])
            raise CheckpointError(f"{p}: not a .safetensors file or a model folder")
        if (p / INDEX_NAME).is_file():
            return []
        if (p / SINGLE_NAME).is_file():
            return [p / SINGLE_NAME]
        st = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith("adapter_"))
        if st:
            return st
        pickles = [f for f in p.iterdir() if f.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_error(p, pickles)
        if (p / "adapter_config.json").is_file():
            raise CheckpointError(f"{p}: is a PEFT adapter, not a full model",
                                  hint="use it as an expert (LoRA experts are supported), not as the base")
        raise CheckpointError(f"{p}: no model weights found (expected {INDEX_NAME}, {SINGLE_NAME} "
                              "or *.safetensors)")

    def _open_index(self, index: Path) -> None:
        try:
            data = read_json(index)
            if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
                raise ValueError("it has no weight_map object")
            weight_map = data["weight_map"]
            bad = next((v for v in weight_map.values() if not isinstance(v, str) or not v), None)
            if bad is not None:
                raise ValueError(f"weight_map names the shard {clip(bad)}, not a file name")
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{index}: broken index file ({exc})",
                                  hint="re-download the model, or delete the index if the folder has one "
                                       "model.safetensors") from None
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            f = (index.parent / fname)
            # Judge the name, not where it resolves to: the Hub cache keeps shards as symbolic
            # links into its blob store, which is fine; an index naming "../x" or "/x" is not.
            rel = PurePosixPath(fname.replace("\\", "/"))
            if rel.is_absolute() or ".." in rel.parts:
                raise CheckpointError(f"{index}: shard {fname!r} lies outside the model folder")
            if not f.is_file():
                raise CheckpointError(f"{index}: lists shard {fname!r}, which is missing",
                                      hint="the download is incomplete; fetch the missing shard")
            infos, meta = read_safetensors_header(f)
            self.metadata.update(meta)
            for name in names:
                if name not in infos:
                    raise CheckpointError(f"{index}: says tensor {name!r} is in {fname}, but it is not")
                self._infos[name] = infos[name]

    # --- TensorSource
    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def _info(self, name: str) -> _TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name).dtype

    def nbytes(self, name: str) -> int:
        return self._info(name).nbytes

    def get(self, name: str) -> torch.Tensor:
        info = self._info(name)
        out = torch.empty(info.shape, dtype=info.dtype)
        self._read(info, out)
        return out

    def get_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` (first dimension) of tensor ``name``, reading only their bytes."""
        info = self._info(name)
        row = math.prod(info.shape[1:]) if info.shape else 1
        out = torch.empty(max((r1 - r0) * row, 0), dtype=info.dtype)
        return self.read_rows_into(name, r0, r1, out)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read ``name`` into ``out`` (a contiguous CPU tensor of at least its size, any dtype).

        Returns a view of ``out`` with the tensor's shape and dtype. Lets a caller reuse buffers.
        """
        info = self._info(name)
        if out.numel() * out.element_size() < info.nbytes:
            raise ValueError(f"buffer of {out.numel() * out.element_size()} bytes is too small for "
                             f"{name!r} ({info.nbytes} bytes)")
        flat = out.reshape(-1).view(torch.uint8)[: info.nbytes]
        view = flat.view(info.dtype).view(info.shape) if info.nbytes else torch.empty(info.shape, dtype=info.dtype)
        self._read(info, view)
        return view

    def read_rows_into(self, name: str, r0: int, r1: int, out: torch.Tensor) -> torch.Tensor:
        """Read rows ``[r0, r1)`` (first dimension) of ``name`` into ``out``, as :meth:`read_into`.

        Only those rows' bytes are read (one positional read): a slice of a tensor costs the
        slice's memory, not the tensor's.
        """
        info = self._info(name)
        shape = info.shape if info.shape else (1,)
        if not 0 <= r0 <= r1 <= shape[0]:
            raise ValueError(f"rows [{r0}, {r1}) are outside {name!r} of shape {info.shape}")
        row = math.prod(shape[1:]) * info.dtype.itemsize
        nbytes = (r1 - r0) * row
        if out.numel() * out.element_size() < nbytes:
            raise ValueError(f"buffer of {out.numel() * out.element_size()} bytes is too small for "
                             f"{r1 - r0} rows of {name!r} ({nbytes} bytes)")
        flat = out.reshape(-1).view(torch.uint8)[:nbytes]
        view_shape = (r1 - r0, *shape[1:])
        view = flat.view(info.dtype).view(view_shape) if nbytes else torch.empty(view_shape, dtype=info.dtype)
        self._read(_TensorInfo(info.file, info.dtype, view_shape, info.start + r0 * row, nbytes), view)
        return view

    def _read(self, info: _TensorInfo, out: torch.Tensor) -> None:
        if info.nbytes == 0:
            return
        with self._lock:
            fd = self._fds.get(info.file)
            if fd is None:
                fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        try:
            _pread_into(fd, _byte_view(out), info.start)
        except OSError as exc:
            raise CheckpointError(f"{info.file}: read failed ({exc})") from None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:  # no module globals here: at interpreter exit they may already be gone
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._infos)} tensors)"


# ----------------------------------------------------------------------------------------- writing


def parse_size(value: int | str) -> int:
    """``"5GB"`` → 5_000_000_000, ``"2GiB"`` → 2·1024³, ``"500MB"``, ``"60KB"``, or an int of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    text = str(value).upper() if isinstance(value, (str, float)) else ""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)B?\s*", text) if len(text) <= 40 else None
    if not m or not 0 < float(m.group(1)) < 1e30:
        raise ValueError(f"not a size: {clip(value)} (use e.g. 5GB, 500MB, 2GiB or a number of bytes)")
    base = 1024 if m.group(3) else 1000
    size = int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
    if size < 1:
        raise ValueError(f"size must be at least 1 byte, got {clip(value)}")
    return size


class _Shard:
    __slots__ = ("index", "entries", "size", "file", "offsets", "data_start")

    def __init__(self, index: int = 0):
        self.index = index
        self.entries: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []  # name, shape, dtype, nbytes
        self.size = 0
        self.file = ""
        self.offsets: dict[str, int] = {}
        self.data_start = 0


def _header_bytes(shard: _Shard, metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    """The padded header of a shard and each tensor's byte offset in the data section.

    Tensors are laid out by decreasing element size, then in the order given, so every tensor
    starts aligned to its element size (the safetensors format allows no gaps).
    """
    order = sorted(range(len(shard.entries)), key=lambda i: (-shard.entries[i][2].itemsize, i))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offsets, pos = {}, 0
    for i in order:
        name, shape, dtype, nbytes = shard.entries[i]
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[name] = pos
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardedWriter:
    """Write tensors into safetensors shards as they come, plus the index file.

    ``shard_size_bytes`` bounds the tensor bytes of one shard (a larger tensor gets a shard of
    its own). With ``layout`` — ``[(name, shape, dtype), ...]`` in write order — the shards are
    planned up front and each :meth:`add` writes straight to disk; tensors may then arrive in any
    order. Without it, the current shard is kept in memory until full. :meth:`close` finishes
    the files and returns the index (``{"metadata": {"total_size": N}, "weight_map": {...}}``).
    The bytes depend only on the tensors, their order and the shard size.
    """

    def __init__(self, out_dir: str | os.PathLike, shard_size_bytes: int | str = DEFAULT_SHARD_SIZE, *,
                 layout: Iterable[tuple[str, Sequence[int], torch.dtype]] | None = None,
                 metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = parse_size(shard_size_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._shards: list[_Shard] = []
        self._closed = False
        self._planned = layout is not None
        self._where: dict[str, _Shard] = {}
        self._entry: dict[str, tuple] = {}
        self._pending: dict[str, torch.Tensor] = {}  # unplanned: tensors of the open shard
        self._written: set[str] = set()  # planned: tensors already on disk
        self._rows: dict[str, int] = {}  # planned: rows written so far of tensors written in blocks
        self._remaining: dict[int, int] = {}
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()  # planned mode: add() may be called from several threads
        if layout is not None:
            for name, shape, dtype in layout:
                self._place(name, tuple(int(d) for d in shape), dtype)
            self._name_shards()
            for i, shard in enumerate(self._shards):
                self._remaining[i] = len(shard.entries)

    # shard planning, shared by both modes so that they give the same bytes
    def _place(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Shard | None:
        """Put a tensor into the open shard (or a new one); returns the shard it closed, if any."""
        if name in self._where:
            raise ValueError(f"tensor {name!r} written twice")
        if dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = math.prod(shape) * dtype.itemsize
        closed = None
        if not self._shards or (self._shards[-1].entries and self._shards[-1].size + nbytes > self.shard_size):
            closed = self._shards[-1] if self._shards else None
            self._shards.append(_Shard(len(self._shards)))
        shard = self._shards[-1]
        shard.entries.append((name, shape, dtype, nbytes))
        shard.size += nbytes
        self._where[name] = shard
        self._entry[name] = shard.entries[-1]
        return closed

    def _name_shards(self) -> None:
        n = len(self._shards)
        for i, shard in enumerate(self._shards):
            shard.file = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (any device; it is written as stored, in its own dtype)."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if self._planned:
            self._write_planned(name, t)
            return
        closed = self._place(name, tuple(t.shape), t.dtype)
        if closed is not None:
            self._flush(closed)
        self._pending[name] = t

    def _write_planned(self, name: str, t: torch.Tensor) -> None:
        shard = self._where.get(name)
        if shard is None:
            raise ValueError(f"tensor {name!r} is not in the planned layout")
        entry = self._entry[name]
        if tuple(t.shape) != entry[1] or t.dtype != entry[2]:
            raise ValueError(f"tensor {name!r}: got {tuple(t.shape)} {t.dtype}, planned {entry[1]} {entry[2]}")
        i = shard.index
        with self._lock:
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            if name in self._rows:
                raise ValueError(f"tensor {name!r} written twice (row blocks of it already were)")
            self._written.add(name)
            fd = self._open_shard(shard)
        if entry[3]:  # positional writes to disjoint ranges: no lock needed
            _pwrite_all(fd, _byte_view(t), shard.data_start + shard.offsets[name])
        with self._lock:
            self._remaining[i] -= 1
            if self._remaining[i] == 0:
                os.close(self._fds.pop(i))

    def add_rows(self, name: str, r0: int, rows: torch.Tensor) -> None:
        """Write rows ``[r0, r0 + len(rows))`` of a planned tensor (blocks may come in any order).

        The tensor counts as written when all its rows are; a row block written twice is refused.
        """
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        if not self._planned:
            raise RuntimeError("add_rows needs a planned layout")
        shard = self._where.get(name)
        if shard is None:
            raise ValueError(f"tensor {name!r} is not in the planned layout")
        _, shape, dtype, nbytes = self._entry[name]
        t = rows.detach().cpu().contiguous() if rows.device.type != "cpu" else rows.detach().contiguous()
        n_rows = shape[0] if shape else 1
        if t.dtype != dtype or tuple(t.shape[1:]) != tuple(shape[1:]) or not 0 <= r0 <= r0 + t.shape[0] <= n_rows:
            raise ValueError(f"tensor {name!r}: rows {r0}+{tuple(t.shape)} {t.dtype} do not fit {shape} {dtype}")
        row_bytes = nbytes // n_rows if n_rows else 0
        i = shard.index
        with self._lock:
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            done = self._rows.setdefault(name, 0)
            fd = self._open_shard(shard)
        if t.numel():
            _pwrite_all(fd, _byte_view(t), shard.data_start + shard.offsets[name] + r0 * row_bytes)
        with self._lock:
            self._rows[name] = done = self._rows[name] + t.shape[0]
            if done > n_rows:
                raise ValueError(f"tensor {name!r}: more rows written than it has")
            if done == n_rows:
                self._written.add(name)
                self._remaining[i] -= 1
                if self._remaining[i] == 0:
                    os.close(self._fds.pop(i))

    def _open_shard(self, shard: _Shard) -> int:
        """The open file of a planned shard, created with its header on first use (lock held)."""
        fd = self._fds.get(shard.index)
        if fd is None:
            header, shard.offsets = _header_bytes(shard, self.metadata)
            shard.data_start = len(header)
            fd = self._fds[shard.index] = os.open(self.out_dir / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.ftruncate(fd, len(header) + shard.size)
            _pwrite_all(fd, memoryview(header), 0)
        return fd

    def _flush(self, shard: _Shard) -> None:
        header, offsets = _header_bytes(shard, self.metadata)
        shard.file = f"model-{shard.index + 1:05d}.safetensors.partial"
        order = sorted(shard.entries, key=lambda e: offsets[e[0]])
        with open(self.out_dir / shard.file, "wb") as fh:
            fh.write(header)
            for name, *_ in order:
                fh.write(_byte_view(self._pending.pop(name)))

    def close(self) -> dict:
        """Finish every shard, write the index (when sharded); return the index dict."""
        if self._closed:
            raise RuntimeError("ShardedWriter is closed")
        self._closed = True
        if self._planned:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            missing = [e[0] for s in self._shards for e in s.entries if e[0] not in self._written]
            if missing:
                raise RuntimeError(f"ShardedWriter closed before {len(missing)} planned tensors were "
                                   f"written (first: {missing[0]!r})")
        else:
            if self._shards and self._pending:
                self._flush(self._shards[-1])
            partial = [s.file for s in self._shards]
            self._name_shards()
            for shard, old in zip(self._shards, partial):
                os.replace(self.out_dir / old, self.out_dir / shard.file)
        self._pending.clear()
        weight_map = {e[0]: s.file for s in self._shards for e in s.entries}
        index = {"metadata": {"total_size": sum(s.size for s in self._shards)},
                 "weight_map": dict(sorted(weight_map.items()))}
        if len(self._shards) > 1:
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        elif not self._shards:  # nothing added: still a valid, empty checkpoint
            header, _ = _header_bytes(_Shard(), self.metadata)
            (self.out_dir / SINGLE_NAME).write_bytes(header)
        return index

    def abort(self) -> None:
        """Close open files without finishing (the caller deletes the folder)."""
        self._closed = True
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        self._pending.clear()


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


# ---------------------------------------------------------------------------------- output folders


def copy_model_files(base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """Copy everything of a model folder that is not weights; return the names copied.

    That is config.json, generation_config.json, tokenizer files, chat templates, licence files
    and the like. Skipped: weights and their index files, sub-folders, hidden files, and the
    base's README.md (its model card describes the base, not the merge).
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if not base_dir.is_dir():
        return []
    copied = []
    for f in sorted(base_dir.iterdir()):
        name = f.name
        if (not f.is_file() or name.startswith(".") or name.endswith(WEIGHT_SUFFIXES)
                or name.endswith(".index.json") or name == "README.md"):
            continue
        shutil.copyfile(f, out_dir / name)
        copied.append(name)
    return copied
