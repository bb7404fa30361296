"""mergelab: merge language models and LoRA adapters, check competition rules, evaluate."""
from __future__ import annotations

__version__ = "0.1.0"

from mergelab.errors import MergelabError  # noqa: E402

__all__ = ["MergelabError", "__version__"]
