"""What an engine core's import of transformers may skip: modules for features the core never runs, and the
installed-distributions scan, answered from a record under the cache dir. Changes nothing the engine computes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

from engine.models import cached_record

UNUSED_PACKAGES = ("sklearn", "scipy")  # what transformers imports at start-up for features a core never runs


def skip_unused_imports(cache_dir: str | None = None) -> None:
    """Tell transformers, in an engine core's process, that scikit-learn and SciPy are absent. transformers 5.17
    imports scikit-learn (with scipy and pandas: 3 s of a core's start-up on one GPU host) when its
    assisted-generation module loads, for the assistant's confidence threshold, and scipy.optimize (~1 s) for the
    object-detection losses: the engine never calls `generate` or computes a loss, and no causal LM's forward uses
    either. With `cache_dir`, transformers' import also reads its map of installed distributions from there
    (`distributions_from`). Changes nothing the engine computes. Only before those modules load."""
    import sys

    if "transformers.generation.candidate_generator" in sys.modules:
        return
    with distributions_from(cache_dir) if cache_dir and "transformers" not in sys.modules else contextlib.nullcontext():
        import transformers.utils as hf_utils
        import transformers.utils.import_utils as hf_import_utils

    for module in (hf_utils, hf_import_utils):
        for package in UNUSED_PACKAGES:
            if hasattr(module, f"is_{package}_available"):
                setattr(module, f"is_{package}_available", _absent)


@contextlib.contextmanager
def distributions_from(cache_dir: str):
    """Inside the block, importlib.metadata.packages_distributions() answers from a record under the cache dir:
    transformers 5.17 calls it when it is imported, and it reads the metadata of every installed distribution
    (0.6 s of a core's start-up on one GPU host). The record is keyed by every sys.path entry and its modification
    time (installing, upgrading or removing a distribution changes its folder's), so it is the same map."""
    import importlib.metadata

    real = importlib.metadata.packages_distributions
    stamps = [(entry, os.stat(entry).st_mtime_ns) for entry in sys.path if entry and os.path.exists(entry)]
    key = hashlib.blake2b(json.dumps([sys.version, stamps]).encode(), digest_size=16).hexdigest()
    record = Path(cache_dir, "python-distributions", key + ".json")

    def from_record():
        return cached_record(record, lambda: {name: list(dists) for name, dists in real().items()},
                             lambda mapping: isinstance(mapping, dict), "the installed distributions")

    importlib.metadata.packages_distributions = from_record
    try:
        yield
    finally:
        importlib.metadata.packages_distributions = real


def _absent() -> bool:
    return False
