"""JSON a user's file brings (safetensors headers, index and config files, adapter configs,
manifests), parsed in bounded time and memory: any input gives a value or one ``ValueError`` that
says what is wrong, never a ``RecursionError``, ``UnicodeDecodeError`` or ``OverflowError``.

The caller turns the ``ValueError`` into its own :class:`~mergelab.errors.MergelabError` kind
(with the file's path), so each message names the file and the kind of file it should have been.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import reprlib
from pathlib import Path
from typing import Any

#: the largest JSON file read whole (a sharded index or a manifest is a few MB at most)
MAX_JSON_BYTES = 64 * 1024 * 1024


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {clip(dup)} appears twice in one object")
    return out


def clip(value: Any, n: int = 60) -> str:
    """``repr(value)`` cut to about ``n`` characters, for messages (a field may be megabytes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"a number of about {int(value.bit_length() * 0.30103)} digits"
    short = reprlib.Repr()  # bounded depth and length: a value may be nested 900 deep
    short.maxlevel, short.maxstring, short.maxother, short.maxlong = 3, n, n, n
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    try:
        text = short.repr(value)
    except (ValueError, RecursionError):  # an int of over 4300 digits inside a container
        text = f"a {type(value).__name__}"
    return text if len(text) <= n else text[: n - 3] + "..."


def parse_json(raw: bytes | str, *, allow_nan: bool = True, unique_keys: bool = False) -> Any:
    """Parse JSON text (bytes must be UTF-8; a byte-order mark is skipped).

    ``allow_nan=False`` refuses ``NaN``/``Infinity``, which Python's json accepts but JSON does
    not; ``unique_keys`` refuses an object that names a key twice (json keeps the last silently).
    Nesting deeper than Python's recursion limit, invalid UTF-8, numbers too long to convert
    and exhausted memory all become one ``ValueError``.
    """
    try:
        text = raw.decode("utf-8-sig") if isinstance(raw, (bytes, bytearray)) else raw
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(text, parse_constant=None if allow_nan else _no_constant,
                          object_pairs_hook=_unique_keys if unique_keys else None)
    except RecursionError:
        raise ValueError("nested too deeply to be a JSON file mergelab reads") from None
    except MemoryError:
        raise ValueError("too large to parse in memory") from None
    except ValueError as exc:  # JSONDecodeError, too many digits, the constants above
        why = "a number has more than 4300 digits" if "integer string conversion" in str(exc) else exc
        raise ValueError(f"not valid JSON ({why})") from None


def read_json(path: str | os.PathLike, *, max_bytes: int = MAX_JSON_BYTES, allow_nan: bool = True) -> Any:
    """Read and parse a JSON file of at most ``max_bytes``; ``OSError`` passes through."""
    path = Path(path)
    st = path.stat()
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    if not stat.S_ISREG(st.st_mode):   # a pipe or device would block or never end
        raise ValueError("is not a regular file")
    size = st.st_size
    if size > max_bytes:
        raise ValueError(f"is {size:,} bytes, more than the {max_bytes:,} such a file can be")
    with open(path, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:  # grew while we read it
        raise ValueError(f"is more than the {max_bytes:,} bytes such a file can be")
    return parse_json(raw, allow_nan=allow_nan)
