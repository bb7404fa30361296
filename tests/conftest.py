"""Shared fixtures: tiny models of every family, built once per test session in seconds."""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

# The fixture models are tiny: one thread is fastest, and it keeps the suite quick when the
# machine is busy (several torch threads on a loaded 2-core machine spin and wait for each other).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``{family: FamilyZoo}`` with a base, three full experts and three LoRA adapters each."""
    from mergelab.testing import build_families

    return build_families(tmp_path_factory.mktemp("zoo"))


@pytest.fixture
def llama(zoo, tmp_path):
    """``(base, [expert 0, expert 1])``: a private copy of the llama fixture, for tests that change
    input files or name them in their outputs."""
    fz = zoo["llama"]
    base = shutil.copytree(fz.base, tmp_path / "base")
    experts = [shutil.copytree(e, tmp_path / f"e{i}") for i, e in enumerate(fz.experts[:2])]
    return base, experts
