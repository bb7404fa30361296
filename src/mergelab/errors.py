"""L0 — user-facing errors: one MergelabError family, each shown as one message with an exit status.

Every error a user can cause and fix derives from :class:`MergelabError`. The CLI prints its
message (what was wrong, where, what to do) without a traceback and exits with status 2.
"""
from __future__ import annotations


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
