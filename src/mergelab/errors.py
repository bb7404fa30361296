"""L0 — user-facing errors: one MergelabError family, each shown as one message with an exit status.

Every error a user can cause and fix derives from :class:`MergelabError`. The CLI prints its
message (what was wrong, where, what to do) without a traceback and exits with status 2.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path


class MergelabError(Exception):
    """Base class of all errors caused by user input or environment, not by a bug."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # the text the CLI shows
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class RecipeError(MergelabError):
    """A recipe (YAML/JSON) is malformed or has a wrong value."""


class CheckpointError(MergelabError):
    """A model folder cannot be read: missing files, pickle-only weights, broken index."""


class ShapeMismatchError(MergelabError):
    """Tensors that must align across base and experts differ in name, shape or dtype."""


class AdapterError(MergelabError):
    """A PEFT adapter is unsupported or inconsistent with the base model."""


class OutputExistsError(MergelabError):
    """The output folder exists and --force was not given."""


class OutputPathError(MergelabError):
    """The output path is, holds, or lies inside one of the inputs (writing there would destroy it)."""


class OutputWriteError(MergelabError):
    """Writing an output failed in the operating system (disk full, read-only, no permission)."""

    @classmethod
    def from_os_error(cls, exc: BaseException, *outputs: str | os.PathLike,
                      cleaned: bool = False) -> "OutputWriteError | None":
        """``exc`` as one message naming the output, when it is an OS error of writing: disk full,
        quota, file size limit, read-only file system (any file), or permission denied on one of
        ``outputs`` (or a path inside one); None for any other error (e.g. one reading an input).
        ``cleaned``: the caller removed what was written (the message says so)."""
        if not isinstance(exc, OSError):
            return None
        known = _WRITE_ERRNOS.get(exc.errno)
        name = Path(os.fsdecode(exc.filename)).absolute() if isinstance(exc.filename, (str, bytes, os.PathLike)) else None
        if known is None and exc.errno in _DENIED_ERRNOS and name is not None and any(
                name == Path(o).absolute() or Path(o).absolute() in name.parents for o in outputs):
            known = _DENIED_ERRNOS[exc.errno]
        if known is None:
            return None
        reason, hint = known
        target = str(outputs[0]) if outputs else (str(name) if name is not None else "an output file")
        at = f" (at {name})" if name is not None and str(name) != target else ""
        left = "; nothing half-written was left behind" if cleaned else ""
        return cls(f"could not write {target}: {reason}{at}{left}", hint=hint)


# OS errors that only writing causes, whatever the file ...
_WRITE_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space on that disk, or choose an output on another disk"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within your quota, or choose an output on another disk"),
    errno.EFBIG: ("a file would exceed the file size limit", "raise the limit (ulimit -f), or choose an output "
                                                             "on a file system that allows large files"),
    errno.EROFS: ("the file system is read-only", "choose an output (--out) on a writable disk"),
}
# ... and those that writing causes when they name a file of the output.
_DENIED_ERRNOS = {
    errno.EACCES: ("permission denied", "choose an output (--out) in a folder you may write to, or fix its "
                                        "permissions"),
    errno.EPERM: ("operation not permitted", "choose an output (--out) in a folder you may write to, or fix "
                                             "its permissions"),
}


class NonFiniteError(MergelabError):
    """A tensor of an input, or of the merged result, holds NaN or infinite values."""


class ModelMismatchError(MergelabError):
    """An expert is not of the base's model (another architecture or size, or an adapter of another base)."""


class DataError(MergelabError):
    """An evaluation CSV file is malformed (names the file and row id)."""


class SourceError(MergelabError):
    """A model reference cannot be resolved (hub unreachable, 404, bad revision)."""


class RuleCheckError(MergelabError):
    """The competition rule check could not run, or a run was refused by it."""


class BudgetError(MergelabError):
    """A plan does not fit the compute budget."""


class ReproducibilityError(MergelabError):
    """A reproduced run differs from its manifest."""
