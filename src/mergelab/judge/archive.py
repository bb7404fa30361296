"""Safe unpacking of a submission (a folder or a ``.tar.gz``) into a staging folder.

Refused, with the reason: absolute member names, ``..`` components, links (symbolic or hard)
whose target leaves the submission, device files and FIFOs, more than ``max_files`` files, more
than ``max_bytes`` unpacked, and an unpacked/packed ratio above ``max_ratio`` (a decompression
bomb). Links that stay inside are written as plain copies of their target. Files are written by
this module (never ``tarfile.extractall``), each one checked to land inside the staging folder.
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from mergelab.errors import MergelabError

_CHUNK = 1 << 20


class UnsafeSubmissionError(MergelabError):
    """A submission archive or folder that the judge refuses to unpack (the reason says why)."""


@dataclass(frozen=True)
class Caps:
    max_bytes: int = 2 << 30
    max_files: int = 1000
    max_ratio: float = 200.0


def _clean(name: str) -> str:
    """A member name as a safe relative POSIX path, or raise."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UnsafeSubmissionError(f"refused: absolute path {name!r} in the submission")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeSubmissionError(f"refused: {name!r} climbs out of the submission ('..')")
    clean = posixpath.normpath("/".join(p for p in parts if p not in ("", ".")) or ".")
    return clean


def _inside(base: str, target: str) -> str | None:
    """``target`` (relative to the archive root) normalised, or None when it leaves the root."""
    if target.startswith("/"):
        return None
    joined = posixpath.normpath(posixpath.join(base, target))
    return None if joined == ".." or joined.startswith(("../", "/")) else joined


def _write(dest: Path, rel: str, src, budget: list[int], caps: Caps) -> None:
    out = (dest / rel)
    root = dest.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    if not str(out.parent.resolve()).startswith(str(root)):
        raise UnsafeSubmissionError(f"refused: {rel!r} would be written outside the submission")
    with open(out, "xb") as fh:
        while block := src.read(_CHUNK):
            budget[0] += len(block)
            if budget[0] > caps.max_bytes:
                raise UnsafeSubmissionError(f"refused: more than {caps.max_bytes} bytes unpacked")
            fh.write(block)


def unpack_tar(archive: Path, dest: Path, caps: Caps = Caps()) -> None:
    """Unpack a ``.tar.gz`` (or plain ``.tar``) into the empty folder ``dest``, or raise."""
    packed = max(archive.stat().st_size, 1)
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise UnsafeSubmissionError(f"refused: {archive.name} is not a readable tar archive ({exc})") from None
    with tf:
        members: dict[str, tarfile.TarInfo] = {}
        declared = 0
        try:
            for m in tf:                       # streaming: caps are checked member by member
                rel = _clean(m.name)
                if m.isdev() or m.ischr() or m.isblk() or m.isfifo():
                    raise UnsafeSubmissionError(f"refused: {m.name!r} is a device file or FIFO")
                if m.issym() or m.islnk():
                    base = posixpath.dirname(rel) if m.issym() else ""
                    target = _inside(base, m.linkname)
                    if target is None:
                        raise UnsafeSubmissionError(
                            f"refused: link {m.name!r} -> {m.linkname!r} points outside the submission")
                elif not (m.isfile() or m.isdir()):
                    raise UnsafeSubmissionError(f"refused: {m.name!r} is not a file or folder")
                members[rel] = m
                declared += m.size if m.isfile() else 0
                if len(members) > caps.max_files:
                    raise UnsafeSubmissionError(f"refused: more than {caps.max_files} entries")
                if declared > caps.max_bytes:
                    raise UnsafeSubmissionError(f"refused: more than {caps.max_bytes} bytes unpacked")
                if declared / packed > caps.max_ratio:
                    raise UnsafeSubmissionError(
                        f"refused: unpacks to more than {caps.max_ratio:g} times its packed size "
                        "(a decompression bomb?)")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UnsafeSubmissionError(f"refused: {archive.name} is a damaged archive ({exc})") from None
        budget = [0]
        for rel, m in members.items():
            if m.isdir() or rel == ".":
                (dest / rel).mkdir(parents=True, exist_ok=True)
                continue
            src_member = m
            seen = 0
            while src_member.issym() or src_member.islnk():   # follow links inside the archive
                base = posixpath.dirname(_clean(src_member.name)) if src_member.issym() else ""
                target = _inside(base, src_member.linkname)
                src_member = members.get(target) if target else None
                seen += 1
                if src_member is None or seen > 16:
                    raise UnsafeSubmissionError(f"refused: link {m.name!r} does not name a file of the submission")
            if src_member.isdir():
                raise UnsafeSubmissionError(f"refused: link {m.name!r} names a folder")
            fh = tf.extractfile(src_member)
            if fh is None:
                raise UnsafeSubmissionError(f"refused: cannot read {m.name!r}")
            _write(dest, rel, fh, budget, caps)


def copy_folder(folder: Path, dest: Path, caps: Caps = Caps()) -> None:
    """Copy a submission folder into ``dest`` under the same rules as an archive."""
    root = folder.resolve()
    entries = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            rel = p.relative_to(folder).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                target = p.resolve()
                if not str(target).startswith(str(root) + os.sep) or not target.is_file():
                    raise UnsafeSubmissionError(f"refused: link {rel!r} points outside the submission "
                                                "(or not to a file)")
                st = target.stat()
            elif stat.S_ISDIR(st.st_mode):
                continue
            elif not stat.S_ISREG(st.st_mode):
                raise UnsafeSubmissionError(f"refused: {rel!r} is a device file, FIFO or socket")
            entries.append((rel, p))
            total += st.st_size
            if len(entries) > caps.max_files:
                raise UnsafeSubmissionError(f"refused: more than {caps.max_files} files")
            if total > caps.max_bytes:
                raise UnsafeSubmissionError(f"refused: more than {caps.max_bytes} bytes")
    budget = [0]
    for rel, p in entries:
        with open(p, "rb") as src:
            _write(dest, rel, src, budget, caps)


def unpack(submission: str | Path, dest: str | Path, caps: Caps = Caps()) -> None:
    """Unpack a submission folder or archive into the new folder ``dest`` (removed again on refusal)."""
    submission, dest = Path(submission), Path(dest)
    dest.mkdir(parents=True)
    try:
        if submission.is_dir():
            copy_folder(submission, dest, caps)
        elif submission.is_file():
            unpack_tar(submission, dest, caps)
        else:
            raise UnsafeSubmissionError(f"{submission} does not exist")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
