"""Shared fixtures: tiny random models for speed, the embedded Gemma 3 270M for the slow real checks (the helpers
the tests import are in tests/support)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.models import load_hf_tokenizer, load_model, resolve_model
from support import TINY


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_source():
    return resolve_model(TINY, None, EngineConfig().cache_dir)


@pytest.fixture(scope="session")
def tokenizer(tiny_source):
    """transformers' tokenizer of the tiny model: the reference the tests compare against (the engine's own,
    engine.tokenizer.RustTokenizer, equals it: tests/pipeline/test_tokenizer.py)."""
    return load_hf_tokenizer(tiny_source.tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model(tiny_source, tokenizer):
    """The exact model the engine builds for random:tiny (seeded), for HF reference runs."""
    return load_model(tiny_source, torch.float32, "cpu", vocab_size=len(tokenizer))
